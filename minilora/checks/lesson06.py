"""Checkers for lesson 06 (hypernetwork adapters)'s exercises (the machinery and how to write one: core.py)."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora import (AlignmentAdapter, AlignmentConfig, LoraConfig, Seq2SeqLM, TaskHyperAdapter, TaskHyperConfig,
                      get_config, inject, load_base, trainable_report)

from .core import (call, checker, ExerciseError, expect_int, expect_tensor, passed, _choice, _generator, _randint)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _seq2seq_config(g, d_model=None, n_heads=None, n_layers=None, n_encoder_layers=None):
    """A small random encoder-decoder config; what is not given is drawn, with unequal encoder and decoder depths so
    that a count over the wrong stack shows."""
    n_heads = n_heads or _choice(g, [2, 4])
    d_model = d_model or n_heads * _choice(g, [4, 6, 8])
    n_layers = n_layers or _randint(g, 2, 4)
    n_encoder_layers = n_encoder_layers or _choice(g, [n for n in range(1, 6) if n != n_layers])
    return get_config("seq2seq-tiny", vocab_size=32, max_seq_len=16, d_model=d_model, n_heads=n_heads,
                      n_kv_heads=n_heads, n_layers=n_layers, n_encoder_layers=n_encoder_layers, d_ff=2 * d_model)


def _meta_model(cfg) -> Seq2SeqLM:
    """A Seq2SeqLM with no storage: enough to build an adapter on, or to count one's parameters."""
    with torch.device("meta"):
        return Seq2SeqLM(cfg)


def _all_distinct(values) -> bool:
    return len(set(values)) == len(values)


def _wrong_count(name: str, case: str, got: int, want: int, mistakes: list[tuple[int, str]], hint: str):
    """The ExerciseError for a count that is off: the hint of the mistake it equals, or the general one."""
    hint = next((h for wrong, h in mistakes if got == wrong), hint)
    off = "too large" if got > want else "too small"
    return ExerciseError(f"{name} for {case}: got {got:,}, {off}. Hint: {hint}")


# ----------------------------------------------------------------------------- 1. the alignment adapter's size

ALIGN_COUNT_HINT = ("count what the optimiser updates: the hypernetwork's two linear layers (encoder summary to hidden, "
                    "hidden to the k generated vectors of d_model), the gates, and for attention pooling the learned "
                    "query. The prefix itself is an output, not a parameter.")


@checker
def alignment_param_count(student_fn, seed: int | None = None) -> None:
    """Exercise 1: alignment_param_count(cfg, num_prefix, hidden, pooling) -> the alignment adapter's trainable
    parameters (cross_rank 0)."""
    g = _generator(seed)
    poolings = ["attention", "mean", "attention", "mean", "attention"]  # the first case tells every mistake apart
    for pooling in poolings:
        for _ in range(1000):  # redraw until every mistake gives its own count
            cfg = _seq2seq_config(g)
            k, hidden = _randint(g, 2, 12), _randint(g, 4, 40)
            model = _meta_model(cfg)
            AlignmentAdapter(model, AlignmentConfig(num_prefix=k, hidden=hidden, pooling=pooling))
            want = trainable_report(model, verbose=False).trainable
            d, L, Le, H = cfg.d_model, cfg.n_layers, cfg.n_encoder_layers, cfg.n_heads
            query = d if pooling == "attention" else 0
            first, gates = d * hidden + hidden, L * H
            mistakes = [
                (want - hidden - k * d, "each of the hypernetwork's two linear layers has a bias as well as a weight."),
                (want - gates + L, "the gate is per decoder layer and per head: each head of each layer opens its "
                                   "own."),
                (want - gates + Le * H, "the prefix is read by the decoder's self-attention, so the gates belong to "
                                        "the decoder's layers, not the encoder's."),
                (want + Le * H, "the gates belong to the decoder's layers only: the encoder never reads the prefix."),
                (first + k * d + gates + query, "the prefix P is not a parameter: it is generated for every input, by "
                                                "a second linear layer (hidden to k·d), and that layer's weight and "
                                                "bias are what train."),
                (k * d + gates + query, "the prefix P is not a parameter: a small network generates it from the "
                                        "encoder's summary, and that network's weights and biases are what train."),
            ]
            if pooling == "attention":
                mistakes.append((want - d, "attention pooling scores the encoder states against a learned query "
                                           "vector of d_model, which trains too."))
            if _all_distinct([want] + [m for m, _ in mistakes]):
                break
        else:
            raise RuntimeError("no random model tells the mistakes apart")

        got = call(student_fn, copy.deepcopy(cfg), k, hidden, pooling, name="alignment_param_count",
                   hint=ALIGN_COUNT_HINT)
        expect_int(got, "alignment_param_count")
        if got != want:
            case = (f"d_model={d}, n_heads={H}, {L} decoder and {Le} encoder layers, num_prefix={k}, hidden={hidden}, "
                    f"pooling={pooling!r}")
            raise _wrong_count("alignment_param_count", case, got, want, mistakes, ALIGN_COUNT_HINT)

    tiny = load_base("seq2seq-tiny").config  # the committed base, with its real vocabulary of 1,331 tokens
    n = call(student_fn, tiny, 8, 32, "mean", name="alignment_param_count", hint=ALIGN_COUNT_HINT)
    passed(f"alignment_param_count agrees with ml.AlignmentAdapter on {len(poolings)} random models.")
    print(f"  seq2seq-tiny with k = 8 and hidden 32 (the lesson's adapter): {n:,} trainable parameters, "
          f"{100 * n / tiny.num_parameters():.2f}% of the base's {tiny.num_parameters():,}.")


