"""Checkers for lesson 05 (IA³)'s exercises (the machinery and how to write one: core.py)."""

import copy

import torch
import torch.nn as nn

from minilora import DecoderLM, IA3Config, IA3Layer, get_config, inject, trainable_report

from .core import (call, checker, ExerciseError, expect_int, expect_tensor, passed, _choice, _generator, _linear,
                   _linear_shapes, _randint)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_config(g):
    """A small decoder config with grouped-query attention, so that k and v are narrower than q."""
    n_heads = _choice(g, [2, 4])
    d_model = n_heads * _choice(g, [8, 12])
    d_ff = 2 * d_model + 8 * _randint(g, 1, 3)  # over twice d_model, so that every listed mistake gives its own count
    return get_config("decoder-tiny", vocab_size=32, max_seq_len=16, n_layers=_randint(g, 3, 5), n_heads=n_heads,
                      n_kv_heads=n_heads // 2, d_model=d_model, d_ff=d_ff)


def _in_out(cfg) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection of a block, read from a model built with the config."""
    with torch.device("meta"):
        return _linear_shapes(DecoderLM(cfg))


def _ia3_layer(W, b, vectors: dict[str, torch.Tensor], feedforward: bool) -> IA3Layer:
    """An ml.IA3Layer over nn.Linear(W, b) holding these named vectors (1-D, as the exercises take them)."""
    layer = IA3Layer(_linear(W, b).requires_grad_(False))
    config = IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if feedforward else None)
    for name, l in vectors.items():
        layer.add_adapter(name, config, "layer")
        with torch.no_grad():
            layer.ia3_l[name].copy_(l.view(layer.ia3_l[name].shape))
    layer.active_adapters = list(vectors)[:1]
    return layer


def _random_layer(g, d_in, d_out, bias=True, dtype=torch.float32):
    """W, b and a vector for each side, with entries far enough from 1 that leaving one out shows."""
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in ** 0.5
    b = torch.randn(d_out, generator=g, dtype=dtype) if bias else None
    l_out = torch.rand(d_out, generator=g, dtype=dtype) + 0.5  # in [0.5, 1.5]: no entry near 0
    l_in = torch.rand(d_in, generator=g, dtype=dtype) + 0.5
    return W, b, l_out, l_in


def _side(feedforward: bool) -> str:
    return "a feed-forward layer (input vector)" if feedforward else "an output-vector layer"


# ----------------------------------------------------------------------------- 1. counting parameters

COUNT_HINT = ("every targeted layer in every block trains one vector, and its length depends on the side it "
              "scales: a feed-forward layer scales its input, every other layer its output. k_proj and v_proj "
              "have n_kv_heads·head_dim outputs, q_proj n_heads·head_dim, and the MLP maps d_model to d_ff and back.")


@checker
def ia3_param_count(student_fn, seed: int | None = None) -> None:
    """Exercise 1: ia3_param_count(cfg, target_modules, feedforward_modules) -> the number of numbers IA³ trains."""
    g = _generator(seed)
    # the first case tells every listed mistake apart (k_proj is narrower than d_model, d_ff wider)
    cases = [(["k_proj", "gate_proj", "up_proj", "down_proj"], ["down_proj"]),
             (["k_proj", "v_proj", "down_proj"], ["down_proj"]), (["q_proj", "o_proj", "up_proj"], []),
             (ALL_LINEAR, ["down_proj"]), (["v_proj", "up_proj"], ["up_proj"])]
    for targets, feedforward in cases:
        cfg = _tiny_config(g)
        with torch.device("meta"):
            model = DecoderLM(cfg)
        config = IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward))
        want = trainable_report(inject(model, config), verbose=False).trainable

        got = call(student_fn, copy.deepcopy(cfg), list(targets), list(feedforward), name="ia3_param_count",
                   hint=COUNT_HINT)
        expect_int(got, "ia3_param_count")
        if got == want:
            continue
        io = _in_out(cfg)
        L = cfg.n_layers
        no_gqa = {**io, "k_proj": (cfg.d_model, cfg.n_heads * cfg.head_dim),
                  "v_proj": (cfg.d_model, cfg.n_heads * cfg.head_dim)}
        per_block = sum(io[t][0] if t in feedforward else io[t][1] for t in targets)
        mistakes = [
            (per_block, "that is the count for one block; every block has its own vectors."),
            (L * sum(io[t][1] for t in targets), "a feed-forward layer's vector scales its input, so it has one "
                                                 "entry per input feature."),
            (L * sum(io[t][0] for t in targets), "only the feed-forward layers scale their input; the others scale "
                                                 "their output, one entry per output feature."),
            (L * sum(io[t][1] if t in feedforward else io[t][0] for t in targets),
             "the two sides are swapped: a feed-forward layer scales its input, the others their output."),
            (L * sum(no_gqa[t][0] if t in feedforward else no_gqa[t][1] for t in targets),
             "with grouped-query attention (n_kv_heads < n_heads) k_proj and v_proj have fewer outputs than "
             "q_proj: n_kv_heads·head_dim."),
            (L * sum(io[t][0] + io[t][1] for t in targets), "IA³ trains one vector per layer, on one side only, "
                                                            "not one per side."),
            (L * sum(io[t][0] * io[t][1] for t in targets), "that is the size of the weight matrices themselves; "
                                                            "IA³ leaves them frozen."),
        ]
        hint = next((h for wrong, h in mistakes if got == wrong), COUNT_HINT)
        case = (f"n_layers={cfg.n_layers}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, "
                f"head_dim={cfg.head_dim}, d_ff={cfg.d_ff}, targets={targets}, feedforward={feedforward}")
        off = "too large" if got > want else "too small"
        raise ExerciseError(f"ia3_param_count for {case}: got {got:,}, {off}. Hint: {hint}")

    llama = get_config("llama-7b")
    n = call(student_fn, llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"], name="ia3_param_count",
             hint=COUNT_HINT)
    passed(f"ia3_param_count agrees with the package on {len(cases)} random models.")
    print(f"  Llama-2-7B with peft's default targets: {n:,} trainable parameters, "
          f"{100 * n / llama.num_parameters():.4f}% of the model.")


# ----------------------------------------------------------------------------- 2. the forward pass

FORWARD_HINT = ("an output vector scales everything the layer gives, the bias included; an input vector scales what "
                "the layer reads, before W acts on it. W is (d_out, d_in), as in nn.Linear.")


@checker
def ia3_forward(student_fn, seed: int | None = None) -> None:
    """Exercise 2: ia3_forward(x, W, b, l, feedforward) -> the layer's output."""
    g = _generator(seed)
    trials = [(16, 24, (5,), False), (24, 16, (2, 3), True), (16, 16, (4,), False), (16, 16, (3, 2), True),
              (12, 20, (6,), True)]  # d_in, d_out, leading dims, feed-forward
    for d_in, d_out, lead, feedforward in trials:
        W, b, l_out, l_in = _random_layer(g, d_in, d_out)
        l = l_in if feedforward else l_out
        x = torch.randn(*lead, d_in, generator=g)
        with torch.no_grad():
            want = _ia3_layer(W, b, {"default": l}, feedforward)(x)
            plain = x @ W.T + b
            mistakes = [(plain, "the vector is missing: the output is the base layer's alone.")]
            if feedforward:
                mistakes += [((x * l) @ W.T, "the bias is still added after the layer: only the input is scaled.")]
                if d_in == d_out:
                    mistakes += [((x * l) @ W.T + l * b, "the vector scales the input only; the bias is added "
                                                         "unscaled."),
                                 (l * plain, "a feed-forward layer scales its input, not its output."),
                                 ((x * l) @ W + b, "W is stored (d_out, d_in), as in nn.Linear: x W^T.")]
            else:
                mistakes += [(l * (x @ W.T) + b, "the vector scales the layer's whole output, the bias too.")]
                if d_in == d_out:
                    mistakes += [((x * l) @ W.T + b, "this layer has an output vector: it scales what the layer "
                                                     "gives, not what it reads."),
                                 (l * (x @ W + b), "W is stored (d_out, d_in), as in nn.Linear: x W^T.")]
        got = call(student_fn, x.clone(), W.clone(), b.clone(), l.clone(), feedforward, name="ia3_forward",
                   hint=FORWARD_HINT)
        expect_tensor(got, want, f"ia3_forward's output for {_side(feedforward)}, x of shape {tuple(x.shape)}, W "
                                 f"{d_out} x {d_in}", mistakes, FORWARD_HINT)
    passed(f"ia3_forward matches ml.IA3Layer on {len(trials)} random layers, both sides.")


# ----------------------------------------------------------------------------- 3. which vector each module gets

SHAPES_HINT = ("a module gets a vector when its name matches target_modules (a list entry matches the name itself "
               "or a name ending in '.' + the entry; one string is a regular expression for the whole name). It is "
               "(1, d_in) when the name also matches feedforward_modules, by the same rule, and (d_out, 1) otherwise.")


class _Toy(nn.Module):
    """Names on which matching by the exact rule, by a bare suffix and by a substring give different modules."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"k_proj": nn.Linear(8, 4), "v_proj": nn.Linear(8, 4), "proj": nn.Linear(4, 8)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 12), "proj": nn.Linear(12, 8)})
        self.head = nn.Linear(8, 6)


def _small_model(g, kind: str) -> nn.Module:
    if kind == "toy":
        return _Toy()
    cfg = get_config("decoder-tiny", vocab_size=32, d_model=16, d_ff=_choice(g, [24, 32, 40]), n_heads=4,
                     n_kv_heads=2, max_seq_len=16, n_layers=_randint(g, 1, 3))
    return DecoderLM(cfg)


def _shapes_by(model, names, feedforward, matches) -> dict[str, tuple[int, int]]:
    """The answer for these wrapped modules if feedforward_modules matched by another (wrong) rule, for the hints."""
    modules = dict(model.named_modules())
    return {name: (1, modules[name].in_features) if matches(feedforward, name) else (modules[name].out_features, 1)
            for name in names}


def _bare_suffix(patterns, name):
    return bool(patterns) and not isinstance(patterns, str) and any(name.endswith(p) for p in patterns)


@checker
def ia3_vector_shapes(student_fn, seed: int | None = None) -> None:
    """Exercise 3: ia3_vector_shapes(model, target_modules, feedforward_modules) -> {name: shape of its vector}."""
    g = _generator(seed)
    cases = [("decoder", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
             ("decoder", ["q_proj", "up_proj", "gate_proj", "down_proj"], ["up_proj", "down_proj"]),
             ("toy", ["proj", "k_proj"], ["proj"]), ("toy", ["v_proj", "up_proj", "proj"], ["up_proj"]),
             ("decoder", r".*\.layers\.0\..*(k|v|down)_proj", ["down_proj"]),
             ("decoder", ["mlp.down_proj", "self_attn.v_proj"], ["mlp.down_proj"])]
    for kind, targets, feedforward in cases:
        model = _small_model(g, kind)
        config = IA3Config(target_modules=copy.copy(targets), feedforward_modules=list(feedforward))
        injected = inject(copy.deepcopy(model), config)
        want = {name: tuple(m.ia3_l["default"].shape) for name, m in injected.named_modules()
                if isinstance(m, IA3Layer)}

        got = call(student_fn, copy.deepcopy(model), copy.copy(targets), list(feedforward), name="ia3_vector_shapes",
                   hint=SHAPES_HINT)
        what = f"ia3_vector_shapes(model, {targets!r}, {feedforward!r}) on a {type(model).__name__}"
        if not isinstance(got, dict) or not all(isinstance(k, str) for k in got):
            raise ExerciseError(f"{what} should return a dict from module names to shapes, got {type(got).__name__}. "
                                "Hint: collect the names from model.named_modules().")
        try:
            got = {k: tuple(int(s) for s in v) for k, v in got.items()}
        except (TypeError, ValueError):
            raise ExerciseError(f"{what}: every value should be a shape, a tuple of two ints such as (64, 1). "
                                f"Hint: {SHAPES_HINT}") from None
        if got == want:
            continue
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            example = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} should not be there"
            if isinstance(targets, str):
                hint = ("target_modules is one string here, so it is a regular expression that must match the "
                        "whole name (re.fullmatch), not a list of names.")
            elif missing:
                hint = ("a list entry matches every module whose name ends with '.' + the entry, in every block, "
                        "not only a name equal to it.")
            else:
                hint = ("a list entry matches a name equal to it or ending with '.' + the entry; a name that merely "
                        "contains it, or ends with it without the dot, does not match.")
            raise ExerciseError(f"{what}: expected vectors on {len(want)} modules, got {len(got)}; for instance "
                                f"{example}. Hint: {hint}")
        wrong = next(n for n in want if got[n] != want[n])
        shape, expected = got[wrong], want[wrong]
        is_feedforward = expected == (1, dict(model.named_modules())[wrong].in_features)
        if got == _shapes_by(model, want, feedforward, _bare_suffix):
            hint = ("feedforward_modules matches names by the same rule as target_modules: the name itself or a name "
                    "ending in '.' + the entry, not any name that ends with the entry's letters.")
        elif got == {n: (s[1], s[0]) for n, s in want.items()} or shape in ((expected[1], 1), (1, expected[0])):
            hint = ("the vector is shaped to broadcast against W (d_out, d_in): one row per output, (d_out, 1), "
                    "or one column per input, (1, d_in).")
        elif not is_feedforward:
            hint = ("only the modules that match feedforward_modules scale their input, and they match by the same "
                    "rule as target_modules: the name itself or a name ending in '.' + the entry.")
        else:
            hint = ("a module that matches feedforward_modules (by the same rule as target_modules) scales its "
                    "input: its vector has d_in entries.")
        raise ExerciseError(f"{what}: {wrong!r} should get a vector of shape {expected}, got {shape}. Hint: {hint}")
    passed(f"ia3_vector_shapes gives the vectors ml.inject creates for {len(cases)} target lists, both sides.")


# ----------------------------------------------------------------------------- 4. merge and unmerge

MERGE_HINT = ("merging folds the vector into the layer, so that the plain layer x W'^T + b' computes what the IA³ "
              "layer did. Write the IA³ layer's output as x times one matrix plus one bias: along which axis of W "
              "(d_out, d_in) does the vector line up, one entry per output or one per input, and does it ever "
              "reach the bias? Unmerging undoes what merging did.")


@checker
def ia3_merge_unmerge(merge_fn, unmerge_fn, seed: int | None = None) -> None:
    """Exercise 4: ia3_merge(W, b, l, feedforward) -> (W', b'); ia3_unmerge(W', b', l, feedforward) -> (W, b)."""
    g = _generator(seed)
    trials = [(16, 16, False, torch.float32), (16, 16, True, torch.float32), (12, 20, False, torch.float64),
              (20, 12, True, torch.float64)]
    for d_in, d_out, feedforward, dtype in trials:
        W, b, l_out, l_in = _random_layer(g, d_in, d_out, dtype=dtype)
        l = l_in if feedforward else l_out
        layer = _ia3_layer(W, b, {"default": l}, feedforward)
        layer.merge()
        W_merged, b_merged = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
        what = f"for {_side(feedforward)}, W {d_out} x {d_in} ({str(dtype).removeprefix('torch.')})"

        got = call(merge_fn, W.clone(), b.clone(), l.clone(), feedforward, name="ia3_merge", hint=MERGE_HINT)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ExerciseError(f"ia3_merge should return two tensors, (W', b'), got {type(got).__name__}. "
                                f"Hint: {MERGE_HINT}")
        w_mistakes = [(W, "W is unchanged: merging must fold the vector into it.")]
        if d_in == d_out:
            w_mistakes.append((W * l.view(1, -1) if not feedforward else W * l.view(-1, 1),
                               "the vector scales the other axis of W: which axis of W (d_out, d_in) has one "
                               "entry per output of the layer, and which one per input?"))
        if feedforward:
            b_mistakes = [(b * l, "an input vector scales what the layer reads; the bias is added after the "
                                  "product, unscaled.")] if d_in == d_out else []
        else:
            b_mistakes = [(b, "an output vector scales the bias too, since it multiplies the layer's whole output.")]
        expect_tensor(got[0], W_merged, f"the merged weight {what}", w_mistakes, MERGE_HINT)
        expect_tensor(got[1], b_merged, f"the merged bias {what}", b_mistakes, MERGE_HINT)

        layer.unmerge()
        back = call(unmerge_fn, W_merged.clone(), b_merged.clone(), l.clone(), feedforward, name="ia3_unmerge",
                    hint=MERGE_HINT)
        if not isinstance(back, (tuple, list)) or len(back) != 2:
            raise ExerciseError(f"ia3_unmerge should return two tensors, (W, b), got {type(back).__name__}. "
                                f"Hint: {MERGE_HINT}")
        side = l.view(1, -1) if feedforward else l.view(-1, 1)
        expect_tensor(back[0], layer.base_layer.weight.detach(), f"the unmerged weight {what}",
                      [(W_merged * side, "unmerging divides by the vector; multiplying scales W a second time."),
                       (W_merged, "the weight is still the merged one.")], MERGE_HINT)
        if feedforward:
            b_mistakes = [(b_merged / l, "an input vector never touched the bias, so there is nothing to undo.")] \
                if d_in == d_out else []
        else:
            b_mistakes = [(b_merged * l, "unmerging divides by the vector; multiplying scales the bias a second time."),
                          (b_merged, "the bias is still the merged one: the output vector scaled it too.")]
        expect_tensor(back[1], layer.base_layer.bias.detach(), f"the unmerged bias {what}", b_mistakes, MERGE_HINT)
    passed(f"ia3_merge and ia3_unmerge agree with ml.IA3Layer.merge and unmerge on {len(trials)} random layers.")


# ----------------------------------------------------------------------------- 5. stretch: a mixed batch

MIXED_HINT = ("example i of the batch goes through the layer with the vector of adapter names[i]; \"__base__\" "
              "means the base layer alone, with no vector. Each example uses one vector, on the layer's side.")


@checker
def ia3_mixed_batch(student_fn, seed: int | None = None) -> None:
    """Exercise 5: ia3_mixed_batch(x, W, vectors, names, feedforward) -> one output per example, each with its own
    adapter's vector (or none for "__base__")."""
    g = _generator(seed)
    trials = [(16, 16, False), (16, 16, True), (12, 20, False), (20, 12, True)]
    for d_in, d_out, feedforward in trials:
        W, _, _, _ = _random_layer(g, d_in, d_out, bias=False)
        size = d_in if feedforward else d_out
        vectors = {name: torch.rand(size, generator=g) + 0.5 for name in ("summarise", "translate", "classify")}
        names = ["translate", "__base__", "summarise", "translate", "classify", "__base__"]
        names = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
        while names[0] == "__base__":  # the first example has an adapter, so "everyone uses names[0]" shows
            names = names[1:] + names[:1]
        x = torch.randn(len(names), _randint(g, 2, 5), d_in, generator=g)
        layer = _ia3_layer(W, None, vectors, feedforward)
        with torch.no_grad():
            want = layer.mixed_batch_forward(x, names)
            ones = torch.ones(size)
            stack = torch.stack([vectors.get(n, ones) for n in names]).unsqueeze(1)  # (N, 1, size)
            product = vectors["summarise"] * vectors["translate"] * vectors["classify"]
            apply = (lambda s: (x * s) @ W.T) if feedforward else (lambda s: s * (x @ W.T))
            other = (lambda s: s * (x @ W.T)) if feedforward else (lambda s: (x * s) @ W.T)
            mistakes = [
                (apply(vectors[names[0]]), "every example used the first example's adapter; each has its own."),
                (apply(product), "the vectors of all adapters were multiplied together, as for several active "
                                 "adapters; in a mixed batch each example uses one."),
                (x @ W.T, "no vector was applied: only the \"__base__\" examples skip theirs."),
            ]
            if d_in == d_out:
                mistakes.append((other(stack), "the right vectors, on the wrong side of the layer."))
        got = call(student_fn, x.clone(), W.clone(), {k: v.clone() for k, v in vectors.items()}, list(names),
                   feedforward, name="ia3_mixed_batch", hint=MIXED_HINT)
        expect_tensor(got, want, f"ia3_mixed_batch's output for {_side(feedforward)}, names {names}", mistakes,
                      MIXED_HINT)
    passed(f"ia3_mixed_batch equals ml.IA3Layer's mixed-batch forward on {len(trials)} random batches, both sides.")
