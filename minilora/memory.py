"""Training memory: what one step of a method holds, estimated from our own modules and measured.

A training step holds four kinds of tensors (the accounting of Rajbhandari et al. 2020, "ZeRO", sections 3.1-3.2):

    weights      every parameter and buffer, the frozen base included (packed 4-bit bytes for a QLoRA base)
    gradients    one per trainable parameter, in its dtype
    optimizer    AdamW's two moments (exp_avg, exp_avg_sq) per trainable parameter, in its dtype
    activations  what the forward keeps for the backward, from the embeddings up to the loss

`estimate` builds the model on the meta device, which gives every tensor its shape and dtype but no storage, so
llama-7b costs nothing to build. It adds up the parameters, buffers and trainable parameters, and runs one
training forward under `torch.autograd.graph.saved_tensors_hooks`: every tensor an autograd node saves passes
through the hook, and each storage that is not a weight is counted once. Gradient checkpointing as our models run
it (every layer, like transformers'; Chen et al. 2016 checkpoint every sqrt(n) layers) keeps only each layer's input
and recomputes one layer at a time in the backward, so its activations are everything saved outside the layers,
plus the layers' inputs, plus the largest layer's own saved tensors.

What the estimate leaves out is transient: the backward's temporaries (the logits' gradient, B T V floats, is the
largest), the allocator's rounding and fragmentation, and the kernels' workspaces. On meta every kernel is the
reference one, so what a fused CPU or GPU kernel saves (scaled-dot-product attention's backends differ) can differ
a little from the count on meta. `measure_step` runs real steps and measures their peak:
torch.cuda.max_memory_allocated on a GPU, PyTorch's own MemTracker elsewhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from minilora.methods.qlora import Linear4bit

METHODS = ("full", "lora", "qlora", "dora", "ia3")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]  # peft's default for Llama: keys, values, the feed-forward's input
GB = 1e9


@dataclass(frozen=True)
class Budget:
    """Bytes of each kind for one training step, and the parameter counts they come from."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    parameters: int  # every parameter (a QLoRA base's 4-bit weights count as their out x in values)
    trainable: int
    largest_layer: int  # bytes of the largest transformer layer's tensors: what FSDP gathers whole at a time

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {human(getattr(self, k))}" for k in ("weights", "gradients", "optimizer", "activations"))
        return f"{human(self.total)} ({parts})"


def human(n_bytes: int) -> str:
    """Bytes as GB (1e9) at and above 1 GB, MB (1e6) below."""
    return f"{n_bytes / GB:.2f} GB" if n_bytes >= GB else f"{n_bytes / 1e6:.1f} MB"


