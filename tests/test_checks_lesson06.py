"""Lesson 06 (hypernetwork adapters)'s exercise checkers: the right answers pass, each plausible wrong answer fails
with its own hint, and an unfinished answer says so."""

import pytest
import torch
import torch.nn.functional as F

import minilora as ml
from minilora import checks

from adapters import fails_with, global_random_state_unchanged, placeholder

SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- right answers

def align_count(cfg, k, hidden, pooling, gates=lambda cfg: cfg.n_layers * cfg.n_heads, biases=True, query=True,
                generator=True):
    d = cfg.d_model
    first = d * hidden + biases * hidden
    second = hidden * k * d + biases * k * d if generator else k * d
    return first + second + gates(cfg) + (d if pooling == "attention" and query else 0)


def align_count_with_package(cfg, k, hidden, pooling):
    with torch.device("meta"):
        model = ml.Seq2SeqLM(cfg)
    ml.AlignmentAdapter(model, ml.AlignmentConfig(num_prefix=k, hidden=hidden, pooling=pooling))
    return ml.trainable_report(model, verbose=False).trainable


def prefix(E, mask, W1, b1, W2, b2, k, act=F.gelu, pool=None):
    e = pool(E, mask) if pool else (E * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return (act(e @ W1.T + b1) @ W2.T + b2).view(len(E), k, -1)


def branch(x, prefix, attn, norm, gate, squash=torch.tanh, normed=True, scale=True, gate_after=False):
    B, T, d = x.shape
    nh, hs = attn.n_heads, attn.head_dim
    heads = lambda t: t.view(len(t), -1, nh, hs).transpose(1, 2)  # (B, nh, length, hs)
    p = norm(prefix) if normed else prefix
    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(p)), heads(attn.v_proj(p))
    w = torch.softmax(q @ k.transpose(-1, -2) * (attn.scale if scale else 1.0), dim=-1)
    y = w @ v if gate_after else squash(gate)[None, :, None, None] * (w @ v)
    out = attn.o_proj(y.transpose(1, 2).reshape(B, T, d))
    if gate_after:
        out = (out.view(B, T, nh, hs) * squash(gate)[:, None]).reshape(B, T, d)
    return out


def branch_with_sdpa(x, prefix, attn, norm, gate):
    B, T, d = x.shape
    heads = lambda t: attn._heads(t, attn.n_heads)
    p = norm(prefix)
    y = F.scaled_dot_product_attention(heads(attn.q_proj(x)), heads(attn.k_proj(p)), heads(attn.v_proj(p)),
                                       scale=attn.scale)
    return attn.o_proj((torch.tanh(gate)[:, None, None] * y).transpose(1, 2).reshape(B, T, d))


def hyper_count(cfg, n_tasks, e, hidden, projected, rf, biases=True, project_norm=True, layers=None,
                task_table=lambda n, L: n, positions=2, gain_shift=True):
    d, m = cfg.d_model, cfg.d_model // rf
    L = cfg.n_layers + cfg.n_encoder_layers if layers is None else layers(cfg)
    embeddings = e * (task_table(n_tasks, L) + L + positions)
    project = 3 * e * hidden + hidden + hidden * projected + projected + (2 * projected if project_norm else 0)
    outs = [m * d, m, d * m, d] + ([d, d] if gain_shift else [])
    generators = sum(projected * n + (n if biases else 0) for n in outs)
    return embeddings + project + generators


def hyper_count_with_package(cfg, n_tasks, e, hidden, projected, rf):
    with torch.device("meta"):
        model = ml.Seq2SeqLM(cfg)
    config = ml.TaskHyperConfig(tasks=[str(i) for i in range(n_tasks)], embedding_dim=e, hidden=hidden,
                                projected=projected, reduction_factor=rf, train_norms=False)
    return sum(p.numel() for p in ml.TaskHyperAdapter(model, config).parameters())


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def adapter(h, down_w, down_b, up_w, up_b, gain, shift, act=gelu_tanh, residual=True, norm=True, gain_first=False):
    u = act(torch.einsum("btd,bmd->btm", h, down_w) + down_b[:, None])
    o = torch.einsum("btm,bdm->btd", u, up_w) + up_b[:, None]
    if gain_first:
        o = F.layer_norm(o * gain[:, None], o.shape[-1:]) + shift[:, None]
    elif norm:
        o = F.layer_norm(o, o.shape[-1:]) * gain[:, None] + shift[:, None]
    else:
        o = o * gain[:, None] + shift[:, None]
    return h + o if residual else o


def adapter_by_example(h, down_w, down_b, up_w, up_b, gain, shift):
    out = []
    for i in range(len(h)):
        z = h[i] @ down_w[i].T + down_b[i]
        o = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3))) @ up_w[i].T + up_b[i]
        mu, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
        out.append(h[i] + (o - mu) / torch.sqrt(var + 1e-5) * gain[i] + shift[i])
    return torch.stack(out)


