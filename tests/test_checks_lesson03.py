"""Lesson 03 (DoRA)'s exercise checkers: the right answers pass, each plausible wrong answer fails with its own hint,
and an unfinished answer says so."""

import math

import pytest
import torch
import torch.nn as nn

from minilora import checks

from adapters import fails_with, global_random_state_unchanged, placeholder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers

def dora_magnitude(W):
    return W.norm(dim=1)


def dora_forward(x, W, b, A, B, m, alpha, r, detach=True):
    s = alpha / r
    n = (W + s * B @ A).norm(dim=1)
    n = n.detach() if detach else n
    y = (m / n) * (x @ W.T + s * (x @ A.T) @ B.T)
    return y if b is None else y + b


def dora_forward_linear(x, W, b, A, B, m, alpha, r):  # nn.functional.linear, the norm under no_grad
    s = alpha / r
    with torch.no_grad():
        n = torch.linalg.vector_norm(W + s * B @ A, dim=1)
    F = torch.nn.functional
    h = F.linear(x, W) + s * F.linear(F.linear(x, A), B)
    return m / n * h if b is None else torch.addcmul(b, m / n, h)


def dora_norm(w_sq, W, A, B, scaling):
    cross = (B * (A @ W.T).T).sum(dim=1)  # B_i . (A W_i^T), (d_out,)
    quad = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||B_i A||^2
    return (w_sq + 2 * scaling * cross + scaling ** 2 * quad).clamp_min(0).sqrt()


def dora_norm_plain(w_sq, W, A, B, scaling):  # right values, but forms W + s B A
    return (W + scaling * B @ A).norm(dim=1)


def dora_merge(W, A, B, m, alpha, r):
    V = W + alpha / r * B @ A
    return (m / V.norm(dim=1))[:, None] * V


