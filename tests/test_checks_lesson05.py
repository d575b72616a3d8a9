"""Lesson 05 (IA³)'s exercise checkers: the right answers pass, each plausible wrong answer fails with its own hint,
and an unfinished answer says so."""

import re

import pytest
import torch
import torch.nn as nn

import minilora as ml
from minilora import checks
from minilora.checks import ExerciseError

from adapters import fails_with, global_random_state_unchanged, in_out, placeholder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers

def count(cfg, targets, feedforward, side=lambda t, ff, io: io[t][0] if t in ff else io[t][1]):
    return cfg.n_layers * sum(side(t, feedforward, in_out(cfg)) for t in targets)


def count_with_package(cfg, targets, feedforward):
    with torch.device("meta"):
        model = ml.DecoderLM(cfg)
    ml.inject(model, ml.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    return ml.trainable_report(model, verbose=False).trainable


def forward(x, W, b, l, feedforward):
    return (x * l) @ W.T + b if feedforward else (x @ W.T + b) * l


def forward_with_package(x, W, b, l, feedforward):
    layer = ml.IA3Layer(nn.Linear(W.shape[1], W.shape[0]))
    layer.add_adapter("default", ml.IA3Config(target_modules=["m"], feedforward_modules=["m"] if feedforward else None),
                      "m")
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        layer.base_layer.bias.copy_(b)
        layer.ia3_l["default"].copy_(l.view(layer.ia3_l["default"].shape))
        return layer(x)


def matches(patterns, name):
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def shapes(model, targets, feedforward, match=matches, ff_match=None):
    ff_match = ff_match or match
    return {name: (1, m.in_features) if ff_match(feedforward, name) else (m.out_features, 1)
            for name, m in model.named_modules() if isinstance(m, nn.Linear) and match(targets, name)}


def shapes_with_inject(model, targets, feedforward):
    model = ml.inject(model, ml.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    return {n: tuple(m.ia3_l["default"].shape) for n, m in model.named_modules() if isinstance(m, ml.IA3Layer)}


def merge(W, b, l, feedforward):
    return (W * l.view(1, -1), b) if feedforward else (W * l.view(-1, 1), b * l)


def unmerge(W, b, l, feedforward):
    return (W / l.view(1, -1), b) if feedforward else (W / l.view(-1, 1), b / l)


def mixed(x, W, vectors, names, feedforward):
    ones = torch.ones(W.shape[1] if feedforward else W.shape[0])
    scale = torch.stack([vectors.get(n, ones) for n in names]).unsqueeze(1)
    return (x * scale) @ W.T if feedforward else (x @ W.T) * scale


def mixed_one_by_one(x, W, vectors, names, feedforward):
    return torch.stack([x[i] @ W.T if n == "__base__" else forward(x[i], W, torch.zeros(W.shape[0]), vectors[n],
                                                                     feedforward) for i, n in enumerate(names)])


@pytest.mark.parametrize("seed", SEEDS)
def test_lesson_05_right_answers_pass(seed, capsys):
    checks.ia3_param_count(count, seed=seed)
    checks.ia3_param_count(count_with_package, seed=seed)
    checks.ia3_forward(forward, seed=seed)
    checks.ia3_forward(forward_with_package, seed=seed)
    checks.ia3_vector_shapes(shapes, seed=seed)
    checks.ia3_vector_shapes(shapes_with_inject, seed=seed)
    checks.ia3_merge_unmerge(merge, unmerge, seed=seed)
    checks.ia3_mixed_batch(mixed, seed=seed)
    checks.ia3_mixed_batch(mixed_one_by_one, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 9
    assert "614,400 trainable parameters" in lines[1]  # Llama-2-7B: 32 * (4096 + 4096 + 11008)


def test_lesson_05_checks_leave_the_global_random_state_alone():
    with global_random_state_unchanged():
        checks.ia3_forward(forward)
        checks.ia3_merge_unmerge(merge, unmerge)
        checks.ia3_mixed_batch(mixed)


def test_unmerge_may_divide_by_l_plus_peft_epsilon():
    checks.ia3_merge_unmerge(merge, lambda W, b, l, ff: unmerge(W, b, l + 1e-8, ff))


# ----------------------------------------------------------------------------- 1. counting

@pytest.mark.parametrize("seed", SEEDS)
def test_count_rejects_common_mistakes(seed):
    L = lambda cfg: cfg.n_layers
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: count(cfg, t, ff) // L(cfg), hint="count for one block",
               seed=seed)
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: count(cfg, t, ff, lambda t, ff, io: io[t][1]),
               hint="one entry per input feature", seed=seed)
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: count(cfg, t, ff, lambda t, ff, io: io[t][0]),
               hint="only the feed-forward layers scale their input", seed=seed)
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: count(cfg, t, ff, lambda t, ff, io: io[t][1] if t in ff
                                                                 else io[t][0]),
               hint="the two sides are swapped", seed=seed)
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: count(cfg, t, ff, lambda t, ff, io: sum(io[t])),
               hint="one vector per layer, on one side only", seed=seed)
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: count(cfg, t, ff, lambda t, ff, io: io[t][0] * io[t][1]),
               hint="size of the weight matrices themselves", seed=seed)

    def no_gqa(cfg, t, ff):
        full = {**in_out(cfg), "k_proj": (cfg.d_model, cfg.n_heads * cfg.head_dim),
                "v_proj": (cfg.d_model, cfg.n_heads * cfg.head_dim)}
        return cfg.n_layers * sum(full[x][0] if x in ff else full[x][1] for x in t)
    fails_with(checks.ia3_param_count, no_gqa, hint="grouped-query attention", seed=seed)


