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

This module is the machinery; each lesson's checkers live in their own module (lesson01.py, lesson02.py, ...),
re-exported by the package, so notebooks call `checks.<name>` whatever the lesson.

Writing a checker for a new exercise (each lesson adds its own module and one import line in __init__.py):
  1. Decorate the checker with `@checker`, which puts torch's global random state back afterwards, and
     draw inputs from `_generator(seed)`, never from the global generator: the student's seeded cells stay
     undisturbed, every run sees new inputs, and tests can pass a seed to repeat one.
  2. Compute the expected result with the package (the layer, `inject`, a model), not with a formula
     written again here.
  3. Call the student's code only through `call(fn, *args, name=..., hint=...)`.
  4. Compare with `expect_tensor` (type, shape, dtype, then values) or raise `ExerciseError` yourself.
     Where a wrong answer is common (the scaling left out, B A transposed), compute it too and, when the
     student's result matches it, give the hint that names that idea. `expect_int` checks a count,
     `expect_differentiable` that an output is in the autograd graph, and for a student's nn.Module
     `expect_parameters` its nn.Parameter attributes and `parameter_grad` that a gradient reached one.
  5. Finish with `passed("...")`, one short line.
  6. In tests/test_checks*.py, show that the package's own answer passes and that each plausible wrong
     answer fails with its hint (`fails_with` and the other shared helpers are in tests/adapters.py).
"""

import functools
import math
import numbers
import sysconfig
import traceback
from pathlib import Path

import torch
import torch.nn as nn

from minilora import LoraConfig, LoraLayer

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


def expect_shape(got, want: torch.Tensor, what: str, hint: str) -> None:
    """Raise ExerciseError unless `got` is a tensor of want's shape."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{what} should be a torch.Tensor, got {type(got).__name__}. Hint: {hint}")
    if got.shape != want.shape:
        raise ExerciseError(f"{what} has the wrong shape: expected {tuple(want.shape)}, got {tuple(got.shape)}. "
                            f"Hint: {hint}")


def expect_tensor(got, want: torch.Tensor, what: str, mistakes: list[tuple[torch.Tensor, str]], hint: str) -> None:
    """Raise ExerciseError unless `got` is a tensor with want's shape, dtype and values.

    `mistakes` are (result of a common wrong answer, hint about it): when the values are wrong and match one
    of them, its hint is given instead of the general `hint`."""
    expect_shape(got, want, what, hint)
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


def expect_int(got, name: str, hint: str = "sum Python ints, or call int(...) on the total.",
               what: str = "a whole number (int)") -> None:
    """Raise ExerciseError unless the count `name` returned is an int (a bool, a float or a tensor is not)."""
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        raise ExerciseError(f"{name} should return {what}, got {type(got).__name__} {got!r}. Hint: {hint}")


def expect_differentiable(got: torch.Tensor, what: str, inputs: str) -> None:
    """Raise ExerciseError unless `got` is in the autograd graph of the trainable `inputs` ("A and B")."""
    if not got.requires_grad:
        raise ExerciseError(f"{what} does not depend on {inputs} through autograd. Hint: use {inputs} themselves, "
                            "not a copy, .detach() or .data, and not inside torch.no_grad().")


# ----------------------------------------------------------------------------- a student's module

def expect_parameters(module: nn.Module, name: str, shapes: dict[str, tuple[int, ...]], how: str, hint: str) -> None:
    """Raise ExerciseError unless module.<attr> is an nn.Parameter of each of these shapes; `how` says how to
    register one."""
    for attr, shape in shapes.items():
        p = getattr(module, attr, None)
        if not isinstance(p, nn.Parameter):
            raise ExerciseError(f"{name} should keep self.{attr} as an nn.Parameter of shape {shape}, got "
                                f"{type(p).__name__}. Hint: {how}")
        if tuple(p.shape) != shape:
            raise ExerciseError(f"{name}.{attr} has the wrong shape: expected {shape}, got {tuple(p.shape)}. "
                                f"Hint: {hint}")


def parameter_grad(module: nn.Module, name: str, attr: str) -> torch.Tensor:
    """module.<attr>.grad after a backward pass, or ExerciseError when no gradient reached it."""
    grad = getattr(module, attr).grad
    if grad is None:
        raise ExerciseError(f"no gradient reached {name}.{attr}. Hint: the forward must use self.{attr} "
                            "itself, not a copy, .detach() or .data, and not inside torch.no_grad().")
    return grad


# ----------------------------------------------------------------------------- reference layers and inputs

def _linear(W: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly W (d_out, d_in) and b (no bias when b is None), in W's dtype."""
    d_out, d_in = W.shape
    base = nn.Linear(d_in, d_out, bias=b is not None, dtype=W.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        if b is not None:
            base.bias.copy_(b)
    return base


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each projection in a DecoderLM block, read from the model."""
    return {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
            for name, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}


def _package_layer(W, b, A, B, alpha, r, use_rslora=False) -> LoraLayer:
    """An ml.LoraLayer holding exactly these W, b, A and B (the reference for a hand-written layer)."""
    layer = LoraLayer(_linear(W, b).requires_grad_(False))
    layer.add_adapter("default", LoraConfig(r=r, alpha=alpha, use_rslora=use_rslora, target_modules=["layer"]))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
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
