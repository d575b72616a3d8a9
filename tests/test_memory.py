"""minilora.memory: the meta-device estimate against parameter counts written out from the shapes and the
published sizes, and against real steps measured by PyTorch's own MemTracker; the refusal of a step that does not
fit (the command line's refusal is in test_train_distributed.py: it needs the committed data)."""

import dataclasses
import json
import os

import pytest
import torch

from minilora import memory
from minilora.models import get_config

TINY = get_config("decoder-tiny", n_layers=2)


def lora_params(cfg, r: int, targets: list[str]) -> int:
    """r (in + out) per adapted projection, the shapes written out from the config."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return cfg.n_layers * sum(r * sum(shapes[t]) for t in targets)


@pytest.mark.parametrize("preset,published", [("gpt2-124m", 124_439_808), ("llama-1b", 1_235_814_400),
                                              ("llama-7b", 6_738_415_616)])
def test_full_fine_tuning_of_the_published_sizes_costs_nothing_to_estimate(preset, published):
    """Built on meta: weights, gradients and AdamW's two moments of every published parameter, in bf16, and one
    layer's bytes (what FSDP gathers at a time)."""
    b = memory.estimate(preset, "full", batch=1, seq=64, dtype=torch.bfloat16)
    assert b.parameters == b.trainable == published
    assert (b.weights, b.gradients, b.optimizer) == (2 * published, 2 * published, 4 * published)
    assert b.activations > 0
    c = get_config(preset)  # one layer, written out: attention, MLP and norms, in bf16
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attention = c.d_model * (2 * q + 2 * kv) + int(c.bias) * (q + 2 * kv + c.d_model)
    mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff + int(c.bias) * (c.d_ff + c.d_model)
    norms = 2 * c.d_model * (2 if c.norm == "layernorm" else 1)
    assert b.largest_layer == 2 * (attention + mlp + norms)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_adapter_budgets_count_the_adapter_alone_as_trainable(method):
    r, targets = 4, ["q_proj", "v_proj", "down_proj"]
    b = memory.estimate(TINY, method, batch=2, seq=16, r=r, targets=targets)
    expected = lora_params(TINY, r, targets)
    if method == "dora":  # one magnitude per output row of each adapted projection
        expected += TINY.n_layers * (TINY.n_heads * TINY.head_dim + TINY.n_kv_heads * TINY.head_dim + TINY.d_model)
    assert b.trainable == expected
    assert (b.gradients, b.optimizer) == (4 * expected, 8 * expected)  # fp32 adapters
    assert b.parameters == TINY.num_parameters() + expected


def test_a_qlora_base_is_counted_in_packed_4_bit_bytes():
    """Each quantised (out, in) weight: out in / 2 bytes of codes plus one fp32 absmax per block of 64; the rest
    of the base (embeddings, norms) stays fp32 and the head is tied to the embeddings."""
    r, targets = 4, ["q_proj", "v_proj"]
    d, q, kv, f = TINY.d_model, TINY.n_heads * TINY.head_dim, TINY.n_kv_heads * TINY.head_dim, TINY.d_ff
    linears = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]
    quantised = TINY.n_layers * sum(o * i for o, i in linears)
    packed = quantised // 2 + quantised // 64 * 4
    rest = (TINY.num_parameters() - quantised) * 4
    b = memory.estimate(TINY, "qlora", batch=2, seq=16, r=r, targets=targets)
    assert b.weights == packed + rest + 4 * lora_params(TINY, r, targets)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_the_estimate_is_within_the_transients_of_a_measured_step(checkpointing):
    """Against real CPU steps: the saved tensors differ a little (the CPU's attention kernel saves others than the
    reference kernels on meta), and MemTracker's peak adds the backward's temporaries (the logits' gradient and
    the like), so the measured peak lies a little above the estimate."""
    torch.manual_seed(0)
    model = memory.build(TINY, "lora", device="cpu")
    ids = torch.randint(0, TINY.vocab_size, (4, 64))
    est = memory.estimate(TINY, "lora", batch=4, seq=64, gradient_checkpointing=checkpointing)
    m = memory.measure_step(model, ids, steps=1, gradient_checkpointing=checkpointing)
    on_meta = memory.saved_bytes(memory.build(TINY, "lora"), ids.to("meta"), checkpointing)
    assert abs(m.saved_bytes / on_meta - 1) < 0.15
    assert 0.95 < m.peak_bytes / est.total < 1.35, (m.peak_bytes, est)
    assert m.tokens_per_s > 0 and len(m.step_s) == 1


