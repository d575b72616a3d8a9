"""The training command line: one adapter on a committed base and task, on one process or many under torchrun.

    python -m minilora.train --base decoder-tiny --task num2words --rank 8 --steps 200 --out runs/n2w
    python -m minilora.train --config runs/n2w.json              # the same flags from a JSON file
    torchrun --nproc_per_node 2 -m minilora.train --config runs/n2w.json

Flags (or the keys of --config; a flag given on the command line wins): the base (`--base`, a committed
checkpoint), the task, the method (`lora`, or `qlora`: the base quantised to NF4 first), its rank, alpha, the targets,
and TrainConfig's steps, batch size (the global batch, split over the processes), learning rate, warmup, seed and
gradient checkpointing. `--preset gpt2-124m` (any preset of minilora.models) trains on that shape with random weights
in `--dtype` instead of a committed base: for time and memory at real sizes, not for accuracy. Before any weight is
allocated, the step's memory is estimated on the meta device (minilora.memory) and a run that would not fit is refused
with the estimate.
Everything goes to --out:
- `run_config.json`: the run's settings; a later run with other settings into the same --out is refused, naming
  the fields that differ, because its checkpoint belongs to the first run;
- `checkpoint.pt`: the adapter, its optimizer state and the run's progress, written every --checkpoint-every steps
  and at the end; a run that finds one continues from it (and ends with the weights of an uninterrupted run). The
  base is not in it: the resumed run rebuilds that from the same --base or --preset and seed;
- `adapter/`: the trained adapter in peft's format; `history.json`: the loss curve and the wall time.

Under torchrun every process holds the whole model and takes its share of each global batch. The base is frozen,
so DistributedDataParallel registers and synchronises only the adapter's gradients. gloo on CPU, nccl on GPU.
With --shard, FSDP2 shards every weight (the frozen base too) over the processes instead, for models past one
device's memory; its checkpoint is the same one file, gathered whole (every process takes part, rank 0 writes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from minilora.train import TrainConfig, encode_examples, train


@dataclass
class RunConfig:
    base: str = "decoder-tiny"
    task: str = "num2words"
    method: str = "lora"  # "lora" or "qlora"
    rank: int = 8  # LoRA's r (a flag named --r would clash with torchrun's own --r... options)
    alpha: float = 16.0
    targets: str = "q_proj,v_proj"
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10  # the loss in history.json is the mean of every log_every steps
    shard: bool = False  # FSDP2 instead of DDP under torchrun: every weight sharded over the processes
    preset: str = ""  # a model shape (e.g. gpt2-124m) with random weights instead of the committed --base
    dtype: str = "float32"  # the base's dtype with --preset ("bfloat16" on a GPU); adapters stay fp32
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.method not in ("lora", "qlora"):
            raise ValueError(f"method must be 'lora' or 'qlora', got {self.method!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.dtype != "float32" and not self.preset:
            raise ValueError("--dtype applies to a --preset model; the committed bases train in float32.")

    def train_config(self, progress: bool) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           seed=self.seed, progress=progress, gradient_checkpointing=self.gradient_checkpointing,
                           log_every=self.log_every)


def parse(argv=None) -> tuple[RunConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m minilora.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a JSON file whose keys are these flags' names (with underscores)")
    parser.add_argument("--out", required=True, help="the run's folder: config, checkpoint, adapter, history")
    for f in fields(RunConfig):
        if isinstance(f.default, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = parser.parse_args(argv)
    values = json.loads(Path(args.config).read_text()) if args.config else {}
    unknown = set(values) - {f.name for f in fields(RunConfig)}
    if unknown:
        parser.error(f"{args.config} has unknown keys {sorted(unknown)}; known: {[f.name for f in fields(RunConfig)]}")
    values.update({f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None})
    return RunConfig(**values), Path(args.out)


def check_same_run(out: Path, run: RunConfig) -> None:
    """Refuse a run into a folder whose checkpoint another configuration wrote, naming the differing fields."""
    path = out / "run_config.json"
    if not path.exists():
        return
    saved, now = json.loads(path.read_text()), asdict(run)
    differing = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} in {path}, {now.get(k)!r} now" for k in differing)
        raise SystemExit(f"error: {out} holds a run with other settings ({detail}); use the same settings to resume, "
                         "or another --out.")


def check_fits(run: RunConfig, seq: int, device: torch.device, world: int) -> None:
    """Refuse, before any weight is allocated, a model whose training step does not fit this process's device
    (estimated on the meta device; each process holds its share of the batch, and with --shard its share of the
    weights)."""
    from minilora import memory

    batch = max(1, run.batch_size // world)
    budget = memory.estimate(run.preset or run.base, run.method, batch, seq, run.rank,
                             run.targets.split(","), getattr(torch, run.dtype), run.gradient_checkpointing)
    if run.shard:  # each process keeps 1/W of every tensor, and gathers one layer's weights whole at a time
        budget = dataclasses.replace(budget, weights=budget.weights // world + budget.largest_layer,
                                     gradients=budget.gradients // world, optimizer=budget.optimizer // world)
    memory.require_fits(budget, device, f"{run.preset or run.base} with {run.method} ({batch} x {seq} tokens per process)")


def build_model(run: RunConfig, device: torch.device):
    import minilora as ml

    if run.preset:  # a published shape with random weights: for throughput and memory, not for a task's accuracy
        torch.manual_seed(run.seed)
        with device:
            model = ml.DecoderLM(ml.get_config(run.preset)).to(getattr(torch, run.dtype))
    else:
        model = ml.load_base(run.base).to(device)
    if run.method == "qlora":
        ml.quantize_model(model, compute_dtype=getattr(torch, run.dtype))
    torch.manual_seed(run.seed)  # the adapter's initialisation: the same in every process and every run
    ml.inject(model, ml.LoraConfig(r=run.rank, alpha=run.alpha, target_modules=run.targets.split(",")))
    return model


def main(argv=None) -> None:
    import minilora as ml

    run, out = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if run.batch_size % world:
            raise SystemExit(f"error: the global batch size {run.batch_size} does not divide over {world} processes; "
                             f"use a multiple of {world} (e.g. {world * max(1, run.batch_size // world)}).")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    process = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        check_same_run(out, run)
        tok = ml.load_tokenizer()
        rows = encode_examples(ml.load_task(run.task, "train"), tok)
        try:
            check_fits(run, max(len(r["input_ids"]) for r in rows), device, world)
        except MemoryError as e:
            raise SystemExit(f"error: {e}") from None
        model = build_model(run, device)
        if process == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "run_config.json").write_text(json.dumps(asdict(run), indent=1) + "\n")
        history = train(model, rows, run.train_config(progress=process == 0), pad_id=tok.pad_id,
                        checkpoint=out / "checkpoint.pt", checkpoint_every=run.checkpoint_every, shard=run.shard)
        if run.shard:  # gather the sharded adapter (every process takes part) into an unsharded copy to save
            state = {k: v.full_tensor() for k, v in model.state_dict().items() if ".lora_" in k}
            model = build_model(run, torch.device("cpu"))
            model.load_state_dict(state, strict=False)
        if process == 0:
            ml.save_adapter(model, str(out / "adapter"))
            (out / "history.json").write_text(json.dumps(
                {"steps": history.steps, "loss": history.loss, "lr": history.lr, "wall_time_s": history.wall_time_s,
                 "world_size": world}, indent=1) + "\n")
            print(f"final loss {history.final_loss:.4f}; adapter written to {out / 'adapter'}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
