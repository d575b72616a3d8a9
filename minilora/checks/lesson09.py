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


# ----------------------------------------------------------------------------- 4. saved tensors by layer (stretch)

LAYER_HINT = ("count what the saved-tensor hook sees while each layer runs (a forward pre-hook and a forward hook "
              "on model.model.layers[i] tell you which layer that is); the embeddings, the final norm, the head and "
              "the loss go under None. Skip the weights, and count each storage's bytes once, where it is first saved.")


@checker
def saved_bytes_per_layer(student_fn, seed: int | None = None) -> None:
    """Exercise 4: saved_bytes_per_layer(model, ids) -> {layer index or None: bytes saved for the backward}."""
    from minilora import memory

    g = _generator(seed)
    for method in ("lora", "full", "dora"):
        model = _model(g, method)
        ids = _ids(g, model)
        want, _ = memory.saved_by_layer(model, ids)
        got = call(student_fn, model, ids, name="saved_bytes_per_layer", hint=LAYER_HINT)
        if not isinstance(got, dict):
            raise ExerciseError(f"saved_bytes_per_layer should return a dict, got {type(got).__name__}. "
                                f"Hint: {LAYER_HINT}")
        if set(got) != set(want):
            raise ExerciseError(f"saved_bytes_per_layer should have the keys {sorted(want, key=str)}, got "
                                f"{sorted(got, key=str)}. Hint: {LAYER_HINT}")
        for key in want:
            expect_int(got[key], f"saved_bytes_per_layer's value for {key}")
        if got != want:
            total, got_total = sum(want.values()), sum(got.values())
            hint = ("the totals agree, so the tensors land under the wrong keys: a tensor belongs to the layer "
                    "that is running when it is saved, and nothing after the last layer belongs to it."
                    if total == got_total else
                    "more bytes than saved: leave out the parameters (and views of them), and count a storage "
                    "once even when several nodes save it." if got_total > total else LAYER_HINT)
            raise ExerciseError(f"saved_bytes_per_layer for a {method} model should be {want}, got {got}. "
                                f"Hint: {hint}")
    passed("saved_bytes_per_layer attributes every saved tensor to its layer, as memory.saved_by_layer does.")


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

CKPT_HINT = ("with checkpointing a layer keeps only its input until the backward; the backward then re-runs one "
             "layer at a time, so one layer's saved tensors (the largest) are alive at once, on top of everything "
             "saved outside the layers.")


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