def test_gradient_checkpointing_keeps_the_layer_inputs_and_one_layer():
    """Chen et al.'s trade: what it saves grows with the layers, by about one layer's activations less each."""
    def acts(n_layers, ckpt):
        return memory.estimate(get_config("decoder-tiny", n_layers=n_layers), "lora", batch=2, seq=32,
                               gradient_checkpointing=ckpt).activations
    per_layer = acts(3, False) - acts(2, False)
    layer_input = 2 * 32 * TINY.d_model * 4  # (B, T, d) fp32
    assert acts(3, True) - acts(2, True) == layer_input
    assert per_layer > 5 * layer_input
    assert acts(4, True) < acts(4, False)


def test_a_step_that_does_not_fit_is_refused_with_the_estimate():
    b = memory.estimate("llama-7b", "lora", batch=1, seq=512, dtype=torch.bfloat16)
    with pytest.raises(MemoryError, match=r"llama-7b with lora needs about \d+\.\d\d GB .*weights 13\.56 GB.*"
                                          r"gradient checkpointing.*QLoRA"):
        memory.require_fits(b, "cpu", "llama-7b with lora", available=int(8e9))
    memory.require_fits(b, "cpu", available=b.total)  # exactly enough passes
    assert memory.available_bytes("cpu") > 0


def test_unknown_methods_and_encoder_decoders_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        memory.build(TINY, "prefix")
    with pytest.raises(ValueError, match="covers decoder models"):
        memory.build("seq2seq-tiny", "lora")


def test_build_sets_up_each_method_as_documented():
    from minilora.inject import adapter_layers
    from minilora.methods.qlora import Linear4bit

    lora = adapter_layers(memory.build(TINY, "lora", r=3))  # alpha = 2 r
    assert len(lora) == TINY.n_layers * 7 and all(layer.scaling == {"default": 2.0} for layer in lora.values())
    dora = adapter_layers(memory.build(TINY, "dora", r=4))
    assert all(set(layer.lora_magnitude_vector) == {"default"} for layer in dora.values())
    ia3 = adapter_layers(memory.build(TINY, "ia3"))
    assert sorted({n.rsplit(".", 1)[1] for n in ia3}) == ["down_proj", "k_proj", "v_proj"]
    assert all(layer.is_feedforward == n.endswith("down_proj") for n, layer in ia3.items())
    full = memory.build(TINY, "full")
    assert all(p.requires_grad for p in full.parameters()) and not adapter_layers(full)
    qlora = memory.build(TINY, "qlora", device="cpu", dtype=torch.bfloat16)
    assert sum(isinstance(m, Linear4bit) for m in qlora.modules()) == TINY.n_layers * 7
    assert next(qlora.parameters()).device.type == "cpu"
    assert {p.dtype for p in qlora.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_saved_bytes_defaults_to_no_checkpointing_and_counts_every_layer():
    model = memory.build(TINY, "lora").eval()
    model.gradient_checkpointing = True  # counted as if off, then put back
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    per_layer, inputs = memory.saved_by_layer(model, ids)
    assert sorted(per_layer, key=str) == [0, 1, None] and sorted(inputs) == [0, 1]
    assert all(v == 2 * 16 * TINY.d_model * 4 for v in inputs.values())  # each layer's (B, T, d) fp32 input
    assert memory.saved_bytes(model, ids) == sum(per_layer.values())
    assert memory.saved_bytes(model, ids, True) < memory.saved_bytes(model, ids)
    layers = model.model.layers
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)  # every hook removed
    assert model.gradient_checkpointing and not model.training  # both put back as they were


def test_sizes_print_in_gigabytes_from_one_gigabyte_and_megabytes_below():
    assert (memory.human(999_949_999), memory.human(10**9), memory.human(2_345_000)) == ("999.9 MB", "1.00 GB", "2.3 MB")
    b = memory.Budget(weights=2 * 10**9, gradients=10**6, optimizer=2 * 10**6, activations=5 * 10**8,
                      parameters=0, trainable=0, largest_layer=0)
    assert b.total == 2_503_000_000
    assert str(b) == "2.50 GB (weights 2.00 GB, gradients 1.0 MB, optimizer 2.0 MB, activations 500.0 MB)"


