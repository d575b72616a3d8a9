"""Checkers for the exercise notebooks (notebooks/exercises/, answers in notebooks/solutions/).

Each checker takes the function (or class) a student wrote, runs it on fresh random inputs, and compares
what comes back with what the package computes on the same inputs. The package is the reference, so a
checker never holds the answer itself.

    from minilora import checks
    checks.lora_forward(lora_forward)   # one line starting with ✓ when it agrees, ExerciseError when not

A failed check raises `ExerciseError` (an AssertionError, so nbgrader scores the cell 0 and pytest reports
it as a failed assert). Its message is one plain paragraph: what was expected, what came back, and a hint
that points at the idea, never at the code that fixes it. A notebook shows only that message, without a
traceback. Three failures every checker reports in the same words:
  - the student's code raised: "lora_forward raised RuntimeError: <its message> (line 3: `h = x @ A`)";
  - it is still nbgrader's placeholder (`raise NotImplementedError()`): "... is not implemented yet";
  - a tensor has the wrong shape or dtype: "... has the wrong shape: expected (5, 32), got (5, 64)".

Writing a checker for a new exercise (each lesson adds its own section at the end of this file):
  1. Decorate the checker with `@checker`, which puts torch's global random state back afterwards, and
     draw inputs from `_generator(seed)`, never from the global generator: the student's seeded cells stay
     undisturbed, every run sees new inputs, and tests can pass a seed to repeat one.
  2. Compute the expected result with the package (the layer, `inject`, a model), not with a formula
     written again here.
  3. Call the student's code only through `call(fn, *args, name=..., hint=...)`.
  4. Compare with `expect_tensor` (type, shape, dtype, then values) or raise `ExerciseError` yourself.
     Where a wrong answer is common (the scaling left out, B A transposed), compute it too and, when the
     student's result matches it, give the hint that names that idea.
  5. Finish with `passed("...")`, one short line.
  6. In tests/test_checks.py, show that the package's own answer passes and that each plausible wrong
     answer fails with its hint.
"""

import copy
import functools
import math
import numbers
import sysconfig
import traceback
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from minilora import (DecoderLM, Linear4bit, LoraConfig, LoraLayer, LoraLinear4bit, Seq2SeqLM, dequantize,
                      get_config, inject, quantize, trainable_report)
from minilora.methods.nf4 import nf4_codebook

# Float32 sums of a few hundred products round to ~1e-7 relative; 1e-5 leaves a wide margin, and every
# wrong answer the hints describe is off by 1e-2 or more.
TOLERANCE = 1e-5


class ExerciseError(AssertionError):
    """A check that failed, with a message written for the student."""

    def _render_traceback_(self):  # IPython calls this instead of printing the traceback
        return [f"{type(self).__name__}: {self}"]


def passed(message: str) -> None:
    print("✓", message)


def checker(fn):
    """Run a checker with torch's global random state saved and restored: building reference layers draws
    from it, and a student's seeded cells further down must see the numbers they saw before."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)
    return run


def _generator(seed: int | None) -> torch.Generator:
    """A private random generator: seeded when a test asks for it, fresh on every call otherwise."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _choice(g: torch.Generator, options: list):
    return options[_randint(g, 0, len(options) - 1)]


# ----------------------------------------------------------------------------- calling the student's code