def test_count_must_be_an_int():
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: float(count(cfg, t, ff)), hint="whole number (int)")
    fails_with(checks.ia3_param_count, lambda cfg, t, ff: torch.tensor(count(cfg, t, ff)), hint="whole number (int)")


# ----------------------------------------------------------------------------- 2. the forward pass

@pytest.mark.parametrize("seed", SEEDS)
def test_forward_rejects_common_mistakes(seed):
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: x @ W.T + b, hint="the vector is missing", seed=seed)
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: (x * l) @ W.T + b if ff else l * (x @ W.T) + b,
               hint="the bias too", seed=seed)
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: (x * l) @ W.T if ff else (x @ W.T + b) * l,
               hint="the bias is still added", seed=seed)
    square = lambda W: W.shape[0] == W.shape[1]
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: (x * l) @ W.T + (l * b if square(W) else b) if ff else
               (x @ W.T + b) * l, hint="the bias is added unscaled", seed=seed)
    # the side swapped: a shape error on rectangular layers, the side's own hint on square ones
    swapped = lambda x, W, b, l, ff: (x @ W.T + b) * l if ff else (x * l) @ W.T + b
    with pytest.raises(ExerciseError):
        checks.ia3_forward(swapped, seed=seed)
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: (x * l) @ W.T + b if ff else
               ((x * l) @ W.T + b if W.shape[0] == W.shape[1] else (x @ W.T + b) * l),
               hint="it scales what the layer gives, not what it reads", seed=seed)
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: ((x @ W.T + b) * l if W.shape[0] == W.shape[1] else
                                                           (x * l) @ W.T + b) if ff else (x @ W.T + b) * l,
               hint="a feed-forward layer scales its input, not its output", seed=seed)
    fails_with(checks.ia3_forward, lambda x, W, b, l, ff: forward(x, W.T if W.shape[0] == W.shape[1] else W, b, l, ff),
               hint="x W^T", seed=seed)


def test_forward_wrong_shape_and_dtype_are_named():
    fails_with(checks.ia3_forward, lambda *a: forward(*a)[..., :-1], hint="has the wrong shape: expected")
    fails_with(checks.ia3_forward, lambda *a: forward(*a).double(), hint="has the wrong dtype")
    fails_with(checks.ia3_forward, lambda *a: forward(*a).tolist(), hint="should be a torch.Tensor, got list")


# ----------------------------------------------------------------------------- 3. which vector each module gets

def bare_suffix(patterns, name):
    return not isinstance(patterns, str) and any(name.endswith(p) for p in patterns)


def substring(patterns, name):
    return any(p in name for p in patterns) if not isinstance(patterns, str) else matches(patterns, name)


@pytest.mark.parametrize("seed", SEEDS)
def test_shapes_reject_common_mistakes(seed):
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: shapes(m, t, ff, ff_match=bare_suffix),
               hint="not any name that ends with the entry's letters", seed=seed)
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: shapes(m, t, ff, match=lambda p, n: substring(p, n)),
               hint="merely contains it", seed=seed)
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: shapes(m, t, ff, ff_match=lambda p, n: False),
               hint="scales its input: its vector has d_in entries", seed=seed)
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: {n: (s[1], s[0]) for n, s in shapes(m, t, ff).items()},
               hint="broadcast against W", seed=seed)
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: {n: (s[1], 1) if s[0] == 1 else s
                                                           for n, s in shapes(m, t, ff).items()},
               hint="broadcast against W", seed=seed)
    exact_only = lambda p, n: re.fullmatch(p, n) is not None if isinstance(p, str) else n in p
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: shapes(m, t, ff, match=exact_only),
               hint="not only a name equal to it", seed=seed)
    as_list = lambda p, n: matches([p] if isinstance(p, str) else p, n)
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: shapes(m, t, ff, match=as_list),
               hint="regular expression", seed=seed)


