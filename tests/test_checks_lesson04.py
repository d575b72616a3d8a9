"""Lesson 04 (AdaLoRA)'s exercise checkers: the right answers pass, each plausible wrong answer fails with its own
hint, an unfinished answer says so, and no hint states the answer."""

import pytest
import torch

import minilora as ml
from minilora.checks import lesson04 as checks

from adapters import fails_with, placeholder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers

def count(shapes, kept):
    return sum(kept[name] * (d_in + d_out + 1) for name, (d_in, d_out) in shapes.items())


def budget(step, b0, bT, tinit, tfinal, T):
    if step <= tinit:
        return b0
    if step > T - tfinal:
        return bT
    return int(bT + (b0 - bT) * (1 - (step - tinit) / (T - tfinal - tinit)) ** 3)


def importance(p, grad, exp_avg, uncertainty, beta1, beta2):
    sensitivity = (p * grad).abs()
    exp_avg = beta1 * exp_avg + (1 - beta1) * sensitivity
    return exp_avg, beta2 * uncertainty + (1 - beta2) * (sensitivity - exp_avg).abs()


def penalty(pairs):
    norms = []
    for P, Q in pairs:
        norms.append(torch.linalg.matrix_norm(P.T @ P - torch.eye(P.shape[1])))
        norms.append(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(Q.shape[0])))
    return torch.stack(norms).mean()


def triplets(scores):
    return {k: v["E"].view(-1) + v["P"].mean(dim=0) + v["Q"].mean(dim=1) for k, v in scores.items()}


def keep(scores, budget):
    per_layer = triplets(scores)
    flat = torch.cat(list(per_layer.values()))
    threshold = torch.kthvalue(flat, flat.numel() - budget).values
    return {k: v > threshold for k, v in per_layer.items()}