def test_available_memory_is_what_linux_reports_as_available():
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # MemFree: never more than MemAvailable
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * free <= memory.available_bytes("cpu") <= total


def test_measure_step_times_the_steps_it_is_asked_for():
    torch.manual_seed(0)
    model = memory.build(TINY, "lora", device="cpu")
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    m = memory.measure_step(model, ids, steps=4)
    assert len(m.step_s) == 4 and all(0 < t < 60 for t in m.step_s)
    assert m.tokens_per_s == pytest.approx(32 / sorted(m.step_s)[2])  # the upper median
    assert m.saved_bytes == memory.saved_bytes(model, ids)  # without checkpointing unless asked
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert m.peak_bytes > weights + m.saved_bytes * 0.9  # the weights are alive throughout, the activations at the peak


def test_the_module_command_prints_the_estimate_and_the_measurement(capsys):
    memory.main(["--preset", "decoder-tiny", "--method", "lora", "--batch", "1", "--seq", "16", "--steps", "2",
                 "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"] == dataclasses.asdict(memory.estimate("decoder-tiny", "lora", 1, 16))
    assert len(out["measured"]["step_s"]) == 2 and out["measured"]["peak_bytes"] > out["estimate"]["weights"]


def test_the_defaults_are_the_documented_ones():
    defaults = vars(memory.arguments().parse_args([]))
    assert defaults == {"preset": "gpt2-124m", "method": "lora", "batch": 2, "seq": 128, "r": 8, "steps": 3,
                        "dtype": "float32", "device": "cuda" if torch.cuda.is_available() else "cpu",
                        "gradient_checkpointing": False, "threads": None}
    small = get_config("decoder-small")  # max_seq_len 512, the default length
    assert memory.estimate(small) == memory.estimate(small, "lora", batch=1, seq=512, r=8, dtype=torch.float32,
                                                     gradient_checkpointing=False)
    assert memory.available_bytes() == pytest.approx(memory.available_bytes("cpu"), rel=0.05)
    with pytest.raises(MemoryError, match="this model needs about .* on cpu"):
        memory.require_fits(memory.estimate(TINY, seq=16), available=1)


def test_the_flags_are_typed_and_checked():
    ap = memory.arguments()
    assert ap.prog == "python -m minilora.memory" and ap.description == memory.main.__doc__
    args = ap.parse_args(["--r", "2", "--threads", "1", "--dtype", "bfloat16", "--method", "ia3"])
    assert (args.r, args.threads, args.dtype, args.method) == (2, 1, "bfloat16", "ia3")
    assert ap.parse_args(["--dtype", "float16"]).dtype == "float16"
    for bad in (["--dtype", "float64"], ["--method", "prefix"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)


def test_the_module_command_passes_every_flag_on(capsys):
    threads = torch.get_num_threads()
    try:
        memory.main(["--preset", "decoder-tiny", "--method", "dora", "--r", "2", "--dtype", "bfloat16", "--batch", "1",
                     "--seq", "8", "--steps", "1", "--gradient-checkpointing", "--threads", "1", "--device", "cpu"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    want = memory.estimate("decoder-tiny", "dora", 1, 8, 2, dtype=torch.bfloat16, gradient_checkpointing=True)
    assert out["estimate"] == dataclasses.asdict(want)
    model = memory.build("decoder-tiny", "dora", 2, device="meta", dtype=torch.bfloat16)
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    on_meta = memory.saved_bytes(model, ids, gradient_checkpointing=True)
    assert abs(out["measured"]["saved_bytes"] / on_meta - 1) < 0.2  # bf16 tensors, checkpointed: as estimated


def test_available_memory_reads_memavailable_and_falls_back_to_free_pages(monkeypatch):
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert memory.available_bytes("cpu") == pytest.approx(kib * 1024, rel=0.005)

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(memory, "open", no_proc, raising=False)  # found before the builtin by the module's code
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory.available_bytes("cpu") == pytest.approx(free, rel=0.01)
