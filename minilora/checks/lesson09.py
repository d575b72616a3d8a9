"""Checkers for lesson 09 (scaling up: memory budgets)'s exercises (the machinery: core.py)."""

import torch

from .core import ExerciseError, _generator, _randint, call, checker, expect_int, passed


def _model(g, method: str, dtype=torch.float32, device="cpu"):
    """A small random DecoderLM (GQA, 1-3 layers) set up for `method` by the package."""
    from minilora import get_config, memory

    heads = _randint(g, 1, 3) * 2
    cfg = get_config("decoder-tiny", vocab_size=_randint(g, 40, 90), d_model=8 * heads, n_heads=heads,
                     n_kv_heads=heads // 2, d_ff=_randint(g, 20, 60), n_layers=_randint(g, 1, 3), max_seq_len=32)
    torch.manual_seed(_randint(g, 0, 10_000))
    return memory.build(cfg, method, r=_randint(g, 1, 4), device=device, dtype=dtype)


def _ids(g, model):
    return torch.randint(0, model.config.vocab_size, (_randint(g, 1, 3), _randint(g, 5, 20)), generator=g)


# ----------------------------------------------------------------------------- 1. AdamW's state

ADAMW_HINT = ("AdamW keeps two tensors for every parameter it updates, each shaped and typed like that parameter; "
              "frozen parameters get none.")


@checker
def adamw_state_bytes(student_fn, seed: int | None = None) -> None:
    """Exercise 1: adamw_state_bytes(model) -> bytes of AdamW's state for the model's trainable parameters."""
    g = _generator(seed)
    for method, dtype in (("lora", torch.float32), ("full", torch.bfloat16), ("lora", torch.bfloat16),
                          ("ia3", torch.float64)):
        model = _model(g, method, dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()  # the real optimizer creates its state: measure it
        want = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for k, t in state.items() if k != "step")
        for p in trainable:
            p.grad = None
        got = call(student_fn, model, name="adamw_state_bytes", hint=ADAMW_HINT)
        expect_int(got, "adamw_state_bytes")
        if got != want:
            every = sum(2 * p.numel() * p.element_size() for p in model.parameters())
            one = want // 2
            fp32 = sum(2 * p.numel() * 4 for p in trainable)
            hint = ("only the trainable parameters (requires_grad) have optimizer state." if got == every else
                    "AdamW keeps two moments per parameter, not one." if got == one else
                    "each moment takes its parameter's bytes per element (element_size()): a bf16 parameter's "
                    "moments are bf16." if got == fp32 else ADAMW_HINT)
            raise ExerciseError(f"adamw_state_bytes for a {dtype} model trained with {method} should be {want:,} "
                                f"bytes (measured from torch's AdamW after one step), got {got:,}. Hint: {hint}")
    passed("adamw_state_bytes matches the state torch's AdamW creates, for LoRA, IA3 and full fine-tuning.")


# ----------------------------------------------------------------------------- 3. the largest batch that fits

BATCH_HINT = ("memory.estimate(config, method, batch, seq) gives the whole budget; the weights, gradients and "
              "optimizer state do not grow with the batch, the activations do.")


@checker
def largest_batch(student_fn, seed: int | None = None) -> None:
    """Exercise 3: largest_batch(config, method, seq, free_bytes) -> the largest batch whose step fits."""
    from minilora import get_config, memory

    g = _generator(seed)
    for preset, method in (("decoder-small", "lora"), ("decoder-base", "qlora"), ("decoder-tiny", "full")):
        config, seq = get_config(preset), 64 * _randint(g, 1, 4)
        one = memory.estimate(config, method, 1, seq).total
        free = int(one * (1.5 + 4 * torch.rand((), generator=g).item()))
        want = 1
        while memory.estimate(config, method, want + 1, seq).total <= free:
            want += 1
        got = call(student_fn, config, method, seq, free, name="largest_batch", hint=BATCH_HINT)
        expect_int(got, "largest_batch")
        if got != want:
            hint = ("that batch does not fit: its step needs more than free_bytes." if got > want else
                    "a larger batch still fits." if got < want else BATCH_HINT)
            raise ExerciseError(f"largest_batch({preset}, {method!r}, seq={seq}, free={free / 1e9:.2f} GB) should be "
                                f"{want}, got {got}. Hint: {hint} {BATCH_HINT}")
    passed("largest_batch finds the largest batch that fits, for LoRA, QLoRA and full fine-tuning.")


# ----------------------------------------------------------------------------- 2. gradient checkpointing

CKPT_HINT = ("picture the worst moment of the backward: what every layer still holds from the forward, what the "
             "layer being re-run saves again, and what was saved outside the layers.")


@checker
def checkpointed_bytes(student_fn, seed: int | None = None) -> None:
    """Exercise 2: checkpointed_bytes(per_layer, inputs) -> activation bytes with gradient checkpointing, from
    per_layer ({layer or None: bytes saved}) and inputs ({layer: bytes of its input})."""
    from minilora import memory

    g = _generator(seed)
    for method in ("lora", "full", "ia3"):
        model = _model(g, method)
        ids = _ids(g, model)
        per_layer, inputs = memory.saved_by_layer(model, ids)
        want = memory.saved_bytes(model, ids, gradient_checkpointing=True)
        got = call(student_fn, dict(per_layer), dict(inputs), name="checkpointed_bytes", hint=CKPT_HINT)
        expect_int(got, "checkpointed_bytes")
        if got != want:
            layers = [v for k, v in per_layer.items() if k is not None]
            outside, ins = per_layer.get(None, 0), sum(inputs.values())
            hint = ("add one layer's recomputed tensors: the backward needs them while it runs that layer." if
                    got == outside + ins else
                    "the layers' inputs are all kept, one per layer: sum them." if
                    got == outside + max(inputs.values()) + max(layers) else
                    "keep the tensors saved outside the layers (embeddings, final norm, head, loss)." if
                    got == ins + max(layers) else
                    "only one layer is recomputed at a time: the largest, not all of them." if
                    got == outside + ins + sum(layers) else CKPT_HINT)
            raise ExerciseError(f"checkpointed_bytes for a {method} model should be {want:,}, got {got:,}. "
                                f"Hint: {hint}")
    passed("checkpointed_bytes keeps the layer inputs and one recomputed layer, as memory.saved_bytes does.")


# ----------------------------------------------------------------------------- 4. Chen et al.'s segments (stretch)

SEGMENT_HINT = ("with segments of k layers only the first layer of each segment keeps its input, and the backward "
                "re-runs a whole segment before it can go back through it.")


def _segments(per_layer, inputs, k):
    """outside + the inputs of layers 0, k, 2k, ... + the largest segment's saved tensors (k consecutive layers)."""
    layers = sorted(i for i in per_layer if i is not None)
    kept = sum(inputs[i] for i in layers if i % k == 0)
    segment = max(sum(per_layer[i] for i in layers[j:j + k]) for j in range(0, len(layers), k))
    return per_layer.get(None, 0) + kept + segment


@checker
def segment_checkpointed_bytes(student_fn, seed: int | None = None) -> None:
    """Exercise 4: segment_checkpointed_bytes(per_layer, inputs, k) -> activation bytes when an input is kept every
    k layers and the backward recomputes k layers at a time (Chen et al. 2016, section 4)."""
    from minilora import get_config, memory

    g = _generator(seed)
    cfg = get_config("decoder-tiny", n_layers=_randint(g, 6, 9), vocab_size=64, d_model=32, n_heads=4,
                     n_kv_heads=2, d_ff=48, max_seq_len=32)
    model = memory.build(cfg, "lora", device="meta")
    ids = torch.zeros(_randint(g, 1, 3), _randint(g, 8, 24), dtype=torch.long, device="meta")
    per_layer, inputs = memory.saved_by_layer(model, ids)
    # k = 1 is what the package estimates for per-layer checkpointing: the reference the formula must meet
    assert _segments(per_layer, inputs, 1) == memory.saved_bytes(model, ids, gradient_checkpointing=True)
    for k in (1, 2, 3, cfg.n_layers):
        want = _segments(per_layer, inputs, k)
        got = call(student_fn, dict(per_layer), dict(inputs), k, name="segment_checkpointed_bytes", hint=SEGMENT_HINT)
        expect_int(got, "segment_checkpointed_bytes")
        if got != want:
            layers = [v for key, v in per_layer.items() if key is not None]
            hint = ("k = 1 must give per-layer checkpointing, exercise 2's answer." if k == 1 else
                    "only every k-th layer keeps its input." if got == _segments(per_layer, inputs, 1) - max(layers)
                    + max(sum(layers[j:j + k]) for j in range(0, len(layers), k)) else
                    "the backward re-runs a whole segment, so all k of its layers' tensors are alive together." if
                    got == want - max(sum(layers[j:j + k]) for j in range(0, len(layers), k)) + max(layers) else
                    SEGMENT_HINT)
            raise ExerciseError(f"segment_checkpointed_bytes with {cfg.n_layers} layers and k = {k} should be "
                                f"{want:,}, got {got:,}. Hint: {hint}")
    passed("segment_checkpointed_bytes trades kept inputs for recomputed segments as Chen et al. describe.")