_LIBRARY_DIRS = tuple(str(Path(p).resolve()) for p in {
    Path(__file__).parent, Path(torch.__file__).parent,
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def _students_line(error: BaseException) -> str:
    """' (line 3: `h = x @ A`)' for the deepest line of the student's own code in the traceback, or ''."""
    frames = traceback.extract_tb(error.__traceback__)[1:]  # frame 0 is call() itself
    own = [f for f in frames if not str(Path(f.filename).resolve()).startswith(_LIBRARY_DIRS)]
    if not own or not own[-1].line:
        return ""
    return f" (line {own[-1].lineno}: `{own[-1].line.strip()}`)"


def call(fn, *args, name: str, hint: str):
    """fn(*args), with any exception it raises turned into one plain ExerciseError."""
    try:
        return fn(*args)
    except ExerciseError:
        raise
    except NotImplementedError:
        raise ExerciseError(f"{name} is not implemented yet: replace `raise NotImplementedError()` with your "
                            f"code. Hint: {hint}") from None
    except Exception as error:
        message = " ".join(str(error).split())  # torch's messages can span several lines
        if len(message) > 300:
            message = message[:300] + " ..."
        raise ExerciseError(f"{name} raised {type(error).__name__}: {message}{_students_line(error)}. "
                            f"Hint: {hint}") from None


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the whole tensor, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def expect_tensor(got, want: torch.Tensor, what: str, mistakes: list[tuple[torch.Tensor, str]], hint: str) -> None:
    """Raise ExerciseError unless `got` is a tensor with want's shape, dtype and values.

    `mistakes` are (result of a common wrong answer, hint about it): when the values are wrong and match one
    of them, its hint is given instead of the general `hint`."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{what} should be a torch.Tensor, got {type(got).__name__}. Hint: {hint}")
    if got.shape != want.shape:
        raise ExerciseError(f"{what} has the wrong shape: expected {tuple(want.shape)}, got {tuple(got.shape)}. "
                            f"Hint: {hint}")
    if got.dtype != want.dtype:
        raise ExerciseError(f"{what} has the wrong dtype: expected {want.dtype}, the dtype of the inputs, got "
                            f"{got.dtype}. Hint: torch keeps the inputs' dtype through @, + and *, so there is "
                            "no need to convert anything (no .float(), no new tensors of the default dtype).")
    error = _relative_error(got, want)
    if error <= TOLERANCE:
        return
    for wrong, mistake_hint in mistakes:
        if wrong.shape == got.shape and _relative_error(got, wrong) <= TOLERANCE:
            raise ExerciseError(f"{what} has the right shape but the wrong values. Hint: {mistake_hint}")
    raise ExerciseError(f"{what} has the right shape but the wrong values (relative error {error:.2g}). "
                        f"Hint: {hint}")


def _package_layer(W, b, A, B, alpha, r, use_rslora=False) -> LoraLayer:
    """An ml.LoraLayer holding exactly these W, b, A and B (the reference for a hand-written layer)."""
    d_out, d_in = W.shape
    base = nn.Linear(d_in, d_out, bias=b is not None, dtype=W.dtype)
    layer = LoraLayer(base)
    layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, use_rslora=use_rslora, target_modules=["layer"]))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        base.weight.copy_(W)
        if b is not None:
            base.bias.copy_(b)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    base.requires_grad_(False)
    return layer


def _random_lora(g, d_in, d_out, r, dtype=torch.float32):
    """W, b, A, B with the update s B A x about as large as W x, so leaving out any term shows."""
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype) / math.sqrt(d_in)
    b = torch.randn(d_out, generator=g, dtype=dtype)
    A = torch.randn(r, d_in, generator=g, dtype=dtype) / math.sqrt(d_in)
    B = torch.randn(d_out, r, generator=g, dtype=dtype) / math.sqrt(r)
    return W, b, A, B


def _clones(*tensors):
    return [t.clone() for t in tensors]


# ============================================================================= lesson 01: LoRA

# ----------------------------------------------------------------------------- 1. counting parameters

COUNT_HINT = ("every targeted matrix W (d_out × d_in) in every layer gets A (r × d_in) and B (d_out × r); "
              "q_proj has n_heads·head_dim outputs, k_proj and v_proj n_kv_heads·head_dim, and the MLP "
              "matrices map d_model to d_ff and back.")


def _linear_shapes(model: DecoderLM) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection in a DecoderLM block, read from the model."""
    return {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
            for name, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}


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
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            raise ExerciseError(f"lora_param_count should return a whole number (int), got {type(got).__name__} "
                                f"{got!r}. Hint: sum Python ints, or call int(...) on the total.")
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
        base = nn.Linear(d_in, d_out)
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
        name = f"LoraLinear(base, r={r}, alpha={alpha:g}, use_rslora={use_rslora})"
        module = call(student_cls, base, r, alpha, use_rslora, name=name, hint=LORA_LINEAR_HINT)

        for attr, shape in (("lora_A", (r, d_in)), ("lora_B", (d_out, r))):
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter):
                raise ExerciseError(f"{name} should keep self.{attr} as an nn.Parameter of shape {shape}, got "
                                    f"{type(p).__name__}. Hint: nn.Parameter(torch.empty(...)) registers a tensor "
                                    "as a trainable parameter of the module.")
            if tuple(p.shape) != shape:
                raise ExerciseError(f"{name}.{attr} has the wrong shape: expected {shape}, got {tuple(p.shape)}. "
                                    f"Hint: {LORA_LINEAR_HINT}")
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
            grad = getattr(module, attr).grad
            if grad is None:
                raise ExerciseError(f"no gradient reached {name}.{attr}. Hint: the forward must use self.{attr} "
                                    "itself, not a copy, .detach() or .data, and not inside torch.no_grad().")
            expect_tensor(grad, getattr(layer, attr)["default"].weight.grad, f"the gradient of {attr}", [],
                          "the output must depend on A and B exactly as in the forward equation.")
    passed("LoraLinear matches ml.LoraLayer: it starts at the base model, trains only A and B, and gives the "
           "same outputs and gradients with plain and rsLoRA scaling.")


# ============================================================================= lesson 02: QLoRA and NF4

def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of the package's packed bytes, in order (the reference for the code exercises)."""
    return torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n]


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of `levels` to each value (a common wrong answer computes it on the wrong values)."""
    return (values.unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)


def _on_a_midpoint(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Where a scaled value sits so close to the midpoint of two levels that float rounding may pick either."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return (scaled.unsqueeze(-1) - midpoints).abs().amin(-1) < 1e-6


def _expect_codes(got, want: torch.Tensor, what: str, mistakes: list[tuple[torch.Tensor, str]], hint: str,
                  either: torch.Tensor | None = None) -> None:
    """Raise ExerciseError unless `got` is a uint8 tensor equal to `want` (except where `either` is True)."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{what} should be a torch.Tensor, got {type(got).__name__}. Hint: {hint}")
    if got.shape != want.shape:
        raise ExerciseError(f"{what} has the wrong shape: expected {tuple(want.shape)}, got {tuple(got.shape)}. "
                            f"Hint: {hint}")
    if got.dtype != torch.uint8:
        raise ExerciseError(f"{what} has the wrong dtype: expected torch.uint8 (one byte per entry), got {got.dtype}. "
                            "Hint: .to(torch.uint8) converts integer codes; shifts and | on uint8 tensors stay uint8.")
    wrong = got != want
    if either is not None:
        wrong &= ~either
    if not wrong.any():
        return
    for mistake, mistake_hint in mistakes:
        if mistake.shape == got.shape and torch.equal(got, mistake.to(got.dtype)):
            raise ExerciseError(f"{what} has the right shape but the wrong values. Hint: {mistake_hint}")
    first = int(wrong.nonzero()[0, 0])
    raise ExerciseError(f"{what} has the right shape but {int(wrong.sum())} of {want.numel()} entries are wrong "
                        f"(the first at index {first}). Hint: {hint}")


