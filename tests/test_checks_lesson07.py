"""Lesson 07 (token-level mixture)'s exercise checkers: the right answers pass (written out here, and through the
package where it has the same computation), each plausible wrong answer fails with its own hint, and an
unfinished answer says so."""

import pytest
import torch

import minilora as ml
from minilora import checks
from minilora.methods.lora import LoraConfig

from adapters import fails_with, global_random_state_unchanged, placeholder, randomize_adapters, tiny_decoder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers

def tle(s, T, sign=True, top_only=True, divide=False, softmax=True):
    out = s.clone()
    for row in range(len(s)):  # the original's loop: the index of the largest score, that score changed
        i = int(s[row].argmax())
        v = s[row, i] if sign else s[row, i].abs()
        out[row, i] = v / T if divide else v * T
    if not top_only:
        out = s * T
    return torch.softmax(out, -1) if softmax else out


def mixed(x, W, As, Bs, scalings, w, scaled=True, per_example=True, weighted=True, faithful=False):
    y = x @ W.T
    if faithful:
        h = sum(w[:, i, None, None] * s * (x @ A.T) for i, (A, s) in enumerate(zip(As, scalings)))
        return y + h @ sum(Bs).T
    for i, (A, B, s) in enumerate(zip(As, Bs, scalings)):
        wi = (w[:, i] if per_example else w[0, i].expand(len(x))) if weighted else torch.ones_like(w[:, i])
        y = y + wi[:, None, None] * (s if scaled else 1.0) * (x @ A.T) @ B.T
    return y


def mixed_with_package(x, W, As, Bs, scalings, w):
    """ml.Mixture on one nn.Linear holding the adapters."""
    model = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False)).to(W.dtype)
    model[0].weight.data = W.clone()
    for i, (A, B, s) in enumerate(zip(As, Bs, scalings)):
        ml.inject(model, LoraConfig(r=A.shape[0], alpha=s * A.shape[0], target_modules=["0"]), f"a{i}")
        model[0].lora_A[f"a{i}"].weight.data, model[0].lora_B[f"a{i}"].weight.data = A.clone(), B.clone()
    model.config = None
    with torch.no_grad(), ml.Mixture(model, [f"a{i}" for i in range(len(As))]) as mix:
        mix.set_weights(w)
        return model(x)


def faithful(As, Bs, scalings, w, exact=False, weight_B=False, scaled=True):
    if exact:
        return sum(w[i] * s * B @ A for i, (A, B, s) in enumerate(zip(As, Bs, scalings)))
    A = sum(w[i] * (s if scaled else 1.0) * a for i, (a, s) in enumerate(zip(As, scalings)))
    B = sum(w[i] * b for i, b in enumerate(Bs)) if weight_B else sum(Bs)
    return B @ A


def positions(history, T, shift=False, latest=False):
    n_pos = T + len(history) - 1
    if latest:
        return history[-1:].expand(n_pos, -1)
    rows = [history[0]] * T + [history[k - 1 if shift else k] for k in range(1, len(history))]
    return torch.stack(rows)


@pytest.mark.parametrize("seed", SEEDS)
def test_lesson_07_right_answers_pass(seed, capsys):
    with global_random_state_unchanged():
        checks.tle_weights(tle, seed=seed)
        checks.mixed_lora_output(mixed, seed=seed)
        checks.mixed_lora_output(mixed_with_package, seed=seed)
        checks.faithful_delta_weight(faithful, seed=seed)
        checks.position_weights(positions, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 5
    faithful_line = next(line for line in lines if "equal weights: ||faithful - exact|| / ||exact|| = " in line)
    assert float(faithful_line.split("= ")[-1]) > 0.5  # the cross terms are no rounding error


def test_position_weights_checker_agrees_with_the_package():
    """The checker's answer is what Mixture.position_weights records in a real cached generation."""
    torch.manual_seed(0)
    model = tiny_decoder().double()
    for i, name in enumerate(("a", "b")):
        ml.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name)
        randomize_adapters(model, name, seed=i, std=0.3)
    embedder = ml.MeanPooledEmbedder(tiny_decoder().double(), None)
    centroids = torch.cat([embedder.start(torch.randint(3, 64, (1, 6))) for _ in range(2)])
    router = ml.Router(centroids, ["a", "b"], ml.RouterConfig(rule="temperature", temperature=0.02))
    with ml.Mixture(model, ["a", "b"]) as mix:
        mix.generate(router, embedder, torch.randint(3, 64, (1, 4)), 5, eos_token_id=-1)
    torch.testing.assert_close(mix.position_weights()[0], positions(mix.history[0], 4), rtol=0, atol=0)
    assert (mix.history[0, 1:] - mix.history[0, :-1]).abs().max() > 1e-3  # the weights move: an off-by-one shows


