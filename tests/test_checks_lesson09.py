"""Lesson 09 (scaling up)'s exercise checkers: the right answers pass (written out here without the package's
counting code), each plausible wrong answer fails with its own hint, and an unfinished answer says so."""

import pytest

from minilora import checks, memory

from adapters import fails_with, global_random_state_unchanged, placeholder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers (and variants)

def adamw(model, trainable_only=True, moments=2, fp32=False):
    return sum(moments * p.numel() * (4 if fp32 else p.element_size())
               for p in model.parameters() if p.requires_grad or not trainable_only)


def checkpointed(per_layer, inputs, outside=True, all_inputs=True, recompute="max"):
    layers = [v for k, v in per_layer.items() if k is not None]
    total = per_layer.get(None, 0) if outside else 0
    total += sum(inputs.values()) if all_inputs else max(inputs.values())
    return total + {"max": max(layers), "sum": sum(layers), "none": 0}[recompute]


_ESTIMATES = {}


def _estimate(config, method, batch, seq):
    """memory.estimate, kept for each (config, method, batch, seq): the wrong answers below ask it again and again."""
    key = (repr(config), method, batch, seq)
    if key not in _ESTIMATES:
        _ESTIMATES[key] = memory.estimate(config, method, batch, seq)
    return _ESTIMATES[key]


def largest(config, method, seq, free, off_by=0, weights=True):
    batch = 1
    while True:  # every batch in turn, independent of the linear extrapolation the solution notebook uses
        b = _estimate(config, method, batch + 1, seq)
        if (b.total if weights else b.activations) > free:
            return batch + off_by
        batch += 1


def segments(per_layer, inputs, k, every_input=False, one_layer=False):
    """Chen et al.'s scheme by a loop over segments of k consecutive layers."""
    n = len(inputs)
    kept = sum(inputs[i] for i in range(n) if every_input or i % k == 0)
    peak = 0
    for start in range(0, n, k):
        seg = [per_layer[i] for i in range(start, min(start + k, n))]
        peak = max(peak, max(seg) if one_layer else sum(seg))
    return per_layer.get(None, 0) + kept + peak


@pytest.mark.parametrize("seed", SEEDS)
def test_lesson_09_right_answers_pass(seed, capsys):
    with global_random_state_unchanged():
        checks.adamw_state_bytes(adamw, seed=seed)
        checks.checkpointed_bytes(checkpointed, seed=seed)
        checks.segment_checkpointed_bytes(segments, seed=seed)
    assert capsys.readouterr().out.count("✓") == 3


def test_largest_batch_right_answer_passes(capsys):
    checks.largest_batch(largest, seed=0)
    assert "✓" in capsys.readouterr().out


# ----------------------------------------------------------------------------- wrong answers

def test_adamw_state_bytes_rejects_the_common_mistakes():
    fails_with(checks.adamw_state_bytes, lambda m: adamw(m, trainable_only=False), hint="only the trainable")
    fails_with(checks.adamw_state_bytes, lambda m: adamw(m, moments=1), hint="two moments per parameter")
    fails_with(checks.adamw_state_bytes, lambda m: adamw(m, fp32=True), hint="a bf16 parameter's moments are bf16")
    fails_with(checks.adamw_state_bytes, lambda m: float(adamw(m)), hint="a whole number")


def test_checkpointed_bytes_rejects_the_common_mistakes():
    fails_with(checks.checkpointed_bytes, lambda p, i: checkpointed(p, i, recompute="none"),
               hint="add one layer's recomputed tensors")
    fails_with(checks.checkpointed_bytes, lambda p, i: checkpointed(p, i, all_inputs=False), hint="sum them")
    fails_with(checks.checkpointed_bytes, lambda p, i: checkpointed(p, i, outside=False),
               hint="keep the tensors saved outside the layers")
    fails_with(checks.checkpointed_bytes, lambda p, i: checkpointed(p, i, recompute="sum"),
               hint="only one layer is recomputed at a time")


def test_largest_batch_rejects_the_common_mistakes():
    fails_with(checks.largest_batch, lambda *a: largest(*a, off_by=1), hint="that batch does not fit")
    fails_with(checks.largest_batch, lambda *a: largest(*a, off_by=-1), hint="a larger batch still fits")
    fails_with(checks.largest_batch, lambda *a: largest(*a, weights=False), hint="that batch does not fit")


def test_segment_checkpointed_bytes_rejects_the_common_mistakes():
    fails_with(checks.segment_checkpointed_bytes, lambda p, i, k: segments(p, i, k, every_input=True),
               hint="only every k-th layer keeps its input")
    fails_with(checks.segment_checkpointed_bytes, lambda p, i, k: segments(p, i, k, one_layer=True),
               hint="all k of its layers' tensors are alive together")
    fails_with(checks.segment_checkpointed_bytes, lambda p, i, k: segments(p, i, 2), hint="k = 1 must give")


def test_unfinished_answers_say_so():
    for check in (checks.adamw_state_bytes, checks.checkpointed_bytes, checks.largest_batch,
                  checks.segment_checkpointed_bytes):
        fails_with(check, placeholder, hint="not implemented yet")