@pytest.mark.parametrize("seed", SEEDS)
def test_lesson_06_right_answers_pass(seed, capsys):
    checks.alignment_param_count(align_count, seed=seed)
    checks.alignment_param_count(align_count_with_package, seed=seed)
    checks.generate_prefix(prefix, seed=seed)
    checks.prefix_branch(branch, seed=seed)
    checks.prefix_branch(branch_with_sdpa, seed=seed)
    checks.hyperformer_param_count(hyper_count, seed=seed)
    checks.hyperformer_param_count(hyper_count_with_package, seed=seed)
    checks.task_adapter(adapter, seed=seed)
    checks.task_adapter(adapter_by_example, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("✓ ") for line in lines) == 9
    assert "37,932 trainable parameters" in lines[1]  # (128·32 + 32) + (32·8·128 + 8·128) + 3 layers · 4 heads
    hyper = [line for line in lines if "one shared hypernetwork" in line]
    assert "3 tasks" in hyper[0] and "30 tasks" in hyper[1]
    assert "125,572" in hyper[0] and "127,300" in hyper[1]  # 27 more tasks: 27 · 64 more
    assert "221,184" in hyper[0] and "2,211,840" in hyper[1]  # LoRA r = 4: 73,728 per adapter


def test_lesson_06_checks_leave_the_global_random_state_alone():
    with global_random_state_unchanged():
        checks.alignment_param_count(align_count)
        checks.generate_prefix(prefix)
        checks.prefix_branch(branch)
        checks.hyperformer_param_count(hyper_count)
        checks.task_adapter(adapter)


# ----------------------------------------------------------------------------- 1. the alignment adapter's size

@pytest.mark.parametrize("seed", SEEDS)
def test_alignment_count_rejects_common_mistakes(seed):
    check = checks.alignment_param_count
    fails_with(check, lambda *a: align_count(*a, biases=False), hint="has a bias as well as a weight", seed=seed)
    fails_with(check, lambda *a: align_count(*a, gates=lambda c: c.n_layers), hint="per decoder layer and per head",
               seed=seed)
    fails_with(check, lambda *a: align_count(*a, query=False), hint="learned query", seed=seed)
    fails_with(check, lambda *a: align_count(*a, generator=False), hint="the prefix P is not a parameter", seed=seed)
    fails_with(check, lambda cfg, k, *a: k * cfg.d_model + cfg.n_layers * cfg.n_heads
               + (cfg.d_model if a[-1] == "attention" else 0), hint="the prefix P is not a parameter", seed=seed)
    fails_with(check, lambda *a: align_count(*a, gates=lambda c: c.n_encoder_layers * c.n_heads),
               hint="not the encoder's", seed=seed)
    fails_with(check, lambda *a: align_count(*a, gates=lambda c: (c.n_encoder_layers + c.n_layers) * c.n_heads),
               hint="the encoder never reads the prefix", seed=seed)


def test_alignment_count_must_be_an_int():
    fails_with(checks.alignment_param_count, lambda *a: float(align_count(*a)), hint="whole number (int)")


# ----------------------------------------------------------------------------- 2. generating the prefix

@pytest.mark.parametrize("seed", SEEDS)
def test_prefix_rejects_common_mistakes(seed):
    check = checks.generate_prefix
    fails_with(check, lambda *a: prefix(*a, pool=lambda E, mask: E.mean(1)), hint="padding included", seed=seed)
    fails_with(check, lambda *a: prefix(*a, pool=lambda E, mask: (E * mask[..., None]).sum(1)),
               hint="summed but not averaged", seed=seed)
    fails_with(check, lambda *a: prefix(*a, act=F.relu), hint="GELU, not ReLU", seed=seed)
    fails_with(check, lambda *a: prefix(*a, act=torch.tanh), hint="GELU, not tanh", seed=seed)
    fails_with(check, lambda *a: prefix(*a, act=gelu_tanh),
               hint="not its tanh approximation", seed=seed)
    fails_with(check, lambda *a: prefix(*a, act=lambda x: x), hint="one linear map", seed=seed)

    def transposed(E, mask, W1, b1, W2, b2, k):
        return prefix(E, mask, W1, b1, W2, b2, k).reshape(len(E), -1).view(len(E), -1, k).transpose(1, 2)
    fails_with(check, transposed, hint="one after the other", seed=seed)


def test_prefix_wrong_shape_is_named():
    fails_with(checks.generate_prefix, lambda *a: prefix(*a).flatten(1), hint="has the wrong shape: expected")


# ----------------------------------------------------------------------------- 3. the prefix branch