# ----------------------------------------------------------------------------- wrong answers

@pytest.mark.parametrize("wrong, hint", [
    (lambda s, T: tle(s, T, top_only=False), "not every one"),
    (lambda s, T: tle(s, T, divide=True), "multiplied by T, not divided"),
    (lambda s, T: tle(s, T, sign=False), "keep the sign"),
    (lambda s, T: torch.softmax(s, -1), "changed before the softmax"),
    (lambda s, T: tle(s, T, softmax=False), "out of a softmax"),
    (lambda s, T: torch.softmax(s * T, 0), "only one similarity per row"),
])
def test_tle_weights_rejects_wrong_answers(wrong, hint):
    fails_with(checks.tle_weights, wrong, hint=hint)


@pytest.mark.parametrize("wrong, hint", [
    (lambda *a: mixed(*a, scaled=False), "its own scaling s_i"),
    (lambda *a: mixed(*a, per_example=False), "every example has its own row"),
    (lambda *a: mixed(*a, weighted=False), "weight each adapter's update by w_i"),
    (lambda x, W, As, Bs, s, w: mixed(x, W, As, Bs, s, w) + 1e-3, "never build a d_out x d_in matrix"),
])
def test_mixed_lora_output_rejects_wrong_answers(wrong, hint):
    fails_with(checks.mixed_lora_output, wrong, hint=hint)


def test_mixed_lora_output_rejects_an_answer_that_builds_the_updates():
    def merged(x, W, As, Bs, scalings, w):  # right values, but every B_i A_i formed as a d_out x d_in matrix
        return x @ W.T + sum(w[:, i, None, None] * s * (x @ (B @ A).T) for i, (A, B, s) in enumerate(zip(As, Bs, scalings)))
    fails_with(checks.mixed_lora_output, merged, hint="forms a d_out x d_in matrix")


def test_mixed_lora_output_names_the_faithful_mistake():
    """The faithful combination can only be told by name where the ranks match (the second case): the first case's
    general hint comes first, so run the checker where the faithful answer is right on case 1 and wrong on 2."""
    def faithful_on_equal_ranks(x, W, As, Bs, scalings, w):
        same = len({A.shape[0] for A in As}) == 1
        return mixed(x, W, As, Bs, scalings, w, faithful=same)
    fails_with(checks.mixed_lora_output, faithful_on_equal_ranks, hint="cross terms B_j A_i")


@pytest.mark.parametrize("wrong, hint", [
    (lambda *a: faithful(*a, exact=True), "sums the B_j without weights"),
    (lambda *a: faithful(*a, weight_B=True), "the weights go on the A side only"),
    (lambda *a: faithful(*a, scaled=False), "carries its adapter's scaling"),
    (lambda As, Bs, s, w: faithful(As, Bs, s, w).T, "wrong shape"),
])
def test_faithful_delta_weight_rejects_wrong_answers(wrong, hint):
    fails_with(checks.faithful_delta_weight, wrong, hint=hint)


@pytest.mark.parametrize("wrong, hint", [
    (lambda h, T: positions(h, T, shift=True), "the step after the one that chose it"),
    (lambda h, T: positions(h, T, latest=True), "each position keeps its own"),
    (lambda h, T: positions(h, T).float(), "wrong dtype"),
])
def test_position_weights_rejects_wrong_answers(wrong, hint):
    fails_with(checks.position_weights, wrong, hint=hint)


@pytest.mark.parametrize("check", [checks.tle_weights, checks.mixed_lora_output, checks.faithful_delta_weight,
                                   checks.position_weights])
def test_unfinished_answers_say_so(check):
    fails_with(check, placeholder, hint="is not implemented yet")