# ----------------------------------------------------------------------------- 1. bytes of a 4-bit weight

STORAGE_HINT = ("count each stored tensor the exercise lists, with and without double quantisation: how many "
                "elements it has (round up where a last block or group is partial) and how many bytes one element "
                "takes in its dtype.")


@checker
def nf4_storage_bytes(student_fn, seed: int | None = None) -> None:
    """Exercise 1: nf4_storage_bytes(numel, blocksize, double_quant) -> bytes ml.quantize stores."""
    g = _generator(seed)
    trials = [(64 * 256 * _randint(g, 2, 6), 64, False), (64 * 256 * _randint(g, 2, 6), 64, True),
              (2 * _randint(g, 300, 900) + 1, _choice(g, [32, 128]), False),
              (64 * _randint(g, 300, 900) + _randint(g, 1, 63), 64, True),
              (_randint(g, 5000, 90000), _choice(g, [32, 256, 1024]), True)]
    for numel, blocksize, double_quant in trials:
        want = quantize(torch.empty(numel, device="meta"), blocksize, double_quant).nbytes
        got = call(student_fn, numel, blocksize, double_quant, name="nf4_storage_bytes", hint=STORAGE_HINT)
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            raise ExerciseError(f"nf4_storage_bytes should return a whole number of bytes (int), got "
                                f"{type(got).__name__} {got!r}. Hint: use integer arithmetic (// rounds down; "
                                "-(-a // b) rounds up), or int(...) on the total.")
        if got == want:
            continue
        blocks, full_blocks = -(-numel // blocksize), numel // blocksize
        codes = -(-numel // 2)
        scales = 4 * -(-blocks // 256) + 4 if double_quant else 0
        per_block = 1 if double_quant else 4
        mistakes = [
            (numel + per_block * blocks + scales, "two 4-bit codes share one byte."),
            (numel // 2 + per_block * blocks + scales, "an odd number of codes still needs a byte for its last code."),
            (codes + per_block * full_blocks + (4 * -(-full_blocks // 256) + 4 if double_quant else 0),
             "a last, partial block needs its own absmax too."),
        ]
        if double_quant:
            mistakes += [
                (codes + blocks + 4 * -(-blocks // 256), "the mean of the absmax values, subtracted before they are "
                                                         "quantised, is stored too (one float32)."),
                (codes + blocks + 4, "the 8-bit absmax codes need their own float32 scales, one per group of 256 "
                                     "blocks."),
                (codes + blocks, "the 8-bit absmax codes need their own float32 scales, and the subtracted mean "
                                 "is stored as well."),
                (codes + 4 * blocks, "with double quantisation each block's absmax is stored in 8 bits, not 32."),
            ]
        else:
            mistakes += [(codes + 2 * blocks, "the absmax of each block is stored as float32, 4 bytes."),
                         (codes + blocks, "the absmax of each block is stored as float32, 4 bytes; 8-bit absmax "
                                          "values come only with double quantisation.")]
        hint = next((h for wrong, h in mistakes if got == wrong), STORAGE_HINT)
        off = "too many" if got > want else "too few"
        raise ExerciseError(f"nf4_storage_bytes({numel:,}, blocksize={blocksize}, double_quant={double_quant}) "
                            f"returned {got:,}, {off} bytes. Hint: {hint}")
    numel = 4096 * 4096
    single, double = (call(student_fn, numel, 64, dq, name="nf4_storage_bytes", hint=STORAGE_HINT)
                      for dq in (False, True))
    passed(f"nf4_storage_bytes agrees with ml.quantize on {len(trials)} tensors.")
    print(f"  one 4096 x 4096 projection of Llama-2-7B: {2 * numel / 2**20:.0f} MiB in 16 bits, "
          f"{single / 2**20:.2f} MiB in NF4 ({8 * single / numel:.3f} bits per weight), "
          f"{double / 2**20:.2f} MiB double quantised ({8 * double / numel:.3f} bits per weight).")


# ----------------------------------------------------------------------------- 2. the nearest NF4 level

CODES_HINT = ("scale the block into [-1, 1] by its largest absolute value, then give each value the index (0 to "
              "15) of the nearest entry of `levels`.")


@checker
def nf4_codes(student_fn, seed: int | None = None) -> None:
    """Exercise 2: nf4_codes(block, levels) -> the uint8 code of each value of one block."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [(64, 1.0), (64, -1.0), (32, 1.0), (128, -1.0)]  # sign -1: the block's absmax is a negative value
    for n, sign in trials:
        block = torch.randn(n, generator=g) * 0.05 * _randint(g, 1, 4)
        i = int(block.abs().argmax())
        block[i] = sign * block[i].abs() * 1.3  # its largest |value| stands out, with the chosen sign
        q = quantize(block, blocksize=n)
        want = _unpack(q.packed, n)
        absmax = block.abs().max()
        either = _on_a_midpoint(block / absmax, levels)

        got = call(student_fn, block.clone(), levels.clone(), name="nf4_codes", hint=CODES_HINT)
        mistakes = [
            (_nearest(block, levels), "scale the block into [-1, 1] first: NF4's levels are relative to the block's "
                                      "largest absolute value, which the absmax stores."),
            (_nearest(block / block.max(), levels), "the scale is the block's largest absolute value; here the value "
                                                    "furthest from zero is negative."),
            ((block / absmax * 7).round().to(torch.int64) + 7,
             "that rounds to 15 evenly spaced levels, like int4. NF4's 16 levels are not evenly spaced: use the "
             "values in `levels`."),
            (torch.bucketize(block / absmax, levels).clamp(max=15), "take the nearest level, not the next one up."),
            ((torch.bucketize(block / absmax, levels, right=True) - 1).clamp(min=0),
             "take the nearest level, not the next one down."),
        ]
        _expect_codes(got, want, f"nf4_codes for a block of {n} values", mistakes, CODES_HINT, either)
    passed(f"nf4_codes gives ml.quantize's codes for {len(trials)} random blocks.")


# ----------------------------------------------------------------------------- 3. two codes per byte

PACK_HINT = ("byte k holds codes 2k and 2k+1: the first in the high nibble (the upper 4 bits), the second in the "
             "low nibble; an odd count is padded with the code of the level 0.0.")


def _codes_with_unit_blocks(g, n: int, blocksize: int) -> torch.Tensor:
    """Random codes such that every block holds a level of magnitude 1, so quantize(levels[codes]) keeps them."""
    codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
    for start in range(0, n, blocksize):
        end = min(start + blocksize, n)
        codes[_randint(g, start, end - 1)] = _choice(g, [0, 15])  # the levels -1 and +1
    return codes


@checker
def pack_unpack(pack_fn, unpack_fn, seed: int | None = None) -> None:
    """Exercise 3: pack_codes(codes) -> uint8 bytes; unpack_codes(packed, n) -> the n codes."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [2 * _randint(g, 40, 200), 2 * _randint(g, 40, 200) + 1, 7, 2 * _randint(g, 40, 200) + 1]
    for n in trials:
        codes = _codes_with_unit_blocks(g, n, 64)
        q = quantize(levels[codes.long()], blocksize=64)
        assert torch.equal(_unpack(q.packed, n), codes)  # the package keeps these codes: its bytes are the reference
        want = q.packed

        got = call(pack_fn, codes.clone(), name="pack_codes", hint=PACK_HINT)
        padded = torch.cat([codes, codes.new_full((n % 2,), 7)])
        mistakes = [
            ((padded[1::2] << 4) | padded[0::2], "the first code of each pair goes in the high nibble (the upper 4 "
                                                 "bits), the second in the low nibble."),
        ]
        if n % 2:
            zero_padded = torch.cat([codes, codes.new_zeros(1)])
            mistakes += [((zero_padded[0::2] << 4) | zero_padded[1::2],
                          "pad an odd count with the code whose level is 0.0, so that the padding decodes to zero; "
                          "code 0 is the level -1.")]
        what = f"pack_codes for {n} codes" + (" (an odd count)" if n % 2 else "")
        if isinstance(got, torch.Tensor) and n % 2 and got.numel() == n // 2:
            raise ExerciseError(f"{what} returned {n // 2} bytes for {n} codes: the last code is missing. Hint: an "
                                "odd count is padded by one code, so it takes (n + 1) // 2 bytes.")
        _expect_codes(got, want, what, mistakes, PACK_HINT)

        got = call(unpack_fn, want.clone(), n, name="unpack_codes", hint=PACK_HINT)
        swapped = torch.stack([want & 15, want >> 4], dim=1).view(-1)
        mistakes = [(swapped[:n], "the high nibble holds the first code of each pair.")]
        what = f"unpack_codes for {n} codes" + (" (an odd count)" if n % 2 else "")
        if isinstance(got, torch.Tensor) and got.numel() == 2 * want.numel() != n:
            raise ExerciseError(f"{what} returned {got.numel()} codes instead of {n}. Hint: drop the padding code "
                                "at the end.")
        _expect_codes(got, codes, what, mistakes, PACK_HINT)
    passed(f"pack_codes writes ml.quantize's bytes and unpack_codes reads them back, for {len(trials)} code "
           "sequences (odd lengths included).")


# ----------------------------------------------------------------------------- 4. dequantising

DEQUANT_HINT = ("unpack the codes (high nibble first), look each one up in `levels`, and multiply it by the absmax "
                "of its block: value i belongs to block i // blocksize of the flattened weight. Then drop any "
                "padding and give the result the weight's shape.")


@checker
def dequantize_nf4(student_fn, seed: int | None = None) -> None:
    """Exercise 4: dequantize_nf4(packed, absmax, shape, blocksize, levels) -> the float32 weight."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [((_randint(g, 4, 10), 64), 64), ((_randint(g, 3, 6), 40), 32), ((6, 128), 64), ((7, 9), 32)]
    for shape, blocksize in trials:
        w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).add(0.1)  # rows of varied scale
        q = quantize(w, blocksize)
        want = dequantize(q)
        n = w.numel()

        got = call(student_fn, q.packed.clone(), q.absmax.clone(), tuple(shape), blocksize, levels.clone(),
                   name="dequantize_nf4", hint=DEQUANT_HINT)
        codes = _unpack(q.packed, n).long()
        swapped = torch.stack([q.packed & 15, q.packed >> 4], dim=1).view(-1)[:n].long()
        per_value = q.absmax.repeat_interleave(blocksize)[:n]
        mistakes = [
            (levels[codes].view(shape), "these are the levels alone, all within [-1, 1]: each block was divided by "
                                        "its absmax before rounding, so multiply it back."),
            ((levels[codes] / per_value).view(shape), "each block was divided by its absmax before rounding; undo "
                                                      "that division."),
            ((levels[swapped] * per_value).view(shape), "the high nibble of each byte holds the first value of "
                                                        "the pair."),
            ((levels[codes] * q.absmax.repeat(-(-n // q.absmax.numel()))[:n]).view(shape),
             "value i belongs to block i // blocksize: consecutive values share a block's absmax."),
        ]
        expect_tensor(got, want, f"dequantize_nf4's result for a weight of shape {tuple(shape)}, blocksize "
                                 f"{blocksize}", mistakes, DEQUANT_HINT)
    passed(f"dequantize_nf4 equals ml.dequantize on {len(trials)} random weights (odd sizes and partial blocks "
           "included).")


# ----------------------------------------------------------------------------- 5. stretch: the QLoRA forward

QLORA_HINT = ("y = x W^T + (alpha / r) (x A^T) B^T, where W (d_out, d_in) is dequantised from `packed` and `absmax` "
              "(your dequantize_nf4), A is (r, d_in) and B (d_out, r). Gradients must reach A, B and x through "
              "ordinary torch operations.")


@checker
def qlora_forward(student_fn, seed: int | None = None) -> None:
    """Exercise 5: qlora_forward(x, packed, absmax, shape, blocksize, levels, A, B, alpha, r) -> y, differentiable."""
    g = _generator(seed)
    levels = nf4_codebook()
    trials = [(32, 32, (5,), True), (64, 48, (2, 3), False), (64, 96, (4,), False)]  # d_in, d_out, lead, square
    for d_in, d_out, lead, square in trials:
        r = _choice(g, [2, 4, 8])
        alpha = float(r * _choice(g, [1.5, 2, 3]))
        W, _, A, B = _random_lora(g, d_in, d_out, r)
        x = torch.randn(*lead, d_in, generator=g)
        base = Linear4bit(W, blocksize=32)
        layer = LoraLinear4bit(base)
        layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, target_modules=["layer"]))
        layer.active_adapters = ["default"]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        x_ref = x.clone().requires_grad_(True)
        want = layer(x_ref)
        grad_out = torch.randn(want.shape, generator=g)
        (want * grad_out).sum().backward()

        x_in, A_in, B_in = (t.clone().requires_grad_(True) for t in (x, A, B))
        got = call(student_fn, x_in, base.packed.clone(), base.absmax.clone(), (d_out, d_in), base.blocksize,
                   levels.clone(), A_in, B_in, alpha, r, name="qlora_forward", hint=QLORA_HINT)
        with torch.no_grad():
            Wq = dequantize(base.weight)
            y0, update = x @ Wq.T, (x @ A.T) @ B.T
            mistakes = [(y0 + wrong, h) for wrong, h in _scaling_mistakes(alpha, r, lambda s: s * update)]
            mistakes += [
                (y0, "the output is x W^T alone: the adapter's update is missing."),
                (x @ (Wq / base.absmax.repeat_interleave(base.blocksize).view(d_out, d_in)).T + alpha / r * update,
                 "W must be dequantised with the absmax of each block, not only looked up in `levels`."),
            ]
            if square:
                mistakes += [(x @ Wq + alpha / r * update, "W is stored (d_out, d_in), as in nn.Linear: x W^T."),
                             (y0 + alpha / r * (x @ B) @ A, "the update is transposed: A acts first, taking d_in to r, "
                                                            "then B takes r to d_out.")]
        what = f"qlora_forward's output for x of shape {tuple(x.shape)}, W {d_out} x {d_in}"
        expect_tensor(got, want.detach(), what, mistakes, QLORA_HINT)
        if not got.requires_grad:
            raise ExerciseError(f"{what} does not depend on A and B through autograd. Hint: use A and B themselves, "
                                "not a copy, .detach() or .data, and not inside torch.no_grad().")
        (got * grad_out).sum().backward()
        references = (("A", A_in, layer.lora_A["default"].weight), ("B", B_in, layer.lora_B["default"].weight),
                      ("x", x_in, x_ref))
        for name, mine, ref in references:
            if mine.grad is None:
                raise ExerciseError(f"no gradient reached {name}. Hint: compute the output from {name} itself with "
                                    "torch operations (no .detach(), .data, .numpy() or torch.no_grad()).")
            expect_tensor(mine.grad, ref.grad, f"the gradient of {name}", [],
                          "the output must depend on x, A and B exactly as in the forward equation.")
    passed(f"qlora_forward matches ml.LoraLinear4bit on {len(trials)} random layers: outputs and the gradients of "
           "A, B and x.")