class DoraLinear(nn.Module):
    def __init__(self, base, r, alpha, detach=True, bias_inside=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.magnitude = nn.Parameter(base.weight.detach().norm(dim=1))
        self.s, self.detach, self.bias_inside = alpha / r, detach, bias_inside

    def forward(self, x):
        W = self.base.weight
        n = (W + self.s * self.lora_B @ self.lora_A).norm(dim=1)
        n = n.detach() if self.detach else n
        inner = x @ W.T + self.s * (x @ self.lora_A.T) @ self.lora_B.T
        if self.bias_inside:
            return self.magnitude / n * self.base(x) + self.magnitude / n * (self.s * (x @ self.lora_A.T) @ self.lora_B.T)
        return self.magnitude / n * inner + (0 if self.base.bias is None else self.base.bias)


@pytest.mark.parametrize("seed", SEEDS)
def test_right_answers_pass(seed, capsys):
    checks.dora_magnitude(dora_magnitude, seed=seed)
    checks.dora_forward(dora_forward, seed=seed)
    checks.dora_forward(dora_forward_linear, seed=seed)
    checks.dora_norm(dora_norm, seed=seed)
    checks.dora_merge(dora_merge, seed=seed)
    checks.dora_linear(DoraLinear, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("✓ ") for line in lines)


def test_checks_leave_the_global_random_state_alone():
    with global_random_state_unchanged():
        checks.dora_forward(dora_forward)
        checks.dora_linear(DoraLinear)


# ----------------------------------------------------------------------------- 1. the magnitude

@pytest.mark.parametrize("seed", SEEDS)
def test_magnitude_rejects_common_mistakes(seed):
    fails_with(checks.dora_magnitude, lambda W: W.norm(dim=0), hint="one norm per input feature", seed=seed)
    fails_with(checks.dora_magnitude, lambda W: W.square().sum(dim=1), hint="squared length", seed=seed)
    fails_with(checks.dora_magnitude, lambda W: W.abs().sum(dim=1), hint="1-norm", seed=seed)
    fails_with(checks.dora_magnitude, lambda W: W.norm(dim=1, keepdim=True), hint="not a column matrix", seed=seed)
    fails_with(checks.dora_magnitude, lambda W: W.norm(), hint="has the wrong shape", seed=seed)
    message = fails_with(checks.dora_magnitude, lambda W: 2 * W.norm(dim=1), hint="Which axis", seed=seed)
    assert "dim=1" not in message  # the hint points at the idea, not at the code


# ----------------------------------------------------------------------------- 2. the forward pass

@pytest.mark.parametrize("seed", SEEDS)
def test_forward_rejects_common_mistakes(seed):
    def lora_only(x, W, b, A, B, m, alpha, r):
        y = x @ W.T + alpha / r * (x @ A.T) @ B.T
        return y if b is None else y + b

    def norm_of_W(x, W, b, A, B, m, alpha, r):
        y = m / W.norm(dim=1) * (x @ W.T + alpha / r * (x @ A.T) @ B.T)
        return y if b is None else y + b

    def no_division(x, W, b, A, B, m, alpha, r):
        y = m * (x @ W.T + alpha / r * (x @ A.T) @ B.T)
        return y if b is None else y + b

    def bias_inside(x, W, b, A, B, m, alpha, r):
        n = (W + alpha / r * B @ A).norm(dim=1).detach()
        return m / n * (x @ W.T + (0 if b is None else b) + alpha / r * (x @ A.T) @ B.T)

    def unscaled_norm(x, W, b, A, B, m, alpha, r):
        n = (W + B @ A).norm(dim=1).detach()
        y = m / n * (x @ W.T + alpha / r * (x @ A.T) @ B.T)
        return y if b is None else y + b

    def column_norms(x, W, b, A, B, m, alpha, r):  # the first trial is square
        n = (W + alpha / r * B @ A).norm(dim=0).detach()
        y = m / n * (x @ W.T + alpha / r * (x @ A.T) @ B.T)
        return y if b is None else y + b

    def no_scaling(x, W, b, A, B, m, alpha, r):
        return dora_forward(x, W, b, A, B, m, r, r)

    def m_detached(x, W, b, A, B, m, alpha, r):
        return dora_forward(x, W, b, A, B, m.detach(), alpha, r)

    fails_with(checks.dora_forward, lora_only, hint="that is LoRA's output", seed=seed)
    fails_with(checks.dora_forward, norm_of_W, hint="of W alone", seed=seed)
    fails_with(checks.dora_forward, no_division, hint="the division is missing", seed=seed)
    fails_with(checks.dora_forward, bias_inside, hint="the bias is added after the rescaling", seed=seed)
    fails_with(checks.dora_forward, unscaled_norm, hint="with the same scaling", seed=seed)
    fails_with(checks.dora_forward, column_norms, hint="not its columns", seed=seed)
    fails_with(checks.dora_forward, no_scaling, hint="missing its scaling", seed=seed)
    fails_with(checks.dora_forward, lambda *a: dora_forward(*a, detach=False), hint="treats it as a constant",
               seed=seed)
    fails_with(checks.dora_forward, m_detached, hint="no gradient reached m", seed=seed)


# ----------------------------------------------------------------------------- 3. the norm without W + s B A

@pytest.mark.parametrize("seed", SEEDS)
def test_norm_rejects_common_mistakes(seed):
    def squared(w_sq, W, A, B, s):
        return dora_norm(w_sq, W, A, B, s) ** 2

    def cross_once(w_sq, W, A, B, s):
        cross, quad = (B * (A @ W.T).T).sum(1), ((B @ (A @ A.T)) * B).sum(1)
        return (w_sq + s * cross + s * s * quad).clamp_min(0).sqrt()

    def quad_times_s(w_sq, W, A, B, s):
        cross, quad = (B * (A @ W.T).T).sum(1), ((B @ (A @ A.T)) * B).sum(1)
        return (w_sq + 2 * s * cross + s * quad).clamp_min(0).sqrt()

    def no_w(w_sq, W, A, B, s):
        return dora_norm(torch.zeros_like(w_sq), W, A, B, s)

    fails_with(checks.dora_norm, squared, hint="take the square root", seed=seed)
    fails_with(checks.dora_norm, cross_once, hint="appears twice", seed=seed)
    fails_with(checks.dora_norm, quad_times_s, hint="carries s^2", seed=seed)
    fails_with(checks.dora_norm, no_w, hint="is part of the norm", seed=seed)
    message = fails_with(checks.dora_norm, dora_norm_plain, hint="never to need one", seed=seed)
    assert "right values" in message
    fails_with(checks.dora_norm, lambda w_sq, W, A, B, s: dora_norm(W.square().sum(1), W, A, B, s),
               hint="never to need one", seed=seed)  # recomputes ||W_i||^2 through a full-size W.square()


def test_norm_accepts_views_of_the_weight():
    def with_linear(w_sq, W, A, B, s):  # A W^T through nn.functional.linear, and W.T as a view: nothing full-size
        WA = torch.nn.functional.linear(A, W)
        return (w_sq + 2 * s * (B * WA.T).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)).sqrt()

    checks.dora_norm(with_linear)
    checks.dora_norm(lambda w_sq, W, A, B, s: dora_norm(w_sq, W.T.T, A, B, s))