def test_shapes_must_be_a_dict_of_shapes():
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: list(shapes(m, t, ff)), hint="should return a dict")
    fails_with(checks.ia3_vector_shapes, lambda m, t, ff: {n: "wide" for n in shapes(m, t, ff)},
               hint="a tuple of two ints")


# ----------------------------------------------------------------------------- 4. merge and unmerge

@pytest.mark.parametrize("seed", SEEDS)
def test_merge_rejects_common_mistakes(seed):
    fails_with(checks.ia3_merge_unmerge, lambda W, b, l, ff: (W, b), unmerge, hint="W is unchanged", seed=seed)
    fails_with(checks.ia3_merge_unmerge, lambda W, b, l, ff: (W * l.view(-1, 1), b) if not ff else merge(W, b, l, ff),
               unmerge, hint="scales the bias too", seed=seed)
    fails_with(checks.ia3_merge_unmerge, lambda W, b, l, ff: (W * l.view(1, -1), b * l) if not ff else
               merge(W, b, l, ff), unmerge, hint="scales the other axis of W", seed=seed)
    fails_with(checks.ia3_merge_unmerge, lambda W, b, l, ff: (W * l.view(1, -1), b * l) if ff else merge(W, b, l, ff),
               unmerge, hint="the bias is added after the product, unscaled", seed=seed)
    fails_with(checks.ia3_merge_unmerge, merge, lambda W, b, l, ff: merge(W, b, l, ff), hint="multiplying scales",
               seed=seed)
    fails_with(checks.ia3_merge_unmerge, merge, lambda W, b, l, ff: (W, b), hint="still the merged one", seed=seed)
    fails_with(checks.ia3_merge_unmerge, merge, lambda W, b, l, ff: (unmerge(W, b, l, ff)[0], b / l),
               hint="nothing to undo", seed=seed)
    fails_with(checks.ia3_merge_unmerge, lambda W, b, l, ff: merge(W, b, l, ff)[0], unmerge, hint="two tensors",
               seed=seed)


def test_merge_hint_asks_rather_than_tells():
    # the hint points at the idea (which axis of W the vector lines up with) without naming rows or columns
    from minilora.checks.lesson05 import MERGE_HINT
    assert "?" in MERGE_HINT
    assert not any(word in MERGE_HINT.lower() for word in ("row", "column"))
    message = fails_with(checks.ia3_merge_unmerge, lambda W, b, l, ff: (W * l.view(1, -1), b * l) if not ff else
                         merge(W, b, l, ff), unmerge, hint="scales the other axis of W")
    assert "rows" not in message and "columns" not in message


# ----------------------------------------------------------------------------- 5. a mixed batch

@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_batch_rejects_common_mistakes(seed):
    fails_with(checks.ia3_mixed_batch, lambda x, W, v, names, ff: mixed(x, W, v, [names[0]] * len(names), ff),
               hint="the first example's adapter", seed=seed)

    def product(x, W, v, names, ff):
        s = v["summarise"] * v["translate"] * v["classify"]
        return (x * s) @ W.T if ff else (x @ W.T) * s
    fails_with(checks.ia3_mixed_batch, product, hint="multiplied together", seed=seed)
    fails_with(checks.ia3_mixed_batch, lambda x, W, v, names, ff: x @ W.T, hint="no vector was applied", seed=seed)
    fails_with(checks.ia3_mixed_batch, lambda x, W, v, names, ff: mixed(x, W, v, names, not ff)
               if W.shape[0] == W.shape[1] else mixed(x, W, v, names, ff), hint="on the wrong side", seed=seed)
    # "__base__" looked up like an adapter: the error is one line naming the exception
    message = fails_with(checks.ia3_mixed_batch, lambda x, W, v, names, ff: torch.stack([v[n] for n in names]),
                         hint="raised KeyError", seed=seed)
    assert "__base__" in message


def test_lesson_05_not_implemented_yet_is_reported_as_such():
    for check, answers in [(checks.ia3_param_count, [placeholder]), (checks.ia3_forward, [placeholder]),
                           (checks.ia3_vector_shapes, [placeholder]),
                           (checks.ia3_merge_unmerge, [placeholder, unmerge]),
                           (checks.ia3_merge_unmerge, [merge, placeholder]), (checks.ia3_mixed_batch, [placeholder])]:
        fails_with(check, *answers, hint="is not implemented yet")
