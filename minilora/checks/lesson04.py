"""Checkers for lesson 04 (AdaLoRA)'s exercises (the machinery and how to write one: core.py).

Each checker builds the package's AdaLoRA objects (`inject` with an `AdaLoraConfig`, `RankAllocator`,
`orthogonal_penalty`, `budget_at`) on fresh random inputs and compares the student's function with them."""

import torch
import torch.nn as nn

from minilora import AdaLoraConfig, AdaLoraLayer, RankAllocator, budget_at, inject, orthogonal_penalty, trainable_report

from .core import (call, checker, ExerciseError, expect_differentiable, expect_int, expect_tensor, passed, _generator,
                   _randint)

ATTRS = {"P": "lora_B", "E": "lora_E", "Q": "lora_A"}  # the paper's names -> peft's (and the package's)
PAPER = {"lora_B": "P", "lora_E": "λ", "lora_A": "Q"}


class _Layers(nn.Module):
    """Plain nn.Linear layers named layers.0, layers.1, ... with the given (d_in, d_out) shapes."""

    def __init__(self, shapes: list[tuple[int, int]]):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_in, d_out) for d_in, d_out in shapes])


def _adalora_model(g, shapes, init_r, rank_pattern=None, total_step=20):
    """_Layers with an AdaLoRA adapter on every layer; P, λ and Q drawn at random (λ is zero at init otherwise)."""
    model = _Layers(shapes)
    names = [f"layers.{i}" for i in range(len(shapes))]
    config = AdaLoraConfig(target_modules=names, init_r=init_r, target_r=max(1, init_r // 2), total_step=total_step,
                           rank_pattern=rank_pattern)
    inject(model, config)
    with torch.no_grad():
        for layer in _adalora_layers(model).values():
            for attr in ATTRS.values():
                p = getattr(layer, attr)["default"]
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, names


def _adalora_layers(model) -> dict[str, AdaLoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}


def _random_shapes(g, n, low=6, high=20):
    return [(_randint(g, low, high), _randint(g, low, high)) for _ in range(n)]


# ----------------------------------------------------------------------------- 1. counting after pruning

COUNT_HINT = ("after pruning, every matrix keeps its own number of triplets, and each triplet is a column of P, one "
              "singular value and a row of Q. How many numbers is that for a matrix of d_in inputs and d_out outputs?")


@checker
def adalora_param_count(student_fn, seed: int | None = None) -> None:
    """Exercise 1: adalora_param_count(shapes, kept) -> the trainable parameters of a pruned AdaLoRA adapter."""
    g = _generator(seed)
    trials = 5
    for trial in range(trials):
        n, init_r = _randint(g, 2, 5), _randint(g, 3, 6)
        shapes = _random_shapes(g, n)
        kept = [_randint(g, 0 if trial == trials - 1 else 1, init_r) for _ in range(n)]
        names = [f"layers.{i}" for i in range(n)]
        pattern = {}
        for name, k in zip(names, kept):
            order = torch.randperm(init_r, generator=g)[:k].tolist()
            pattern[f"{name}.lora_E"] = [i in order for i in range(init_r)]
        model, _ = _adalora_model(g, shapes, init_r, rank_pattern=pattern)
        want = trainable_report(model, verbose=False).trainable

        shape_arg = {name: shape for name, shape in zip(names, shapes)}
        kept_arg = {name: k for name, k in zip(names, kept)}
        got = call(student_fn, dict(shape_arg), dict(kept_arg), name="adalora_param_count", hint=COUNT_HINT)
        expect_int(got, "adalora_param_count")
        if got == want:
            continue
        io = [d_in + d_out for d_in, d_out in shapes]
        mistakes = [
            (sum(k * s for k, s in zip(kept, io)), "that is LoRA's count, r (d_in + d_out): each AdaLoRA triplet "
                                                   "also trains its singular value."),
            (sum(k * s + k * k for k, s in zip(kept, io)), "Λ is diagonal: it is stored as a vector, not as an "
                                                           "r × r matrix."),
            (sum(k * s + 1 for k, s in zip(kept, io)), "each triplet has a singular value of its own, not each "
                                                        "matrix."),
            (sum(kept) * (sum(io) // n + 1), "matrices of different shapes cost different amounts per triplet; "
                                             "sum matrix by matrix."),
        ]
        hint = next((h for wrong, h in mistakes if got == wrong), COUNT_HINT)
        case = ", ".join(f"{name} (d_in, d_out) = {s}, kept {k}" for name, s, k in zip(names, shapes, kept))
        raise ExerciseError(f"adalora_param_count for {case}: got {got:,}, expected {want:,}. Hint: {hint}")

    base = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
            "gate_proj": (128, 384), "up_proj": (128, 384), "down_proj": (384, 128)}
    shapes = {f"model.layers.{i}.{t}": s for i in range(4) for t, s in base.items()}
    at_r0 = call(student_fn, shapes, {n: 12 for n in shapes}, name="adalora_param_count", hint=COUNT_HINT)
    uniform = call(student_fn, shapes, {n: 8 for n in shapes}, name="adalora_param_count", hint=COUNT_HINT)
    passed(f"adalora_param_count agrees with the package on {trials} random pruned adapters.")
    print(f"  decoder-tiny, all 28 linear layers: {at_r0:,} at r_0 = 12 (what trains), {uniform:,} if every matrix "
          "kept 8 triplets.")


# ----------------------------------------------------------------------------- 2. the budget

BUDGET_HINT = ("three phases: the full budget while the warm-up lasts, then a cubic fall, then the target held for the "
               "last tfinal steps. The fall starts at the full budget and reaches the target exactly where the "
               "last phase begins; the budget counts triplets, so it is a whole number, rounded down.")


def _budget_variants(b0, bT, ti, tf, T):
    """Plausible wrong schedules, each with its hint."""
    def falling(step, power=3, start=ti, length=T - tf - ti, rounding=int):
        return rounding((b0 - bT) * (1 - (step - start) / length) ** power + bT)

    def phases(fall):
        return lambda s: b0 if s <= ti else bT if s > T - tf else fall(s)

    return [
        (phases(lambda s: falling(s, power=2)), "the fall is cubic, not quadratic."),
        (phases(lambda s: falling(s, power=1)), "the fall is cubic, not linear."),
        (phases(lambda s: falling(s, length=T - ti)), "the fall must end where the last phase begins, tfinal steps "
                                                      "before the end, so its length is not T - tinit."),
        (phases(lambda s: falling(s, start=0, length=T - tf)), "the fall starts after the warm-up: measure the time "
                                                               "from tinit, not from step 0."),
        (phases(lambda s: falling(s, start=ti + tf)), "at the step where the fall starts, the budget should still be "
                                                      "the full budget (that numerator is what the paper's appendix "
                                                      "prints; the authors' code and peft measure from tinit)."),
        (phases(lambda s: falling(s, rounding=round)), "the budget is rounded down, as peft rounds it (int(...))."),
    ]


@checker
def adalora_budget(student_fn, seed: int | None = None) -> None:
    """Exercise 2: adalora_budget(step, init_budget, target_budget, tinit, tfinal, total_step) -> b(step)."""
    g = _generator(seed)
    schedules = [(336, 224, 25, 50, 150), (36, 24, 0, 0, 40)]
    for _ in range(3):
        n, init_r = _randint(g, 4, 30), _randint(g, 3, 12)
        T = _randint(g, 30, 200)
        ti, tf = _randint(g, 1, T // 4), _randint(g, 1, T // 3)
        schedules.append((n * init_r, n * _randint(g, 1, init_r - 1), ti, tf, T))
    for b0, bT, ti, tf, T in schedules:
        want = [budget_at(s, b0, bT, ti, tf, T) for s in range(1, T + 1)]
        got = [call(student_fn, s, b0, bT, ti, tf, T, name="adalora_budget", hint=BUDGET_HINT) for s in range(1, T + 1)]
        for value in got:
            expect_int(value, "adalora_budget", hint="the budget counts triplets; round it down with int(...).")
        if got == want:
            continue
        hint = next((h for f, h in _budget_variants(b0, bT, ti, tf, T) if [f(s) for s in range(1, T + 1)] == got),
                    BUDGET_HINT)
        step = next(s for s in range(1, T + 1) if got[s - 1] != want[s - 1])
        raise ExerciseError(f"adalora_budget(step, {b0}, {bT}, tinit={ti}, tfinal={tf}, total_step={T}): at step {step} "
                            f"expected {want[step - 1]}, got {got[step - 1]}. Hint: {hint}")
    passed(f"adalora_budget equals ml.budget_at at every step of {len(schedules)} schedules.")


# ----------------------------------------------------------------------------- 3. sensitivity and uncertainty

IMPORTANCE_HINT = ("three lines: the sensitivity of each entry (a first-order estimate of how much the loss moves if "
                   "the entry is set to zero), its exponential moving average with weight beta1 on the past, and the "
                   "moving average, with weight beta2, of how far this step's sensitivity is from the smoothed one.")


@checker
def adalora_importance(student_fn, seed: int | None = None) -> None:
    """Exercise 3: adalora_importance(param, grad, exp_avg, uncertainty, beta1, beta2) -> (exp_avg, uncertainty)."""
    g = _generator(seed)
    trials = [(0.85, 0.85, False), (0.85, 0.85, True), (0.7, 0.9, True), (0.9, 0.6, True)]
    for beta1, beta2, warm in trials:
        model, names = _adalora_model(g, _random_shapes(g, 2), init_r=_randint(g, 3, 5))
        model.adapter_configs["default"].beta1, model.adapter_configs["default"].beta2 = beta1, beta2
        allocator = RankAllocator(model)
        inputs = {}
        for lname, layer in _adalora_layers(model).items():
            for attr in ATTRS.values():
                p = getattr(layer, attr)["default"]
                p.grad = torch.randn(p.shape, generator=g)
                old_avg = torch.rand(p.shape, generator=g) * 0.2 if warm else torch.zeros(p.shape)
                old_unc = torch.rand(p.shape, generator=g) * 0.1 if warm else torch.zeros(p.shape)
                key = f"{lname}.{attr}"
                if warm:
                    allocator.exp_avg[key], allocator.uncertainty[key] = old_avg.clone(), old_unc.clone()
                inputs[key] = (p.detach().clone(), p.grad.clone(), old_avg, old_unc)
        allocator.update_scores(model)
        for key, (p, grad, old_avg, old_unc) in inputs.items():
            got = call(student_fn, p.clone(), grad.clone(), old_avg.clone(), old_unc.clone(), beta1, beta2,
                       name="adalora_importance", hint=IMPORTANCE_HINT)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise ExerciseError(f"adalora_importance should return two tensors, (exp_avg, uncertainty), got "
                                    f"{type(got).__name__}. Hint: {IMPORTANCE_HINT}")
            I = (p * grad).abs()
            avg = beta1 * old_avg + (1 - beta1) * I
            avg_mistakes = [
                (beta1 * old_avg + (1 - beta1) * (p * grad), "the sensitivity is a size, never negative."),
                (beta1 * old_avg + (1 - beta1) * grad.abs(), "the sensitivity involves the entry itself, not only "
                                                             "its gradient: zeroing a small entry changes little."),
                ((1 - beta1) * old_avg + beta1 * I, "beta1 is the weight of the past: a large beta1 smooths more."),
                (I, "the sensitivity alone is noisy from batch to batch; it is smoothed over the steps."),
            ]
            attr = key.rsplit('.', 1)[-1]
            what = (f"the smoothed sensitivity of {PAPER[attr]} ({attr}, shape {tuple(p.shape)}; "
                    f"beta1 {beta1}{', after earlier steps' if warm else ', first step'})")
            expect_tensor(got[0], allocator.exp_avg[key], what, avg_mistakes, IMPORTANCE_HINT)
            unc_mistakes = [
                (beta2 * old_unc + (1 - beta2) * (I - old_avg).abs(), "compare this step's sensitivity with the "
                                                                      "smoothed value of this same step, just "
                                                                      "updated."),
                (beta2 * old_unc + (1 - beta2) * (I - avg) ** 2, "the spread is measured as an absolute difference, "
                                                                 "not a squared one."),
                (beta2 * old_unc + (1 - beta2) * (I - avg), "the uncertainty is a size, never negative."),
                ((1 - beta2) * old_unc + beta2 * (I - avg).abs(), "beta2 is the weight of the past."),
                (beta1 * old_unc + (1 - beta1) * (I - avg).abs(), "the uncertainty has its own rate, beta2."),
            ]
            what = f"the uncertainty of {PAPER[attr]} ({attr}, beta2 {beta2})"
            expect_tensor(got[1], allocator.uncertainty[key], what, unc_mistakes, IMPORTANCE_HINT)
    passed(f"adalora_importance equals RankAllocator.update_scores on {len(trials)} random models, first step and "
           "later ones.")


# ----------------------------------------------------------------------------- 4. the orthogonality regulariser

ORTH_HINT = ("the regulariser asks the r columns of P, and the r rows of Q, to be orthonormal: how far is each r × r "
             "Gram matrix from the identity, in Frobenius norm? The package takes the norms as the authors' code and "
             "peft do (lesson 04, section 1), and averages over every P and every Q of the model.")


@checker
def adalora_orthogonal_penalty(student_fn, seed: int | None = None) -> None:
    """Exercise 4: adalora_orthogonal_penalty(pairs) -> the regulariser, for pairs [(P, Q), ...] of every layer."""
    g = _generator(seed)
    for n_layers in (2, 4, 1):
        model, _ = _adalora_model(g, _random_shapes(g, n_layers, low=6, high=14), init_r=_randint(g, 3, 5))
        layers = list(_adalora_layers(model).values())
        want = orthogonal_penalty(model)
        want.backward()
        pairs = [(layer.lora_B["default"].detach().clone().requires_grad_(True),
                  layer.lora_A["default"].detach().clone().requires_grad_(True)) for layer in layers]
        with torch.no_grad():
            eye = lambda k: torch.eye(k)
            p_norms = [torch.linalg.matrix_norm(P.T @ P - eye(P.shape[1])) for P, _ in pairs]
            q_norms = [torch.linalg.matrix_norm(Q @ Q.T - eye(Q.shape[0])) for _, Q in pairs]
            outer = [torch.linalg.matrix_norm(P @ P.T - eye(P.shape[0])) + torch.linalg.matrix_norm(Q.T @ Q - eye(Q.shape[1]))
                     for P, Q in pairs]
            total = sum(p_norms) + sum(q_norms)
            squared = sum(v ** 2 for v in p_norms + q_norms)
            mistakes = [
                (squared / (2 * n_layers), "that is the paper's eq. 4 as printed, with squared norms; the package "
                                           "follows the authors' code and peft there (section 1 of the lesson)."),
                (squared, "that is the paper's eq. 4 as printed, summed; the package follows the authors' code and "
                          "peft (section 1 of the lesson)."),
                (sum(outer) / (2 * n_layers), "the Gram matrices should be r × r: it is the columns of P and the rows "
                                              "of Q that should be orthonormal."),
                (total, "the terms are averaged over the matrices, so that the regulariser does not grow with the "
                        "number of adapted layers."),
            ]
            if n_layers > 1:
                mistakes.append((total / n_layers, "every layer contributes two matrices, P and Q, to the average."))
        got = call(student_fn, pairs, name="adalora_orthogonal_penalty", hint=ORTH_HINT)
        what = f"adalora_orthogonal_penalty over {n_layers} layer{'s' if n_layers > 1 else ''}"
        if not isinstance(got, torch.Tensor):
            raise ExerciseError(f"{what} should return a torch.Tensor (it is added to the loss and trained), got "
                                f"{type(got).__name__}. Hint: keep it a tensor: no .item(), no float(...).")
        expect_tensor(got.reshape(()) if got.numel() == 1 else got, want.detach(), what, mistakes, ORTH_HINT)
        expect_differentiable(got, what, "P and Q")
        got.sum().backward()
        for (P, Q), layer in zip(pairs, layers):
            for mine, theirs, name in ((P, layer.lora_B["default"], "P"), (Q, layer.lora_A["default"], "Q")):
                if mine.grad is None:
                    raise ExerciseError(f"{what}: the result does not depend on {name}. Hint: {ORTH_HINT}")
                expect_tensor(mine.grad, theirs.grad, f"the gradient of {what} with respect to {name}", [], ORTH_HINT)
    passed("adalora_orthogonal_penalty equals ml.orthogonal_penalty, value and gradients, on 3 random models.")


# ----------------------------------------------------------------------------- 5. stretch: the triplets to keep

KEEP_HINT = ("a triplet's score combines the score of its singular value with how important its column of P and its "
             "row of Q are on average (eq. 7); one budget is shared by all the triplets of the model, whichever layer "
             "they belong to, and the most important ones stay.")


@checker
def adalora_keep(student_fn, seed: int | None = None) -> None:
    """Exercise 5: adalora_keep(scores, budget) -> {layer: bool mask (r,)}, from per-entry scores
    {layer: {"P": (d_out, r), "E": (r, 1), "Q": (r, d_in)}}."""
    g = _generator(seed)
    trials = 4
    for trial in range(trials):
        n, init_r = _randint(g, 2, 4), _randint(g, 3, 6)
        shapes = _random_shapes(g, n, low=init_r, high=24)
        if trial == 0:  # a wide and a narrow layer, so that summing instead of averaging changes the choice
            shapes = [(6, 40), (40, 40)] + shapes[2:]
        model, names = _adalora_model(g, shapes, init_r)
        allocator = RankAllocator(model)
        scores = {}
        for lname, layer in _adalora_layers(model).items():
            entry = {}
            for key, attr in ATTRS.items():
                s = torch.rand(getattr(layer, attr)["default"].shape, generator=g) ** 3
                allocator.exp_avg[f"{lname}.{attr}"], allocator.uncertainty[f"{lname}.{attr}"] = s, torch.ones_like(s)
                entry[key] = s.clone()
            scores[lname] = entry
        total = n * init_r
        budget = _randint(g, max(1, total // 3), (2 * total) // 3)
        allocator.mask_to_budget(model, budget)
        want = {lname: layer.rank_mask["default"].clone() for lname, layer in _adalora_layers(model).items()}

        got = call(student_fn, {k: {a: t.clone() for a, t in v.items()} for k, v in scores.items()}, budget,
                   name="adalora_keep", hint=KEEP_HINT)
        what = f"adalora_keep with {n} layers of r = {init_r} ({total} triplets), budget {budget}"
        if not isinstance(got, dict) or set(got) != set(want):
            raise ExerciseError(f"{what} should return a dict with one mask per layer ({sorted(want)}), got "
                                f"{type(got).__name__}{' with keys ' + str(sorted(got)) if isinstance(got, dict) else ''}."
                                f" Hint: {KEEP_HINT}")
        for lname, mask in got.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != want[lname].shape:
                desc = (f"{type(mask).__name__} of dtype {mask.dtype} and shape {tuple(mask.shape)}"
                        if isinstance(mask, torch.Tensor) else type(mask).__name__)
                raise ExerciseError(f"{what}: the mask of {lname} should be a bool tensor of shape "
                                    f"{tuple(want[lname].shape)}, one entry per triplet, got {desc}. Hint: compare "
                                    "scores with a threshold to get a bool tensor.")
        if all(torch.equal(got[k], want[k]) for k in want):
            continue
        kept = sum(int(m.sum()) for m in got.values())
        triplet = {k: v["E"].view(-1) + v["P"].mean(0) + v["Q"].mean(1) for k, v in scores.items()}
        summed = {k: v["E"].view(-1) + v["P"].sum(0) + v["Q"].sum(1) for k, v in scores.items()}
        no_value = {k: v["P"].mean(0) + v["Q"].mean(1) for k, v in scores.items()}

        def top(per_layer, count, largest=True):
            flat = torch.cat([per_layer[k] for k in names])
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[flat.topk(count, largest=largest).indices] = True
            return dict(zip(names, chosen.split([init_r] * n)))

        per_layer_topk = {k: torch.zeros(init_r, dtype=torch.bool).index_fill_(
            0, triplet[k].topk(min(init_r, round(budget / n))).indices, True) for k in names}
        variants = [
            (top(triplet, budget, largest=False), "these are the least important triplets: keep the most important."),
            (per_layer_topk, "that keeps about the same number of triplets in every layer; the budget is shared by "
                             "the whole model, so that important layers can keep more than others."),
            (top(summed, budget), "a triplet's column of P and row of Q enter by their mean score, so that wide "
                                  "layers do not win just by having more entries."),
            (top(no_value, budget), "the triplet's singular value has a score of its own, which counts too."),
        ]
        hint = next((h for v, h in variants if all(torch.equal(got[k], v[k]) for k in names)), None)
        if hint is None and kept != budget:
            hint = f"the masks keep {kept} triplets in all; the budget is {budget}. {KEEP_HINT}"
        raise ExerciseError(f"{what}: the masks differ from RankAllocator.mask_to_budget's. Hint: {hint or KEEP_HINT}")
    passed(f"adalora_keep keeps the triplets RankAllocator.mask_to_budget keeps, on {trials} random models.")