# ----------------------------------------------------------------------------- 4. merging

@pytest.mark.parametrize("seed", SEEDS)
def test_merge_rejects_common_mistakes(seed):
    s_of = lambda alpha, r: alpha / r
    fails_with(checks.dora_merge, lambda W, A, B, m, alpha, r: W + s_of(alpha, r) * B @ A, hint="LoRA's merge",
               seed=seed)
    fails_with(checks.dora_merge, lambda W, A, B, m, alpha, r: m[:, None] * (W + s_of(alpha, r) * B @ A),
               hint="divided by its own length", seed=seed)
    fails_with(checks.dora_merge, lambda W, A, B, m, alpha, r: (m / W.norm(dim=1))[:, None] * (W + s_of(alpha, r) * B @ A),
               hint="not of W", seed=seed)
    fails_with(checks.dora_merge, lambda W, A, B, m, alpha, r: dora_merge(W, A, B, m, r, r),
               hint="scaled by s = alpha / r", seed=seed)
    fails_with(checks.dora_merge, lambda W, A, B, m, alpha, r: dora_merge(W, A, B, torch.ones_like(m), alpha, r),
               hint="multiply each by its magnitude", seed=seed)

    def columns(W, A, B, m, alpha, r):  # the first trial is square
        V = W + alpha / r * B @ A
        return (m / V.norm(dim=1))[None, :] * V

    fails_with(checks.dora_merge, columns, hint="not its columns", seed=seed)


# ----------------------------------------------------------------------------- 5. a DoRA layer

@pytest.mark.parametrize("seed", SEEDS)
def test_dora_linear_rejects_common_mistakes(seed):
    class NotFrozen(DoraLinear):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            base.requires_grad_(True)

    class MagnitudeAsTensor(DoraLinear):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            m = self.magnitude.detach().clone()
            del self.magnitude
            self.magnitude = m

    class ZeroA(DoraLinear):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            nn.init.zeros_(self.lora_A)

    class SquaredMagnitude(DoraLinear):
        def __init__(self, base, r, alpha):
            super().__init__(base, r, alpha)
            self.magnitude = nn.Parameter(base.weight.detach().square().sum(1))

    class NormOfW(DoraLinear):
        def forward(self, x):
            W = self.base.weight
            y = self.magnitude / W.norm(dim=1) * (x @ W.T + self.s * (x @ self.lora_A.T) @ self.lora_B.T)
            return y + (0 if self.base.bias is None else self.base.bias)

    fails_with(checks.dora_linear, NotFrozen, hint="freezes the base layer", seed=seed)
    fails_with(checks.dora_linear, MagnitudeAsTensor, hint="self.magnitude as an nn.Parameter", seed=seed)
    fails_with(checks.dora_linear, ZeroA, hint="lora_A starts at zero", seed=seed)
    fails_with(checks.dora_linear, SquaredMagnitude, hint="not its square", seed=seed)
    fails_with(checks.dora_linear, NormOfW, hint="recomputed as A and B change", seed=seed)
    fails_with(checks.dora_linear, lambda base, r, alpha: DoraLinear(base, r, alpha, bias_inside=True),
               hint="base(x) includes the bias", seed=seed)
    fails_with(checks.dora_linear, lambda base, r, alpha: DoraLinear(base, r, alpha, detach=False),
               hint="detach it", seed=seed)


def test_not_implemented_yet_is_reported_as_such():
    for check in (checks.dora_magnitude, checks.dora_forward, checks.dora_norm, checks.dora_merge, checks.dora_linear):
        message = fails_with(check, placeholder, hint="is not implemented yet")
        assert "Hint:" in message
