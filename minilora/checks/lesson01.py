"""Checkers for lesson 01 (LoRA)'s exercises (the machinery and how to write one: core.py)."""

import copy
import math

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from minilora import DecoderLM, LoraConfig, LoraLayer, Seq2SeqLM, get_config, inject, trainable_report

from .core import (call, checker, ExerciseError, expect_int, expect_parameters, expect_tensor, parameter_grad, passed,
                   _choice, _clones, _generator, _linear, _linear_shapes, _package_layer, _randint, _random_lora)

# ----------------------------------------------------------------------------- 1. counting parameters

COUNT_HINT = ("every targeted matrix W (d_out × d_in) in every layer gets A (r × d_in) and B (d_out × r); "
              "q_proj has n_heads·head_dim outputs, k_proj and v_proj n_kv_heads·head_dim, and the MLP "
              "matrices map d_model to d_ff and back.")


@checker
def lora_param_count(student_fn, seed: int | None = None) -> None:
    """Exercise 1: lora_param_count(cfg, r, targets) -> the number of parameters LoRA trains."""
    g = _generator(seed)
    target_sets = [["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"], ["v_proj", "gate_proj", "up_proj"],
                   ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
    for targets in target_sets:
        n_heads = _choice(g, [2, 4])
        cfg = get_config("decoder-tiny", vocab_size=32, max_seq_len=16, n_layers=_randint(g, 2, 4),
                         n_heads=n_heads, n_kv_heads=n_heads // 2, d_model=n_heads * _choice(g, [8, 12]),
                         d_ff=8 * _randint(g, 3, 6))  # grouped-query attention: k and v are narrower than q
        r = _choice(g, [2, 4, 8])
        model = DecoderLM(cfg)
        shapes = _linear_shapes(model)
        want = trainable_report(inject(model, LoraConfig(r=r, target_modules=targets)), verbose=False).trainable

        got = call(student_fn, copy.deepcopy(cfg), r, list(targets), name="lora_param_count", hint=COUNT_HINT)
        expect_int(got, "lora_param_count")
        if got == want:
            continue
        case = (f"n_layers={cfg.n_layers}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
                f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, d_ff={cfg.d_ff}, r={r}, targets={targets}")
        per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
        no_gqa = {**shapes, "k_proj": (cfg.d_model, cfg.n_heads * cfg.head_dim),
                  "v_proj": (cfg.d_model, cfg.n_heads * cfg.head_dim)}
        mistakes = [
            (per_layer, "that is the count for one layer; every layer has its own adapters."),
            (cfg.n_layers * sum(r * (no_gqa[t][0] + no_gqa[t][1]) for t in targets),
             "with grouped-query attention (n_kv_heads < n_heads) k_proj and v_proj have fewer outputs than "
             "q_proj: n_kv_heads·head_dim."),
            (cfg.n_layers * sum(shapes[t][0] * shapes[t][1] for t in targets),
             "that is the size of the full matrices, which full fine-tuning would train; LoRA trains two "
             "thin factors per matrix instead."),
            (cfg.n_layers * sum(r * shapes[t][0] * shapes[t][1] for t in targets),
             "A and B together hold r·d_in + d_out·r numbers, not r·d_in·d_out."),
            (cfg.n_layers * sum(r * shapes[t][0] for t in targets), "count B too, not only A."),
            (cfg.n_layers * sum(r * shapes[t][1] for t in targets), "count A too, not only B."),
        ]
        hint = next((h for wrong, h in mistakes if got == wrong), None)
        if hint is None and per_layer and got % per_layer == 0:
            hint = "your total is a whole number of layers' worth, but not n_layers of them."
        off = "too large: it counts numbers that LoRA does not train" if got > want else \
            "too small: some trainable numbers are missing"
        raise ExerciseError(f"lora_param_count for {case}: got {got:,}, which is {off}. "
                            f"Hint: {hint or COUNT_HINT}")

    llama = get_config("llama-7b")
    n = call(student_fn, llama, 8, ["q_proj", "v_proj"], name="lora_param_count", hint=COUNT_HINT)
    full = llama.num_parameters()
    passed(f"lora_param_count agrees with the package on {len(target_sets)} random models.")
    print(f"  llama-7b, r=8 on q_proj, v_proj: {n:,} trainable parameters against {full:,} for full "
          f"fine-tuning, {100 * n / full:.3f}% ({full / n:,.0f} times fewer).")


# ----------------------------------------------------------------------------- 2. the forward pass

FORWARD_HINT = ("h = W x + b + (alpha / r) B (A x), for every row of x. W is (d_out, d_in) and A (r, d_in), "
                "as in nn.Linear, B is (d_out, r), and x is (..., d_in) with any number of leading dimensions "
                "(@ and nn.functional.linear handle those).")
_MATMULS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum", "linear", "tensordot", "multi_dot",
            "addmm", "chain_matmul"}


class _WatchProducts(TorchFunctionMode):
    """Notes whether any matrix product inside the block returned a tensor of one of `shapes`."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.seen = shapes, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _MATMULS and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
            self.seen = True
        return out


def _scaling_mistakes(alpha, r, with_scale) -> list[tuple[torch.Tensor, str]]:
    """What the result would be with each common wrong scaling of the update, and the hint for it."""
    return [
        (with_scale(1.0), "the update is missing its scaling: the paper multiplies B A by alpha / r "
                          "(section 4.1)."),
        (with_scale(alpha), "the update is scaled by alpha alone; the scaling also depends on the rank r."),
        (with_scale(alpha * r), "the update is scaled by alpha times r; look again at how the rank enters "
                                "the scaling."),
        (with_scale(r / alpha), "the update's scaling is upside down."),
        (with_scale(alpha / math.sqrt(r)), "that is rsLoRA's scaling (the stretch exercise); plain LoRA's "
                                           "scaling is the one in the equation above."),
    ]


@checker
def lora_forward(student_fn, seed: int | None = None) -> None:
    """Exercise 2: lora_forward(x, W, b, A, B, alpha, r) -> h = W x + b + (alpha / r) B (A x)."""
    g = _generator(seed)
    formed_BA = False
    # (leading dims of x, dtype, square W): the square trial lets a transposed update keep the right shape
    trials = [((7,), torch.float32, True), ((5,), torch.float32, False), ((2, 3), torch.float64, False),
              ((3, 2), torch.float32, False)]
    for lead, dtype, square in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3, 4]))  # never alpha = r, so a missing scaling shows
        d_in = _choice(g, [12, 16, 24])
        d_out = d_in if square else d_in + 4 * _randint(g, 1, 3)
        W, b, A, B = _random_lora(g, d_in, d_out, r, dtype)
        x = torch.randn(*lead, d_in, generator=g, dtype=dtype)
        with torch.no_grad():
            want = _package_layer(W, b, A, B, alpha, r)(x)

        watch = _WatchProducts({(d_out, d_in), (d_in, d_out)})
        with watch:
            got = call(student_fn, *_clones(x, W, b, A, B), alpha, r, name="lora_forward", hint=FORWARD_HINT)
        formed_BA |= watch.seen and not square

        base = x @ W.T + b
        update = (x @ A.T) @ B.T
        mistakes = [(base + wrong, h) for wrong, h in _scaling_mistakes(alpha, r, lambda s: s * update)]
        mistakes += [
            (x @ W.T + alpha / r * update, "the bias b is missing."),
            (base, "the output is W x + b alone: the adapter's update is missing."),
        ]
        if square:
            mistakes += [
                (base + alpha / r * (x @ B) @ A, "the update has the right size but is transposed: A acts first "
                                                 "and takes x's d_in features to r, then B takes r to d_out."),
                (x @ W + b + alpha / r * update, "W is stored (d_out, d_in), as in nn.Linear, and x holds one "
                                                 "example per row: check how W is applied."),
            ]
        expect_tensor(got, want, f"lora_forward's output for x of shape {tuple(x.shape)} ({dtype})", mistakes,
                      FORWARD_HINT)

    passed(f"lora_forward matches ml.LoraLayer on {len(trials)} random layers (float32 and float64).")
    if formed_BA:
        print("  Note: your function forms the d_out × d_in matrix B A. The numbers are right, but training "
              "computes B (A x): it costs r·(d_in + d_out) per example instead of d_in·d_out, and never stores "
              "a full-size matrix.")


# ----------------------------------------------------------------------------- 3. which modules get wrapped

WRAPPED_HINT = ("inject wraps the nn.Linear modules whose full name (from model.named_modules()) matches: a list "
                "entry matches a name that is exactly the entry or ends with '.' + the entry; one string is a "
                "regular expression that must match the whole name.")


def _small_model(g, kind: str) -> nn.Module:
    if kind == "toy":  # names where "contains the entry" and "ends with '.' + the entry" differ
        return nn.ModuleDict({"proj": nn.Linear(8, 8), "block": nn.ModuleDict(
            {"proj": nn.Linear(8, 8), "out_proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})})
    if kind == "decoder":
        cfg = get_config("decoder-tiny", vocab_size=32, d_model=16, d_ff=32, max_seq_len=16,
                         n_layers=_randint(g, 1, 3))
        return DecoderLM(cfg)
    cfg = get_config("seq2seq-tiny", vocab_size=32, d_model=16, d_ff=32, max_seq_len=16,
                     n_layers=_randint(g, 1, 2), n_encoder_layers=_randint(g, 1, 2))
    return Seq2SeqLM(cfg)


@checker
def wrapped_modules(student_fn, seed: int | None = None) -> None:
    """Exercise 3: wrapped_modules(model, target_modules) -> the names of the modules inject would wrap."""
    g = _generator(seed)
    cases = [("decoder", ["q_proj", "v_proj"]), ("toy", ["proj"]), ("seq2seq", ["q_proj", "v_proj"]),
             ("seq2seq", ["self_attn.q_proj", "cross_attn.v_proj"]), ("decoder", ["down_proj", "lm_head"]),
             ("decoder", r".*\.layers\.0\..*_proj"), ("seq2seq", r"decoder\..*\.(k|v)_proj")]
    for kind, targets in cases:
        model = _small_model(g, kind)
        injected = inject(copy.deepcopy(model), LoraConfig(r=1, target_modules=copy.copy(targets)))
        want = {name for name, m in injected.named_modules() if isinstance(m, LoraLayer)}

        got = call(student_fn, copy.deepcopy(model), copy.copy(targets), name="wrapped_modules", hint=WRAPPED_HINT)
        if not isinstance(got, (list, tuple, set)) or not all(isinstance(n, str) for n in got):
            raise ExerciseError(f"wrapped_modules should return a list of module names (strings), got "
                                f"{type(got).__name__}. Hint: collect the names from model.named_modules().")
        got = list(got)
        what = f"wrapped_modules(model, {targets!r}) on a {type(model).__name__}"
        if len(set(got)) != len(got):
            raise ExerciseError(f"{what} lists some names more than once. Hint: each module is wrapped once.")
        missing, extra = sorted(want - set(got)), sorted(set(got) - want)
        if not missing and not extra:
            continue
        example = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} should not be there"
        modules = dict(model.named_modules())
        not_linear = [n for n in extra if not isinstance(modules.get(n), nn.Linear)]
        if isinstance(targets, str):
            hint = ("target_modules is one string here, so it is a regular expression that must match the whole "
                    "name (re.fullmatch), not a list of names.")
        elif not_linear:
            hint = (f"only linear layers are wrapped, and {not_linear[0]!r} is a "
                    f"{type(modules.get(not_linear[0])).__name__}." if not_linear[0] in modules else
                    f"{not_linear[0]!r} is not a module of this model; use the names model.named_modules() gives.")
        elif missing:
            hint = ("a list entry matches every module whose name ends with '.' + the entry, in every layer and "
                    "every stack (encoder, decoder, cross-attention), not only a name equal to it.")
        else:
            hint = ("a list entry matches a name equal to it or ending with '.' + the entry; a name that merely "
                    "contains it, or ends with it without the dot, does not match.")
        raise ExerciseError(f"{what}: expected {len(want)} module names, got {len(got)}; for instance {example}. "
                            f"Hint: {hint}")
    passed(f"wrapped_modules picks the same modules as ml.inject for {len(cases)} target lists on random models.")


# ----------------------------------------------------------------------------- 4. merge and unmerge

MERGE_HINT = ("merging folds the update into the weight: W' = W + delta W with delta W = (alpha / r) B A, the "
              "same shape as W (d_out, d_in); unmerging takes the same delta W away again.")


@checker
def merge_unmerge(merge_fn, unmerge_fn, seed: int | None = None) -> None:
    """Exercise 4: merge_weight(W, A, B, alpha, r) -> W'; unmerge_weight(W', A, B, alpha, r) -> W."""
    g = _generator(seed)
    trials = [(torch.float32, True), (torch.float32, False), (torch.float64, False)]
    for dtype, square in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3, 4]))
        d_in = _choice(g, [12, 16, 24])
        d_out = d_in if square else d_in + 4 * _randint(g, 1, 3)
        W, _, A, B = _random_lora(g, d_in, d_out, r, dtype)
        layer = _package_layer(W, None, A, B, alpha, r)
        layer.merge()
        want_merged = layer.base_layer.weight.detach().clone()
        layer.unmerge()
        want_restored = layer.base_layer.weight.detach().clone()

        merged = call(merge_fn, *_clones(W, A, B), alpha, r, name="merge_weight", hint=MERGE_HINT)
        mistakes = [(W + wrong, h) for wrong, h in _scaling_mistakes(alpha, r, lambda s: s * (B @ A))]
        mistakes += [(W, "merge_weight returned W unchanged: the update is missing.")]
        if square:
            mistakes += [(W + alpha / r * (B @ A).T, "delta W is transposed: B A is (d_out, d_in), like W, and "
                                                     "so is delta W for nn.Linear.")]
        expect_tensor(merged, want_merged, f"merge_weight's result for W of shape {tuple(W.shape)} ({dtype})",
                      mistakes, MERGE_HINT)

        restored = call(unmerge_fn, want_merged.clone(), *_clones(A, B), alpha, r, name="unmerge_weight",
                        hint=MERGE_HINT)
        mistakes = [(want_merged - wrong, h) for wrong, h in _scaling_mistakes(alpha, r, lambda s: s * (B @ A))]
        mistakes += [
            (want_merged, "unmerge_weight returned the merged weight unchanged."),
            (want_merged + alpha / r * (B @ A), "unmerge_weight adds delta W a second time; it should undo "
                                                "merge_weight, so that unmerge(merge(W)) is W again."),
        ]
        expect_tensor(restored, want_restored, f"unmerge_weight's result for W of shape {tuple(W.shape)} ({dtype})",
                      mistakes, MERGE_HINT)
    passed(f"merge_weight and unmerge_weight agree with LoraLayer.merge / unmerge on {len(trials)} random "
           "layers, and unmerging gives W back.")


# ----------------------------------------------------------------------------- 5. stretch: a LoRA linear with rsLoRA

LORA_LINEAR_HINT = ("LoraLinear(base, r, alpha, use_rslora) keeps base frozen, holds self.lora_A (r × d_in) and "
                    "self.lora_B (d_out × r) as nn.Parameter, and computes base(x) + scaling · B (A x), with "
                    "scaling alpha / r, or rsLoRA's alpha / sqrt(r) when use_rslora is True.")


@checker
def lora_linear(student_cls, seed: int | None = None) -> None:
    """Exercise 5: a from-scratch LoRA linear module, plain and rsLoRA, against ml.LoraLayer."""
    g = _generator(seed)
    trials = [False, True, True, False]  # use_rslora
    for use_rslora in trials:
        r = _choice(g, [4, 8, 16])  # r >= 4, so that alpha / r and alpha / sqrt(r) differ clearly
        alpha = float(r * _choice(g, [1.5, 2, 3]))
        d_in = _choice(g, [16, 20, 24])
        d_out = d_in + 4 * _randint(g, 1, 3)
        W, b, A, B = _random_lora(g, d_in, d_out, r)
        x = torch.randn(2, 3, d_in, generator=g)
        base = _linear(W, b)
        name = f"LoraLinear(base, r={r}, alpha={alpha:g}, use_rslora={use_rslora})"
        module = call(student_cls, base, r, alpha, use_rslora, name=name, hint=LORA_LINEAR_HINT)

        expect_parameters(module, name, {"lora_A": (r, d_in), "lora_B": (d_out, r)},
                          "nn.Parameter(torch.empty(...)) registers a tensor as a trainable parameter of the module.",
                          LORA_LINEAR_HINT)
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if sorted(trainable) != ["lora_A", "lora_B"]:
            raise ExerciseError(f"{name} trains {trainable}, expected exactly lora_A and lora_B. Hint: LoRA freezes "
                                "the base layer (requires_grad_(False) on its weight and bias) and trains only "
                                "A and B.")

        with torch.no_grad():
            start = call(module, x, name="LoraLinear.forward", hint=LORA_LINEAR_HINT)
            expect_tensor(start, base(x), "LoraLinear's output at initialisation", [],
                          "B starts at zero, so at initialisation the layer computes exactly what the base did "
                          "(section 4.1).")
            if not module.lora_A.abs().sum() > 0:
                raise ExerciseError(f"{name}.lora_A starts at zero. Hint: A must start random (peft uses "
                                    "Kaiming-uniform, the paper a Gaussian); with A and B both zero, neither gets "
                                    "a gradient and nothing trains.")
            module.lora_A.copy_(A)  # pretend it has been trained
            module.lora_B.copy_(B)
        layer = _package_layer(W, b, A, B, alpha, r, use_rslora=use_rslora)
        want = layer(x)
        got = call(module, x, name="LoraLinear.forward", hint=LORA_LINEAR_HINT)
        base_out, update = x @ W.T + b, (x @ A.T) @ B.T
        mistakes = [(base_out + s * update, h) for s, h in [
            (alpha / r, "with use_rslora=True the scaling is rsLoRA's, which divides alpha by a different "
                        "function of r (Kalajdzievski 2023, section 3)."),
            (alpha / math.sqrt(r), "with use_rslora=False the scaling is plain LoRA's, alpha / r."),
            (1.0, "the update is missing its scaling."),
        ] if not math.isclose(s, layer.scaling["default"])]
        expect_tensor(got, want.detach(), f"{name}'s output", mistakes, LORA_LINEAR_HINT)

        grad_out = torch.randn(want.shape, generator=g)
        (want * grad_out).sum().backward()
        (got * grad_out).sum().backward()
        for attr in ("lora_A", "lora_B"):
            grad = parameter_grad(module, name, attr)
            expect_tensor(grad, getattr(layer, attr)["default"].weight.grad, f"the gradient of {attr}", [],
                          "the output must depend on A and B exactly as in the forward equation.")
    passed("LoraLinear matches ml.LoraLayer: it starts at the base model, trains only A and B, and gives the "
           "same outputs and gradients with plain and rsLoRA scaling.")