def keep_with_topk(scores, budget):
    per_layer = triplets(scores)
    flat = torch.cat(list(per_layer.values()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(budget).indices] = True
    return dict(zip(per_layer, chosen.split([v.numel() for v in per_layer.values()])))


@pytest.mark.parametrize("seed", SEEDS)
def test_lesson_04_right_answers_pass(seed, capsys):
    checks.adalora_param_count(count, seed=seed)
    checks.adalora_budget(budget, seed=seed)
    checks.adalora_budget(ml.budget_at, seed=seed)
    checks.adalora_importance(importance, seed=seed)
    checks.adalora_orthogonal_penalty(penalty, seed=seed)
    checks.adalora_keep(keep, seed=seed)
    checks.adalora_keep(keep_with_topk, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 7
    assert "117,072 at r_0 = 12" in lines[1] and "78,048 if every matrix kept 8" in lines[1]


def test_lesson_04_checks_leave_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    checks.adalora_param_count(count)
    checks.adalora_importance(importance)
    checks.adalora_orthogonal_penalty(penalty)
    checks.adalora_keep(keep)
    assert torch.equal(torch.rand(3), expected)


def test_lesson_04_not_implemented_yet_is_reported_as_such():
    for check in (checks.adalora_param_count, checks.adalora_budget, checks.adalora_importance,
                  checks.adalora_orthogonal_penalty, checks.adalora_keep):
        fails_with(check, placeholder, hint="is not implemented yet")


# ----------------------------------------------------------------------------- 1. counting

@pytest.mark.parametrize("seed", SEEDS)
def test_count_rejects_common_mistakes(seed):
    fails_with(checks.adalora_param_count, lambda s, k: sum(k[n] * (a + b) for n, (a, b) in s.items()),
               hint="LoRA's count", seed=seed)
    fails_with(checks.adalora_param_count, lambda s, k: sum(k[n] * (a + b) + k[n] ** 2 for n, (a, b) in s.items()),
               hint="Λ is diagonal", seed=seed)
    fails_with(checks.adalora_param_count, lambda s, k: sum(k[n] * (a + b) + 1 for n, (a, b) in s.items()),
               hint="a singular value of its own", seed=seed)
    fails_with(checks.adalora_param_count, lambda s, k: sum(k.values()) * (sum(a + b for a, b in s.values()) // len(s)
                                                                           + 1), hint="sum matrix by matrix", seed=seed)
    fails_with(checks.adalora_param_count, lambda s, k: float(count(s, k)), hint="whole number (int)", seed=seed)


def test_count_hint_does_not_give_the_formula():
    assert "+ 1" not in checks.COUNT_HINT and "d_in + d_out" not in checks.COUNT_HINT


# ----------------------------------------------------------------------------- 2. the budget

def budget_with(power=3, start=None, length=None, rounding=int):
    def fn(step, b0, bT, ti, tf, T):
        if step <= ti:
            return b0
        if step > T - tf:
            return bT
        s0 = ti if start is None else start(ti, tf)
        n = T - tf - ti if length is None else length(ti, tf, T)
        return rounding(bT + (b0 - bT) * (1 - (step - s0) / n) ** power)
    return fn


def test_budget_phase_boundaries_are_either_way():
    # the fall equals b0 at step tinit and the target at T - tfinal, so < or <= at the boundaries are both right
    checks.adalora_budget(lambda s, b0, bT, ti, tf, T: b0 if s < ti else bT if s >= T - tf else budget(s, b0, bT, ti, tf, T))


@pytest.mark.parametrize("seed", SEEDS)
def test_budget_rejects_common_mistakes(seed):
    fails_with(checks.adalora_budget, budget_with(power=2), hint="cubic, not quadratic", seed=seed)
    fails_with(checks.adalora_budget, budget_with(power=1), hint="cubic, not linear", seed=seed)
    fails_with(checks.adalora_budget, budget_with(length=lambda ti, tf, T: T - ti), hint="its length is not T - tinit",
               seed=seed)
    fails_with(checks.adalora_budget, budget_with(start=lambda ti, tf: 0, length=lambda ti, tf, T: T - tf),
               hint="measure the time from tinit", seed=seed)
    fails_with(checks.adalora_budget, budget_with(start=lambda ti, tf: ti + tf), hint="the paper's appendix prints",
               seed=seed)
    fails_with(checks.adalora_budget, budget_with(rounding=round), hint="rounded down", seed=seed)
    fails_with(checks.adalora_budget, budget_with(rounding=float), hint="whole number (int)", seed=seed)


def test_budget_hint_does_not_give_the_formula():
    assert "**" not in checks.BUDGET_HINT and "(1 -" not in checks.BUDGET_HINT


# ----------------------------------------------------------------------------- 3. sensitivity and uncertainty

def importance_with(sensitivity=lambda p, g: (p * g).abs(), smooth=lambda b, old, new: b * old + (1 - b) * new,
                    spread=lambda i, avg: (i - avg).abs(), old_avg_for_spread=False, beta_for_uncertainty=None):
    def fn(p, grad, exp_avg, uncertainty, beta1, beta2):
        i = sensitivity(p, grad)
        new_avg = smooth(beta1, exp_avg, i)
        b2 = beta2 if beta_for_uncertainty is None else beta_for_uncertainty(beta1, beta2)
        return new_avg, smooth(b2, uncertainty, spread(i, exp_avg if old_avg_for_spread else new_avg))
    return fn


@pytest.mark.parametrize("seed", SEEDS)
def test_importance_rejects_common_mistakes(seed):
    fails_with(checks.adalora_importance, importance_with(sensitivity=lambda p, g: p * g), hint="never negative",
               seed=seed)
    fails_with(checks.adalora_importance, importance_with(sensitivity=lambda p, g: g.abs()),
               hint="involves the entry itself", seed=seed)
    fails_with(checks.adalora_importance, importance_with(smooth=lambda b, old, new: (1 - b) * old + b * new),
               hint="weight of the past", seed=seed)
    fails_with(checks.adalora_importance, lambda p, g, a, u, b1, b2: ((p * g).abs(), importance(p, g, a, u, b1, b2)[1]),
               hint="smoothed over the steps", seed=seed)
    fails_with(checks.adalora_importance, importance_with(old_avg_for_spread=True), hint="just updated", seed=seed)
    fails_with(checks.adalora_importance, importance_with(spread=lambda i, avg: (i - avg) ** 2),
               hint="not a squared one", seed=seed)
    fails_with(checks.adalora_importance, importance_with(spread=lambda i, avg: i - avg), hint="never negative",
               seed=seed)
    fails_with(checks.adalora_importance, importance_with(beta_for_uncertainty=lambda b1, b2: b1), hint="its own rate",
               seed=seed)
    fails_with(checks.adalora_importance, lambda *a: importance(*a)[0], hint="two tensors", seed=seed)


# ----------------------------------------------------------------------------- 4. the orthogonality regulariser

def penalty_with(norm=lambda m: torch.linalg.matrix_norm(m), gram_p=lambda P: P.T @ P, gram_q=lambda Q: Q @ Q.T,
                 reduce=lambda norms, pairs: torch.stack(norms).mean()):
    def fn(pairs):
        norms = []
        for P, Q in pairs:
            gp, gq = gram_p(P), gram_q(Q)
            norms += [norm(gp - torch.eye(gp.shape[0])), norm(gq - torch.eye(gq.shape[0]))]
        return reduce(norms, pairs)
    return fn


@pytest.mark.parametrize("seed", SEEDS)
def test_penalty_rejects_common_mistakes(seed):
    fails_with(checks.adalora_orthogonal_penalty, penalty_with(norm=lambda m: torch.linalg.matrix_norm(m) ** 2),
               hint="squared norms", seed=seed)
    fails_with(checks.adalora_orthogonal_penalty, penalty_with(norm=lambda m: torch.linalg.matrix_norm(m) ** 2,
                                                               reduce=lambda n, p: sum(n)), hint="summed", seed=seed)
    fails_with(checks.adalora_orthogonal_penalty, penalty_with(gram_p=lambda P: P @ P.T, gram_q=lambda Q: Q.T @ Q),
               hint="should be r × r", seed=seed)
    fails_with(checks.adalora_orthogonal_penalty, penalty_with(reduce=lambda n, p: sum(n)), hint="averaged over the "
               "matrices", seed=seed)
    fails_with(checks.adalora_orthogonal_penalty, penalty_with(reduce=lambda n, p: sum(n) / len(p)),
               hint="two matrices, P and Q", seed=seed)
    fails_with(checks.adalora_orthogonal_penalty, lambda pairs: penalty(pairs).item(), hint="no .item()", seed=seed)
    fails_with(checks.adalora_orthogonal_penalty, lambda pairs: penalty(pairs).detach(), hint="through autograd",
               seed=seed)


def test_penalty_accepts_a_one_element_tensor():
    checks.adalora_orthogonal_penalty(lambda pairs: penalty(pairs).reshape(1))


# ----------------------------------------------------------------------------- 5. the triplets to keep

def keep_with(per_layer_scores, largest=True):
    def fn(scores, budget):
        per_layer = per_layer_scores(scores)
        flat = torch.cat(list(per_layer.values()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[flat.topk(budget, largest=largest).indices] = True
        return dict(zip(per_layer, chosen.split([v.numel() for v in per_layer.values()])))
    return fn


def keep_per_layer(scores, budget):
    per_layer = triplets(scores)
    k = round(budget / len(per_layer))
    return {n: torch.zeros(v.numel(), dtype=torch.bool).index_fill_(0, v.topk(min(k, v.numel())).indices, True)
            for n, v in per_layer.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_rejects_common_mistakes(seed):
    fails_with(checks.adalora_keep, keep_with(triplets, largest=False), hint="least important", seed=seed)
    fails_with(checks.adalora_keep, keep_per_layer, hint="shared by the whole model", seed=seed)
    fails_with(checks.adalora_keep, keep_with(lambda s: {k: v["E"].view(-1) + v["P"].sum(0) + v["Q"].sum(1)
                                                         for k, v in s.items()}), hint="by their mean score", seed=seed)
    fails_with(checks.adalora_keep, keep_with(lambda s: {k: v["P"].mean(0) + v["Q"].mean(1) for k, v in s.items()}),
               hint="singular value has a score of its own", seed=seed)
    fails_with(checks.adalora_keep, lambda s, b: {k: m.tolist() for k, m in keep(s, b).items()},
               hint="bool tensor of shape", seed=seed)
    fails_with(checks.adalora_keep, lambda s, b: list(keep(s, b).values()), hint="one mask per layer", seed=seed)
    fails_with(checks.adalora_keep, lambda s, b: keep(s, b - 1), hint="the budget is", seed=seed)
    # P's mean taken over the wrong axis: (d_out,) instead of (r,), named as the exception it raises
    fails_with(checks.adalora_keep, keep_with(lambda s: {k: v["E"].view(-1) + v["P"].mean(1) + v["Q"].mean(1)
                                                         for k, v in s.items()}), hint="raised RuntimeError",
               seed=seed)


def test_keep_hint_does_not_give_the_threshold():
    assert "kthvalue" not in checks.KEEP_HINT and "topk" not in checks.KEEP_HINT