def build(config, method: str = "lora", r: int = 8, targets: list[str] | None = None, device="meta",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """A DecoderLM of `config` (a ModelConfig or a preset name) on `device`, set up to train with `method`:
    every weight ("full"), LoRA or DoRA of rank r with alpha 2r, QLoRA (NF4 base, fp32 LoRA), or IA3 (down_proj is
    its feed-forward module). `targets` default to every projection the model has (seven in Llama) for LoRA, QLoRA
    and DoRA, and to peft's k_proj, v_proj and down_proj for IA3."""
    import minilora as ml

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    cfg = ml.get_config(config) if isinstance(config, str) else config
    if cfg.is_seq2seq:
        raise ValueError("minilora.memory covers decoder models (DecoderLM); pass a decoder preset or config.")
    with torch.device(device):
        model = ml.DecoderLM(cfg).to(dtype)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    default = IA3_TARGETS if method == "ia3" else ALL_LINEAR
    targets = list(targets or [t for t in default if t in names])  # GPT-2's MLP has no gate_proj
    if method == "qlora":
        ml.quantize_model(model, compute_dtype=dtype)
    if method in ("lora", "qlora", "dora"):
        ml.inject(model, ml.LoraConfig(r=r, alpha=2 * r, target_modules=targets, use_dora=method == "dora"))
    elif method == "ia3":
        ff = [t for t in targets if t == "down_proj"]
        ml.inject(model, ml.IA3Config(target_modules=targets, feedforward_modules=ff or None))
    return model


def _key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def _bytes(tensors) -> int:
    """What the tensors' elements take (a tensor's own bytes, not the storage it may be a view of)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _layers(model) -> list[nn.Module]:
    return list(model.model.layers)


def saved_by_layer(model: nn.Module, input_ids: torch.Tensor) -> tuple[dict, dict]:
    """What one training forward of `model` on `input_ids` (labels = input_ids) keeps for the backward, by layer:
    ({layer index or None for outside the layers: bytes saved}, {layer index: bytes of its input}). Weights and
    buffers are left out (they are counted as weights), and each storage is counted once, where it is first saved."""
    weights = {_key(t) for t in (*model.parameters(), *model.buffers())}
    owner, per_layer, inputs, current = {}, {}, {}, [None]

    def pack(t):
        k = _key(t)
        if k not in weights and k not in owner:
            owner[k] = current[0]
            per_layer[current[0]] = per_layer.get(current[0], 0) + _tensor_bytes(t)
        return t

    def enter(i):
        def hook(module, args):
            current[0] = i
            inputs[i] = _tensor_bytes(args[0])
        return hook

    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(_layers(model))]
    handles += [layer.register_forward_hook(lambda *a: current.__setitem__(0, None)) for layer in _layers(model)]
    was_ckpt, was_training = model.gradient_checkpointing, model.training
    model.gradient_checkpointing = False  # count every layer's tensors; saved_bytes works out what checkpointing keeps
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=input_ids, labels=input_ids)
    finally:
        for h in handles:
            h.remove()
        model.gradient_checkpointing = was_ckpt
        model.train(was_training)
    return per_layer, inputs


def saved_bytes(model: nn.Module, input_ids: torch.Tensor, gradient_checkpointing: bool = False) -> int:
    """Bytes that one training forward keeps for the backward (`saved_by_layer`). With `gradient_checkpointing`:
    the saved tensors outside the layers, each layer's input, and the largest layer's own saved tensors (the
    backward recomputes one layer at a time)."""
    per_layer, inputs = saved_by_layer(model, input_ids)
    outside = per_layer.pop(None, 0)
    if not gradient_checkpointing:
        return outside + sum(per_layer.values())
    return outside + sum(inputs.values()) + max(per_layer.values(), default=0)


def count(model: nn.Module, input_ids: torch.Tensor, gradient_checkpointing: bool = False) -> Budget:
    """The budget of one AdamW training step of `model` (any device, meta included) on `input_ids`."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = _bytes(params) + _bytes(model.buffers())
    grads = _bytes(trainable)
    n_params = sum(p.numel() for p in params) + sum(m.out_features * m.in_features for m in model.modules()
                                                    if isinstance(m, Linear4bit))
    layer_bytes = [_bytes(layer.parameters()) + _bytes(layer.buffers()) for layer in _layers(model)]
    return Budget(weights=weights, gradients=grads, optimizer=2 * grads,
                  activations=saved_bytes(model, input_ids, gradient_checkpointing),
                  parameters=n_params, trainable=sum(p.numel() for p in trainable),
                  largest_layer=max(layer_bytes, default=0))


def estimate(config, method: str = "lora", batch: int = 1, seq: int = 512, r: int = 8,
             targets: list[str] | None = None, dtype: torch.dtype = torch.float32,
             gradient_checkpointing: bool = False) -> Budget:
    """The budget of one training step of a DecoderLM of `config` (ModelConfig or preset name) with `method` on a
    (batch, seq) batch, counted on the meta device: nothing is allocated, whatever the size."""
    model = build(config, method, r, targets, "meta", dtype)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return count(model, ids, gradient_checkpointing)


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory free for new tensors: the GPU's free memory, or the system's MemAvailable on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_fits(budget: Budget, device: str | torch.device = "cpu", what: str = "this model",
                 available: int | None = None) -> None:
    """Refuse, before anything is allocated, a step whose estimate exceeds the free memory of `device`."""
    free = available_bytes(device) if available is None else available
    if budget.total > free:
        raise MemoryError(
            f"{what} needs about {budget} for one training step, but only {human(free)} is free on "
            f"{torch.device(device)}. Lower the batch size or the sequence length, turn on gradient checkpointing, "
            "train with QLoRA (a 4-bit base), shard it over several GPUs (torchrun with --shard), or pick a smaller "
            "preset.")


@dataclass(frozen=True)
class Measured:
    """What `measure_step` saw on real tensors."""

    step_s: list[float]  # each timed step
    tokens_per_s: float  # at the median step
    peak_bytes: int  # the most tensor memory alive at once during a step, weights included
    saved_bytes: int  # `saved_bytes` of the same forward (and checkpointing) on the real tensors and kernels


def _step(model, input_ids, optimizer) -> None:
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step(model: nn.Module, input_ids: torch.Tensor, steps: int = 3,
                 gradient_checkpointing: bool = False) -> Measured:
    """Train `model` on `input_ids` with AdamW and measure one step's peak memory and `steps` steps' time.

    A warm-up step creates AdamW's state first. The peak of the next step is, on a GPU,
    torch.cuda.max_memory_allocated (every tensor on the device, weights included); elsewhere it comes from
    PyTorch's own MemTracker (torch.distributed._tools, a dispatch mode that follows every tensor's storage from
    its creation to its release), so it counts tensor bytes, not the allocator's free blocks."""
    device = input_ids.device
    saved = saved_bytes(model, input_ids, gradient_checkpointing)
    model.gradient_checkpointing = gradient_checkpointing
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    _step(model, input_ids, opt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(model, input_ids, opt)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        tracker = _Tracker()
        tracker.track_external(model, opt, input_ids)
        with tracker:
            _step(model, input_ids, opt)
        peak = tracker.get_tracker_snapshot("peak")[device]["Total"]
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        _step(model, input_ids, opt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    return Measured(step_s=times, tokens_per_s=input_ids.numel() / median, peak_bytes=peak, saved_bytes=saved)


def _Tracker():
    """torch's MemTracker, told not to hook the gradients of frozen parameters (which it cannot hook: it would
    raise). Gradients are then counted with the step's other new tensors; the total is the same."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return Tracker()


def arguments():
    """The command line's flags, with these defaults: gpt2-124m, LoRA r = 8, batch 2 x 128, 3 timed steps, fp32, the
    GPU when there is one, no gradient checkpointing, torch's own thread count."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minilora.memory", description=main.__doc__)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--method", default="lora", choices=METHODS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def main(argv=None) -> None:
    """python -m minilora.memory --preset gpt2-124m --method lora --batch 2 --seq 128 [--steps 3]
    [--gradient-checkpointing] [--dtype bfloat16] [--device cuda]: the estimate, then real steps, as one JSON line."""
    import json

    args = arguments().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    budget = estimate(args.preset, args.method, args.batch, args.seq, args.r, dtype=dtype,
                      gradient_checkpointing=args.gradient_checkpointing)
    require_fits(budget, args.device, f"{args.preset} with {args.method}")
    torch.manual_seed(0)
    model = build(args.preset, args.method, args.r, device=args.device, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    m = measure_step(model, ids, args.steps, args.gradient_checkpointing)
    print(json.dumps({"estimate": asdict(budget), "measured": asdict(m)}))


if __name__ == "__main__":
    main()