# ----------------------------------------------------------------------------- 2. generating the prefix

PREFIX_HINT = ("average each example's encoder states over its real positions only (mask 1), send that vector "
               "through the first linear layer and the exact GELU, then the second linear layer gives k·d numbers "
               "per example, which are the k vectors of d one after the other. W is (d_out, d_in), as in nn.Linear.")


def _alignment_adapter(d: int, k: int, hidden: int, dtype=torch.float32, pooling: str = "mean") -> AlignmentAdapter:
    """An unattached ml.AlignmentAdapter for states of width d (the model it is built on has no storage)."""
    model = _meta_model(get_config("seq2seq-tiny", vocab_size=32, max_seq_len=16, d_model=d, n_heads=2, d_ff=2 * d,
                                   n_layers=1, n_encoder_layers=1))
    config = AlignmentConfig(num_prefix=k, hidden=hidden, pooling=pooling)
    return AlignmentAdapter(model, config, _attach=False).to(dtype)


def _padding_mask(g, B: int, T: int, dtype) -> torch.Tensor:
    """(B, T) 0/1, right-padded: the first row is full, every other row is shorter, none is empty."""
    lengths = [T] + [_randint(g, 1, T - 1) for _ in range(B - 1)]
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


@checker
def generate_prefix(student_fn, seed: int | None = None) -> None:
    """Exercise 2: generate_prefix(E, mask, W1, b1, W2, b2, k) -> the generated prefix P (B, k, d)."""
    g = _generator(seed)
    trials = [(4, 6, 16, 3, 12, torch.float32), (3, 5, 12, 4, 8, torch.float32), (5, 7, 8, 2, 20, torch.float64),
              (2, 4, 16, 5, 6, torch.float64)]  # B, T, d, k, hidden, dtype
    for B, T, d, k, hidden, dtype in trials:
        E = torch.randn(B, T, d, generator=g, dtype=dtype)  # padded positions hold states too, as in a real encoder
        mask = _padding_mask(g, B, T, dtype)
        W1 = torch.randn(hidden, d, generator=g, dtype=dtype) / d ** 0.5 * 2
        b1 = torch.randn(hidden, generator=g, dtype=dtype)
        W2 = torch.randn(k * d, hidden, generator=g, dtype=dtype) / hidden ** 0.5
        b2 = torch.randn(k * d, generator=g, dtype=dtype)
        adapter = _alignment_adapter(d, k, hidden, dtype)
        with torch.no_grad():
            for layer, W, b in ((adapter.hyper, W1, b1), (adapter.to_prefix, W2, b2)):
                layer.weight.copy_(W)
                layer.bias.copy_(b)
            want = adapter.condition(E, mask)[1]
            masked_mean = (E * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            generate = lambda pooled, act=F.gelu: adapter.to_prefix(act(adapter.hyper(pooled))).view(B, k, d)
            mistakes = [
                (generate(E.mean(1)), "the mean runs over every position, padding included; only the real positions "
                                      "(mask 1) count, and the divisor is how many of them each example has."),
                (generate((E * mask[..., None]).sum(1)), "the masked states are summed but not averaged: divide by "
                                                         "how many real positions each example has."),
                (generate(masked_mean, F.relu), "the hidden layer's non-linearity is GELU, not ReLU."),
                (generate(masked_mean, torch.tanh), "the hidden layer's non-linearity is GELU, not tanh."),
                (generate(masked_mean, lambda x: F.gelu(x, approximate="tanh")),
                 "the package uses the exact GELU (with the error function), not its tanh approximation."),
                (generate(masked_mean, lambda x: x), "the hidden layer needs its non-linearity, GELU: without it the "
                                                     "two layers are one linear map."),
                (adapter.to_prefix(F.gelu(adapter.hyper(masked_mean))).view(B, d, k).transpose(1, 2),
                 "the k·d numbers are k vectors of d one after the other: vector j is numbers j·d to (j+1)·d."),
            ]
        got = call(student_fn, E.clone(), mask.clone(), W1.clone(), b1.clone(), W2.clone(), b2.clone(), k,
                   name="generate_prefix", hint=PREFIX_HINT)
        lengths = mask.sum(1).long().tolist()
        expect_tensor(got, want, f"generate_prefix's prefix for E of shape {tuple(E.shape)} (real lengths {lengths}), "
                                 f"k={k}, hidden={hidden}", mistakes, PREFIX_HINT)
    passed(f"generate_prefix equals ml.AlignmentAdapter.condition on {len(trials)} padded batches.")


# ----------------------------------------------------------------------------- 3. the prefix branch

BRANCH_HINT = ("the prefix goes through the layer's input norm, then k_proj and v_proj, split into heads like the "
               "queries from q_proj(x); each query attends over the k prefix positions alone, with the layer's own "
               "scale; head h's result is multiplied by tanh of its gate, then the heads, side by side again, go "
               "through o_proj.")


def _branch_variant(x, prefix, attn, norm, gate, squash=torch.tanh, normed=True, scale=None, over=-1,
                    gate_after=False, heads_back=True):
    """What the prefix branch gives with one thing changed: the plausible wrong answers the hints name."""
    B, T, _ = x.shape
    heads = lambda t: attn._heads(t, attn.n_heads)
    p = norm(prefix) if normed else prefix
    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(p)), heads(attn.v_proj(p))
    w = torch.softmax(q @ k.transpose(-1, -2) * (attn.scale if scale is None else scale), dim=over)
    factor = squash(gate)[None, :, None, None]
    y = w @ v if gate_after else factor * (w @ v)  # (B, nh, T, hs)
    y = y.transpose(1, 2).reshape(B, T, -1) if heads_back else y.reshape(B, T, -1)
    out = attn.o_proj(y)
    if gate_after:  # the gates multiply o_proj's output, one per block of its features
        out = (out.view(B, T, attn.n_heads, -1) * squash(gate)[:, None]).reshape(B, T, -1)
    return out


