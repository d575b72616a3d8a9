"""train() under torch.distributed, on 2 CPU processes with gloo: the adapters stay identical across ranks and equal
single-process training on the same global batches, and only the adapters' gradients are synchronised. The model is
float64, but the loss is taken in float32 (lm_loss casts the logits), so the two runs agree to float32 rounding of
the loss's gradient (about 1e-7 of the updates), where a wrong share or scale would be off by percents. An FSDP2 run
interrupted and resumed from its checkpoint ends with the bits of an uninterrupted one. Then the command line,
`python -m minilora.train`, alone and under torchrun, with its errors."""

import contextlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minilora.inject import inject
from minilora.methods.lora import LoraConfig
from minilora.train import IGNORE_INDEX, TrainConfig, train

from adapters import tiny_decoder

ROOT = Path(__file__).resolve().parent.parent
CONFIG = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, progress=False, log_every=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_rows():
    """A float64 tiny decoder with LoRA (B moved off zero), and rows of unequal lengths and loss spans, so that the
    two halves of a batch hold different numbers of loss tokens."""
    torch.manual_seed(0)
    model = tiny_decoder().double()
    inject(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(12):
        n = 5 + (7 * i) % 9
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        prompt = 1 + i % 4
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return model, rows


@contextlib.contextmanager
def gloo(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def whole_state(model) -> dict:
    """The state dict with every sharded (FSDP2) tensor gathered: every process must call it."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def worker(rank, world, port, out, shard=False):
    with gloo(rank, world, port):
        model, rows = model_and_rows()
        synced = {n for n, p in model.named_parameters() if p.requires_grad}  # what DDP registers
        history = train(model, rows, CONFIG, shard=shard)
        state = whole_state(model)
        torch.save({"adapter": {k: v for k, v in state.items() if ".lora_" in k}, "loss": history.loss,
                    "synced": sorted(synced), "base": {k: v for k, v in state.items() if "lora_" not in k}},
                   f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_equal_one_process_on_the_same_global_batches(tmp_path, shard):
    """DistributedDataParallel, or FSDP2 with the frozen base sharded too: the same adapters as one process."""
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), shard), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    model, rows = model_and_rows()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    history = train(model, rows, CONFIG)
    single = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert set(single) == set(ranks[0]["adapter"])
    for k, v in single.items():
        assert torch.equal(ranks[0]["adapter"][k], ranks[1]["adapter"][k]), k  # identical across ranks
        torch.testing.assert_close(ranks[0]["adapter"][k], v, rtol=0, atol=1e-7)  # equal to one process
        assert (v - before[k]).abs().max() > 1e-3  # training moved it: the comparison can fail
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(history.loss), rtol=1e-6, atol=0)
    assert ranks[0]["synced"] == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".lora_" in n for n in ranks[0]["synced"])  # only the adapter's parameters are synchronised
    for k, v in ranks[0]["base"].items():  # the frozen base never moved
        assert torch.equal(v, model.state_dict()[k]), k
    with pytest.raises(ValueError, match="shard=True needs torchrun"):
        train(model, rows, CONFIG, shard=True)


class Interrupted(Exception):
    pass


def resume_worker(rank, world, port, out):
    """FSDP2 runs: one uninterrupted; one stopped in step 3, after the checkpoint of step 2; that one resumed."""
    with gloo(rank, world, port):
        whole, rows = model_and_rows()
        expected = train(whole, rows, CONFIG, shard=True)

        def stop_in_step_3(model, step):
            if step == 3:
                raise Interrupted

        path = Path(out) / "run.pt"
        try:
            train(model_and_rows()[0], rows, CONFIG, shard=True, checkpoint=path, checkpoint_every=2,
                  on_step=stop_in_step_3)
        except Interrupted:
            pass
        interrupted = torch.load(path, weights_only=True)
        resumed, steps_run = model_and_rows()[0], []
        history = train(resumed, rows, CONFIG, shard=True, checkpoint=path, checkpoint_every=2,
                        on_step=lambda model, step: steps_run.append(step))
        whole_adapter, resumed_adapter = ({k: v for k, v in whole_state(m).items() if ".lora_" in k}
                                          for m in (whole, resumed))
        if rank == 0:
            torch.save({"interrupted": interrupted, "whole": whole_adapter, "resumed": resumed_adapter,
                        "steps_run": steps_run, "expected": expected.loss, "loss": history.loss}, f"{out}/resume.pt")


def test_an_interrupted_fsdp2_run_resumes_to_the_adapters_of_an_uninterrupted_one(tmp_path):
    """The checkpoint of a sharded run is one file of whole tensors, the adapter's alone; every process resumes
    from it to the bits of the uninterrupted sharded run."""
    mp.spawn(resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    out = torch.load(tmp_path / "resume.pt", weights_only=True)
    saved = out["interrupted"]
    model, _ = model_and_rows()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert saved["step"] == 2 and out["steps_run"] == [3, 4, 5, 6]  # the resumed run trained the last four steps
    assert set(saved["model"]) == set(trainable) and all(".lora_" in n for n in trainable)  # no frozen base
    for n, p in trainable.items():  # gathered whole, not one process's shard
        assert saved["model"][n].shape == p.shape and saved["optimizer"]["state"][n]["exp_avg"].shape == p.shape, n
    assert set(out["resumed"]) == set(out["whole"])
    for k, v in out["whole"].items():
        assert torch.equal(out["resumed"][k], v), k
    assert out["loss"] == out["expected"]


def run_cli(args, tmp_path, env=None, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())] if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "minilora.train", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)


ARGS = ["--base", "decoder-tiny", "--task", "num2words", "--rank", "2", "--steps", "4", "--batch-size", "4",
        "--warmup-steps", "1", "--checkpoint-every", "2"]


def test_the_command_line_trains_resumes_and_refuses_other_settings(tmp_path):
    done = run_cli([*ARGS, "--out", "run"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "checkpoint.pt").exists()
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == [4] and history["world_size"] == 1
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = run_cli([*ARGS, "--out", "run"], tmp_path)  # finds the final checkpoint: nothing left to train
    assert again.returncode == 0 and (out / "adapter" / "adapter_model.safetensors").read_bytes() == weights
    other = run_cli([*ARGS, "--out", "run", "--lr", "0.01"], tmp_path)
    assert other.returncode != 0 and "lr: 0.003 in" in other.stderr and "0.01 now" in other.stderr
    (tmp_path / "cfg.json").write_text(json.dumps({"base": "decoder-tiny", "steps": 4, "bogus": 1}))
    bad = run_cli(["--config", "cfg.json", "--out", "x"], tmp_path)
    assert bad.returncode != 0 and "unknown keys ['bogus']" in bad.stderr
    odd = run_cli([*ARGS, "--out", "odd", "--batch-size", "3"], tmp_path, env={"WORLD_SIZE": "2"})
    assert odd.returncode != 0 and "the global batch size 3 does not divide over 2 processes" in odd.stderr


def test_the_command_line_under_torchrun_equals_one_process(tmp_path):
    one = run_cli([*ARGS, "--out", "one"], tmp_path)
    two = run_cli([*ARGS, "--out", "two"], tmp_path, torchrun=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)  # float32, two summation orders
    assert json.loads((tmp_path / "two" / "history.json").read_text())["world_size"] == 2
    sharded = run_cli([*ARGS, "--out", "sharded", "--shard"], tmp_path, torchrun=True)  # FSDP2
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    c = load_file(str(tmp_path / "sharded" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6)
    saved = torch.load(tmp_path / "sharded" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["model"] and all(".lora_" in k for k in saved["model"])


def test_qlora_under_torchrun_equals_one_process(tmp_path):
    """The base quantised to NF4 in every process (its codes are buffers DDP leaves alone), LoRA over it."""
    from safetensors.torch import load_file
    runs = {"one": run_cli([*ARGS, "--method", "qlora", "--out", "one"], tmp_path),
            "two": run_cli([*ARGS, "--method", "qlora", "--out", "two"], tmp_path, torchrun=True)}
    assert all(r.returncode == 0 for r in runs.values()), runs["two"].stderr[-2000:]
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["method"] == "qlora"


def test_the_command_line_refuses_a_preset_that_does_not_fit_before_building_it(tmp_path, monkeypatch):
    from minilora import memory

    cli = importlib.import_module("minilora.train.__main__")  # `minilora.train` names the function too
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": int(50e6))
    monkeypatch.setattr(cli, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(SystemExit, match=r"error: gpt2-124m with lora \(16 x \d+ tokens per process\) needs about "
                                         r".* but only 50\.0 MB is free on cpu"):
        cli.main(["--preset", "gpt2-124m", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_the_command_line_trains_a_preset_shape_with_random_weights(tmp_path):
    """--preset: the shape of a preset with freshly drawn weights, in --dtype, instead of a committed base."""
    cli = importlib.import_module("minilora.train.__main__")
    cli.main(["--preset", "decoder-tiny", "--dtype", "bfloat16", "--steps", "2", "--warmup-steps", "0",
              "--batch-size", "2", "--out", str(tmp_path / "run")])
    run = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert (run["preset"], run["dtype"]) == ("decoder-tiny", "bfloat16")
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())  # fp32 adapters on a bf16 base
    committed = cli.build_model(cli.RunConfig(), torch.device("cpu"))
    random = cli.build_model(cli.RunConfig(preset="decoder-tiny"), torch.device("cpu"))
    assert not torch.equal(committed.model.embed_tokens.weight, random.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="--dtype applies to a --preset model"):
        cli.RunConfig(dtype="bfloat16")