@pytest.mark.parametrize("seed", SEEDS)
def test_branch_rejects_common_mistakes(seed):
    check = checks.prefix_branch
    fails_with(check, lambda *a: branch(*a, squash=lambda g: g), hint="squashed by tanh", seed=seed)
    fails_with(check, lambda *a: branch(*a, squash=torch.ones_like), hint="the branch begins closed", seed=seed)
    fails_with(check, lambda *a: branch(*a, normed=False), hint="same input norm", seed=seed)
    fails_with(check, lambda *a: branch(*a, scale=False), hint="attn.scale", seed=seed)
    fails_with(check, lambda *a: branch(*a, gate_after=True), hint="before o_proj", seed=seed)

    def softmax_over_queries(x, prefix, attn, norm, gate):
        B, T, d = x.shape
        heads = lambda t: attn._heads(t, attn.n_heads)
        q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(norm(prefix))), heads(attn.v_proj(norm(prefix)))
        w = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-2)
        return attn.o_proj((torch.tanh(gate)[:, None, None] * (w @ v)).transpose(1, 2).reshape(B, T, d))
    fails_with(check, softmax_over_queries, hint="every query's weights sum to 1", seed=seed)

    def heads_not_moved_back(x, prefix, attn, norm, gate):
        B, T, d = x.shape
        heads = lambda t: attn._heads(t, attn.n_heads)
        q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(norm(prefix))), heads(attn.v_proj(norm(prefix)))
        y = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
        return attn.o_proj((torch.tanh(gate)[:, None, None] * y).reshape(B, T, d))
    fails_with(check, heads_not_moved_back, hint="heads side by side again", seed=seed)


# ----------------------------------------------------------------------------- 4. Hyperformer's size

@pytest.mark.parametrize("seed", SEEDS)
def test_hyperformer_count_rejects_common_mistakes(seed):
    check = checks.hyperformer_param_count
    fails_with(check, lambda *a: hyper_count(*a, biases=False), hint="every generator is an nn.Linear with a bias",
               seed=seed)
    fails_with(check, lambda *a: hyper_count(*a, project_norm=False), hint="ends with a layer norm", seed=seed)
    fails_with(check, lambda *a: hyper_count(*a, layers=lambda c: c.n_layers), hint="its own layer id", seed=seed)
    fails_with(check, lambda *a: hyper_count(*a, task_table=lambda n, L: n * L), hint="shared by every layer",
               seed=seed)
    fails_with(check, lambda *a: hyper_count(*a, positions=0), hint="the sublayer position", seed=seed)
    fails_with(check, lambda *a: hyper_count(*a, gain_shift=False), hint="the gain and the shift", seed=seed)

    def with_model_norms(cfg, *a):
        norms = (2 * cfg.n_encoder_layers + 3 * cfg.n_layers + 2) * cfg.d_model
        return hyper_count(cfg, *a) + norms
    fails_with(check, with_model_norms, hint="train_norms=False", seed=seed)
    # a count that grows by more than one embedding per task (here, a generator of its own for every task)
    fails_with(check, lambda cfg, n, *a: n * hyper_count(cfg, 1, *a), hint="only the task embedding table grows",
               seed=seed)
    fails_with(check, lambda cfg, n, *a: hyper_count(cfg, 1, *a), hint="does not change with the number of tasks",
               seed=seed)


def test_hyperformer_count_must_be_an_int():
    fails_with(checks.hyperformer_param_count, lambda *a: float(hyper_count(*a)), hint="whole number (int)")


# ----------------------------------------------------------------------------- 5. one generated adapter

@pytest.mark.parametrize("seed", SEEDS)
def test_task_adapter_rejects_common_mistakes(seed):
    check = checks.task_adapter
    fails_with(check, lambda *a: adapter(*a, residual=False), hint="adds its output to h", seed=seed)
    fails_with(check, lambda *a: adapter(*a, act=F.relu), hint="not ReLU", seed=seed)
    fails_with(check, lambda *a: adapter(*a, act=F.silu), hint="not swish", seed=seed)
    fails_with(check, lambda *a: adapter(*a, act=F.gelu), hint="the tanh approximation", seed=seed)
    fails_with(check, lambda *a: adapter(*a, norm=False), hint="normalised (a layer norm over the features)",
               seed=seed)
    fails_with(check, lambda h, *a: h + adapter(h, *a[:4], torch.ones_like(a[4]), torch.zeros_like(a[5]),
                                                residual=False, norm=False),
               hint="with the generated gain and shift", seed=seed)
    fails_with(check, lambda *a: adapter(*a, gain_first=True), hint="normalise first, then scale", seed=seed)

    def unbiased(h, down_w, down_b, up_w, up_b, gain, shift):
        o = torch.einsum("btm,bdm->btd", gelu_tanh(torch.einsum("btd,bmd->btm", h, down_w) + down_b[:, None]), up_w)
        o = o + up_b[:, None]
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, keepdim=True) + 1e-5)
        return h + o * gain[:, None] + shift[:, None]
    fails_with(check, unbiased, hint="the biased variance", seed=seed)
    fails_with(check, lambda h, *w: adapter(h, *(t[:1].expand_as(t) for t in w)), hint="its own generated adapter",
               seed=seed)


def test_task_adapter_wrong_dtype_is_named():
    fails_with(checks.task_adapter, lambda *a: adapter(*a).float() if a[0].dtype == torch.float64 else
               adapter(*a).double(), hint="has the wrong dtype")


def test_lesson_06_not_implemented_yet_is_reported_as_such():
    for check in (checks.alignment_param_count, checks.generate_prefix, checks.prefix_branch,
                  checks.hyperformer_param_count, checks.task_adapter):
        fails_with(check, placeholder, hint="is not implemented yet")