def _random_seq2seq(g, cfg) -> Seq2SeqLM:
    """A Seq2SeqLM whose first decoder layer has attention weights large enough that the softmax is far from uniform
    (T5's initialisation makes it almost flat) and an input norm whose weight is not all ones."""
    model = Seq2SeqLM(cfg)
    layer = model.decoder.layers[0]
    with torch.no_grad():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) / proj.in_features ** 0.5)
        layer.input_layernorm.weight.copy_(torch.rand(cfg.d_model, generator=g) + 0.5)
    return model


def _distinct_gates(g, n: int) -> torch.Tensor:
    """n raw gate values in [-1.5, 1.5], at least 0.2 apart and none near 0, so that a per-head mistake shows."""
    while True:
        gate = torch.rand(n, generator=g) * 3 - 1.5
        gaps = (gate[:, None] - gate[None, :]).abs() + torch.eye(n) * 9
        if gaps.min() > 0.2 and gate.abs().min() > 0.2:
            return gate


@checker
def prefix_branch(student_fn, seed: int | None = None) -> None:
    """Exercise 3: prefix_branch(x, prefix, attn, norm, gate) -> what the alignment adapter adds to a decoder layer's
    self-attention output (B, T, d)."""
    g = _generator(seed)
    trials = [(2, 8, 3, 5, 4), (4, 4, 2, 6, 3), (2, 6, 4, 3, 7), (4, 8, 3, 2, 4)]  # n_heads, head_dim, B, T, k
    for n_heads, head_dim, B, T, k in trials:
        cfg = _seq2seq_config(g, d_model=n_heads * head_dim, n_heads=n_heads, n_layers=1, n_encoder_layers=1)
        model = _random_seq2seq(g, cfg)
        layer = model.decoder.layers[0]
        attn, norm = layer.self_attn, layer.input_layernorm
        x = torch.randn(B, T, cfg.d_model, generator=g)
        prefix = 3 * torch.randn(B, k, cfg.d_model, generator=g)  # far from unit size, so that the norm matters
        gate = _distinct_gates(g, n_heads)
        adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=k), _attach=False)
        with torch.no_grad():
            adapter.gate[0].copy_(gate)
            adapter._state = (None, None, prefix)  # what the adapter generated for this batch
            hook = adapter._prefix_hook(0, layer)  # the forward hook it puts on attn: adds the branch to the output
            want = hook(attn, (x,), {}, (torch.zeros_like(x), None))[0]
            variant = lambda **change: _branch_variant(x, prefix, attn, norm, gate, **change)
            mistakes = [
                (variant(squash=lambda t: t), "each head's gate is squashed by tanh before it multiplies: the raw "
                                              "parameter starts at 0 and can grow without bound, tanh of it stays "
                                              "in (-1, 1)."),
                (variant(squash=torch.ones_like), "each head's result is multiplied by tanh of that head's gate, "
                                                  "which is 0 at the start: the branch begins closed."),
                (variant(normed=False), "the prefix is a decoder input like the tokens, so it goes through the same "
                                        "input norm before k_proj and v_proj."),
                (variant(scale=1.0), "the scores are scaled as in the layer's own attention (attn.scale)."),
                (variant(over=-2), "the softmax runs over the k prefix positions, for each query: every query's "
                                   "weights sum to 1."),
                (variant(gate_after=True), "the gate multiplies each head's attention result before o_proj; after "
                                           "o_proj the heads are mixed, and a block of its features is not one head."),
                (variant(heads_back=False), "before o_proj, each position needs its heads side by side again: move "
                                            "the head axis back next to the feature axis before merging them."),
            ]
        got = call(student_fn, x.clone(), prefix.clone(), copy.deepcopy(attn), copy.deepcopy(norm), gate.clone(),
                   name="prefix_branch", hint=BRANCH_HINT)
        expect_tensor(got, want, f"prefix_branch's output for x of shape {tuple(x.shape)}, a prefix of {k} vectors, "
                                 f"{n_heads} heads of {head_dim}", mistakes, BRANCH_HINT)
    passed(f"prefix_branch adds what ml.AlignmentAdapter's hook adds, on {len(trials)} random decoder layers.")


# ----------------------------------------------------------------------------- 4. Hyperformer's size

HYPER_COUNT_HINT = ("the hypernetwork holds three embedding tables (tasks, every layer of encoder and decoder, the two "
                    "sublayer positions), the projection (two linear layers and a layer norm), and six linear "
                    "generators, one per generated tensor: D, b_D, U, b_U, the gain and the shift. Every nn.Linear "
                    "has a bias; m = d_model // reduction_factor.")


@checker
def hyperformer_param_count(student_fn, seed: int | None = None) -> None:
    """Exercise 4: hyperformer_param_count(cfg, n_tasks, embedding_dim, hidden, projected, reduction_factor) -> the
    parameters of TaskHyperAdapter's hypernetwork (train_norms=False)."""
    g = _generator(seed)
    task_counts = [4, 1, 7, 12, 2]  # not 3: one task short of 3 would count like the two positions forgotten
    for n_tasks in task_counts:
        for _ in range(1000):  # redraw until every mistake gives its own count
            cfg = _seq2seq_config(g, d_model=_choice(g, [2, 4]) * _choice(g, [6, 8, 12]))
            e, hidden, projected = _randint(g, 3, 16), _randint(g, 8, 32), _randint(g, 3, 16)
            rf = _choice(g, [f for f in (2, 3, 4, 5, 8) if cfg.d_model // f >= 1])
            model = _meta_model(cfg)
            config = TaskHyperConfig(tasks=[f"task{i}" for i in range(n_tasks)], embedding_dim=e, hidden=hidden,
                                     projected=projected, reduction_factor=rf, train_norms=False)
            adapter = TaskHyperAdapter(model, config, _attach=False)
            want = sum(p.numel() for p in adapter.parameters())
            with_norms = TaskHyperAdapter(model, TaskHyperConfig(tasks=["t"], reduction_factor=1), _attach=False)
            norms = sum(p.numel() for p in with_norms.extra_state().values())  # the model's, for one hint
            d, m, Ld, Le = cfg.d_model, cfg.d_model // rf, cfg.n_layers, cfg.n_encoder_layers
            L = Ld + Le
            generator_biases = m * d + m + d * m + d + d + d
            mistakes = [
                (want - generator_biases, "every generator is an nn.Linear with a bias: its output has one bias "
                                          "entry per generated number."),
                (want - generator_biases - hidden - projected, "every nn.Linear here has a bias, the projection's "
                                                               "and the generators'."),
                (want - 2 * projected, "the projection ends with a layer norm, which has a gain and a bias of its own."),
                (want - e * Le, "every layer of the encoder and of the decoder has its own layer id: the adapters sit "
                                "in both stacks."),
                (want - e * Ld, "every layer of the encoder and of the decoder has its own layer id: the adapters sit "
                                "in both stacks."),
                (want + n_tasks * e * (L - 1), "a task has one embedding, shared by every layer: the layer embedding "
                                               "is what tells the layers apart."),
                (want + n_tasks * e * (2 * L - 1), "a task has one embedding, shared by every layer and position: the "
                                                   "layer and position embeddings tell them apart."),
                (want - 2 * e, "the sublayer position (self-attention or feed-forward) has an embedding too, one "
                               "vector for each of the two."),
                (want - 2 * (projected * d + d), "the generators also produce the gain and the shift of the adapter's "
                                                 "layer norm, d numbers each."),
                (want + norms, "with train_norms=False only the hypernetwork counts; the model's layer norms are the "
                               "model's own weights."),
            ]
            fixed = [want - (n_tasks - 1) * e] if n_tasks > 1 else []  # a task table that does not grow
            if _all_distinct([want] + [w for w, _ in mistakes] + fixed):
                break
        else:
            raise RuntimeError("no random model tells the mistakes apart")

        args = (copy.deepcopy(cfg), n_tasks, e, hidden, projected, rf)
        got = call(student_fn, *args, name="hyperformer_param_count", hint=HYPER_COUNT_HINT)
        expect_int(got, "hyperformer_param_count")
        if got == want:
            continue
        if not any(got == w for w, _ in mistakes):
            more = call(student_fn, copy.deepcopy(cfg), n_tasks + 1, e, hidden, projected, rf,
                        name="hyperformer_param_count", hint=HYPER_COUNT_HINT)
            if isinstance(more, int) and more - got > e:
                mistakes.append((got, f"one more task adds {more - got:,} parameters: only the task embedding "
                                      "table grows with the tasks, by one vector of embedding_dim; the rest is "
                                      "shared by every task."))
            elif isinstance(more, int) and more == got:
                mistakes.append((got, "the count does not change with the number of tasks: each task has its own "
                                      "embedding vector, of embedding_dim."))
        case = (f"d_model={d}, {Le} encoder and {Ld} decoder layers, {n_tasks} tasks, embedding_dim={e}, hidden={hidden}, "
                f"projected={projected}, reduction_factor={rf} (m={m})")
        raise _wrong_count("hyperformer_param_count", case, got, want, mistakes, HYPER_COUNT_HINT)

    tiny = load_base("seq2seq-tiny").config  # the committed base, with its real vocabulary of 1,331 tokens
    defaults = TaskHyperConfig(tasks=["t"])
    counts = {n: call(student_fn, tiny, n, defaults.embedding_dim, defaults.hidden, defaults.projected,
                      defaults.reduction_factor, name="hyperformer_param_count", hint=HYPER_COUNT_HINT)
              for n in (3, 30)}
    lora = trainable_report(inject(_meta_model(tiny), LoraConfig(r=4, alpha=8, target_modules=ALL_LINEAR)),
                            verbose=False).trainable
    passed(f"hyperformer_param_count agrees with ml.TaskHyperAdapter on {len(task_counts)} random models.")
    for n, count in counts.items():
        print(f"  seq2seq-tiny, {n} tasks, the default sizes: {count:,} for one shared hypernetwork; {n} LoRA r = 4 "
              f"adapters on every linear layer: {n * lora:,}.")


# ----------------------------------------------------------------------------- 5. stretch: one generated adapter

ADAPTER_HINT = ("down-project h with D and its bias, apply GELU (its tanh approximation), up-project with U and its bias, then "
                "normalise over the features (mean 0, variance 1, without affine weights) and only then apply that "
                "example's gain and shift; the result is added to h. Every tensor has a leading batch axis: example "
                "i uses its own weights.")


@checker
def task_adapter(student_fn, seed: int | None = None) -> None:
    """Exercise 5: task_adapter(h, down_w, down_b, up_w, up_b, gain, shift) -> A(h), each example with its own
    generated adapter."""
    g = _generator(seed)
    trials = [(3, 4, 16, 4, torch.float32), (2, 5, 12, 3, torch.float32), (4, 3, 8, 2, torch.float64),
              (3, 6, 16, 8, torch.float64)]  # B, T, d, m, dtype
    for B, T, d, m, dtype in trials:
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
        h = randn(B, T, d)
        weights = {"down_w": randn(B, m, d) / d ** 0.5 * 2, "down_b": randn(B, m), "up_w": randn(B, d, m) / m ** 0.5,
                   "up_b": randn(B, d) / 2, "gain": torch.rand(B, d, generator=g, dtype=dtype) + 0.5,
                   "shift": randn(B, d)}
        model = _meta_model(_seq2seq_config(g, d_model=d, n_heads=2))
        adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=["t"], reduction_factor=1), _attach=False)
        adapter._weights = {k: v[:, None, None] for k, v in weights.items()}  # one layer, one position: (B, 1, 1, ...)
        with torch.no_grad():
            want = adapter.adapt(h, 0, 0)
            w = weights

            def variant(act=lambda x: F.gelu(x, approximate="tanh"), norm=lambda o: F.layer_norm(o, o.shape[-1:]), residual=True, gain_first=False,
                        w=w):
                o = torch.einsum("btm,bdm->btd", act(torch.einsum("btd,bmd->btm", h, w["down_w"]) +
                                                     w["down_b"][:, None]), w["up_w"]) + w["up_b"][:, None]
                gain, shift = w["gain"][:, None], w["shift"][:, None]
                o = norm(o * gain) + shift if gain_first else norm(o) * gain + shift
                return h + o if residual else o

            unbiased = lambda o: (o - o.mean(-1, keepdim=True)) / (o.var(-1, keepdim=True) + 1e-5).sqrt()
            first = {k: v[:1].expand_as(v) for k, v in w.items()}
            mistakes = [
                (variant(residual=False), "the adapter adds its output to h: A(h) = h + ..., so that it starts as the "
                                          "identity."),
                (variant(act=F.relu), "the bottleneck's non-linearity is GELU (its tanh approximation), not ReLU."),
                (variant(act=F.silu), "the bottleneck's non-linearity is GELU (its tanh approximation), not swish."),
                (variant(act=F.gelu), "the bottleneck's GELU is the tanh approximation (approximate=\"tanh\"), as in "
                                      "the paper's released configuration, not the exact erf form."),
                (variant(norm=lambda o: o), "the up-projection's output is normalised (a layer norm over the "
                                            "features) before the gain and the shift act."),
                (h + variant(residual=False, norm=lambda o: o, w={**w, "gain": torch.ones_like(w["gain"]),
                                                                  "shift": torch.zeros_like(w["shift"])}),
                 "the up-projection's output goes through a layer norm, with the generated gain and shift."),
                (variant(gain_first=True), "the gain multiplies the normalised output: normalise first, then scale "
                                           "and shift."),
                (variant(norm=unbiased), "a layer norm divides by the number of features (the biased variance, as "
                                         "F.layer_norm), not by one less."),
                (variant(w=first), "every example has its own generated adapter: example i uses the i-th slice of "
                                   "every weight."),
            ]
        got = call(student_fn, h.clone(), *(v.clone() for v in weights.values()), name="task_adapter",
                   hint=ADAPTER_HINT)
        expect_tensor(got, want, f"task_adapter's output for h of shape {tuple(h.shape)}, bottleneck m={m} "
                                 f"({str(dtype).removeprefix('torch.')})", mistakes, ADAPTER_HINT)
    passed(f"task_adapter equals ml.TaskHyperAdapter.adapt on {len(trials)} random batches, one adapter per example.")
