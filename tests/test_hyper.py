"""The hypernetwork adapters (methods/hyper.py, methods/hyperformer.py): shapes, exact equality with the base at
initialisation, the equations written out in float64, gradients, the KV cache, LoRA beside them, files, errors."""

import json

import pytest
import torch
import torch.nn.functional as F

import minilora as ml
from minilora.methods.hyper import AlignmentAdapter, AlignmentConfig
from minilora.methods.hyperformer import TaskHyperAdapter, TaskHyperConfig


def seq2seq(seed=0):
    torch.manual_seed(seed)
    # frozen, as the base is once an adapter is attached (frozen and trainable parameters may take different
    # attention kernels, which round differently)
    return ml.Seq2SeqLM(ml.get_config("seq2seq-tiny")).double().eval().requires_grad_(False)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 500, (3, 9), generator=g)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in one row, right padding in another
    mask[2, 7:] = 0
    return dict(input_ids=x, attention_mask=mask, labels=torch.randint(3, 500, (3, 6), generator=g))


def randomise(module, seed=2, std=0.3):
    """Every parameter of the adapter random, so no term hides behind a zero initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


ALIGN_CONFIGS = [AlignmentConfig(), AlignmentConfig(num_prefix=3, pooling="attention"),
                 AlignmentConfig(num_prefix=2, hidden=16, cross_rank=2, cross_targets=("q_proj", "v_proj"))]


# ----------------------------------------------------------------------------- alignment adapter

@pytest.mark.parametrize("config", ALIGN_CONFIGS, ids=["mean", "attention", "cross"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_alignment_adapter_changes_nothing_before_training(config, with_lora):
    model, b = seq2seq(), batch()
    if with_lora:
        ml.inject(model, ml.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    base = model(**b).logits
    AlignmentAdapter(model, config)
    assert torch.equal(model(**b).logits, base)
    assert torch.equal(model.generate(b["input_ids"], 5, attention_mask=b["attention_mask"]),
                       model.generate(b["input_ids"], 5, attention_mask=b["attention_mask"], use_cache=False))


def test_prefix_shape_and_pooling_ignores_padding():
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=5, hidden=12))
    enc = model.encode(b["input_ids"], b["attention_mask"])
    h, prefix = adapter.condition(enc, b["attention_mask"].double())
    assert h.shape == (3, 12) and prefix.shape == (3, 5, 128)
    # the pooled vector is the mean over real tokens: written out row by row
    for i in range(3):
        real = enc[i][b["attention_mask"][i] == 1].mean(0)
        expected = adapter.to_prefix(F.gelu(adapter.hyper(real))).view(5, 128)
        torch.testing.assert_close(prefix[i], expected, rtol=0, atol=1e-12)


def test_attention_pooling_is_a_softmax_over_real_tokens():
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(pooling="attention"))
    enc = model.encode(b["input_ids"], b["attention_mask"])
    mask = b["attention_mask"].double()
    mean_h, _ = adapter.condition(enc, mask)
    randomise(adapter)
    h, _ = adapter.condition(enc, mask)
    for i in range(3):
        real = enc[i][mask[i] == 1]
        w = torch.exp(real @ adapter.query / 128**0.5)
        pooled = (w[:, None] * real).sum(0) / w.sum()
        torch.testing.assert_close(h[i], F.gelu(adapter.hyper(pooled)), rtol=0, atol=1e-12)
    with torch.no_grad():  # a zero query is the plain mean
        adapter.query.zero_()
    torch.testing.assert_close(adapter.condition(enc, mask)[0],
                               F.gelu(adapter.hyper((enc * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))))
    assert not torch.allclose(mean_h, h)


def test_prefix_branch_is_the_gated_attention_written_out():
    model, b = seq2seq(), batch()
    enc = model.encode(b["input_ids"], b["attention_mask"])
    layer = model.decoder.layers[1]
    xn = layer.input_layernorm(torch.randn(3, 4, 128, dtype=torch.float64))
    base, _ = layer.self_attn(xn)
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=3))
    randomise(adapter)
    adapter._current(enc, None)
    out, _ = layer.self_attn(xn)
    attn, P = layer.self_attn, adapter._state[2]
    p = layer.input_layernorm(P)
    expected = base.clone()
    for bi in range(3):
        q = (xn[bi] @ attn.q_proj.weight.T).view(4, 4, 32)  # (T, heads, hs)
        k, v = (p[bi] @ attn.k_proj.weight.T).view(3, 4, 32), (p[bi] @ attn.v_proj.weight.T).view(3, 4, 32)
        heads = []
        for hd in range(4):
            weights = torch.softmax(q[:, hd] @ k[:, hd].T * 32**-0.5, dim=-1)  # (T, k)
            heads.append(torch.tanh(adapter.gate[1, hd]) * weights @ v[:, hd])
        expected[bi] += torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_cross_attention_update_is_per_example_low_rank():
    model, b = seq2seq(), batch()
    enc = model.encode(b["input_ids"], b["attention_mask"])
    proj = model.decoder.layers[2].cross_attn.v_proj
    base = proj(enc)
    adapter = AlignmentAdapter(model, AlignmentConfig(hidden=8, cross_rank=3))
    randomise(adapter)
    model(**b)  # the forward call registers the hooks on the current modules; the state is cleared after it
    adapter._current(enc, None)
    out = proj(enc)
    h = adapter._state[1]
    for i in range(3):
        A = (adapter.cross_A["2_v_proj"].weight @ h[i] + adapter.cross_A["2_v_proj"].bias).view(3, 128)
        B = (adapter.cross_B["2_v_proj"].weight @ h[i] + adapter.cross_B["2_v_proj"].bias).view(128, 3)
        torch.testing.assert_close(out[i], base[i] + enc[i] @ A.T @ B.T, rtol=0, atol=1e-10)


def test_gradients_reach_the_gate_first_and_then_the_whole_hypernetwork():
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(pooling="attention", cross_rank=2))
    model.requires_grad_(False)
    adapter.requires_grad_(True)
    model(**b).loss.backward()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert grads["gate"].abs().min() > 0  # every head's gate moves at the first step
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("cross_B"))
    assert grads["to_prefix.weight"].abs().sum() == 0  # behind a zero gate, as LoRA's A behind B = 0
    adapter.zero_grad()
    randomise(adapter)
    model(**b).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert not any(p.grad is not None for n, p in model.named_parameters() if not n.startswith("alignment_adapter"))


@pytest.mark.parametrize("config", ALIGN_CONFIGS[1:], ids=["attention", "cross"])
def test_generation_with_the_cache_equals_without(config):
    model, b = seq2seq(), batch()
    ml.inject(model, ml.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a LoRA that does something, under the adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    adapter = AlignmentAdapter(model, config)
    randomise(adapter, std=0.2)
    cached = model.generate(b["input_ids"], 8, attention_mask=b["attention_mask"])
    plain = model.generate(b["input_ids"], 8, attention_mask=b["attention_mask"], use_cache=False)
    assert torch.equal(cached, plain)
    adapter.detach()  # the adapter does change the generation, so the comparison above can fail
    assert not torch.equal(model.generate(b["input_ids"], 8, attention_mask=b["attention_mask"]), cached)


def test_trains_jointly_with_lora_and_counts_as_trainable():
    model = seq2seq()
    ml.inject(model, ml.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    lora = ml.trainable_report(model, verbose=False).trainable
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=2, hidden=8))
    own = sum(p.numel() for p in adapter.parameters())
    assert own == 128 * 8 + 8 + 8 * 2 * 128 + 2 * 128 + 3 * 4  # hyper, to_prefix, gates (3 layers x 4 heads)
    assert ml.trainable_report(model, verbose=False).trainable == lora + own
    rows = [dict(input_ids=r.tolist(), labels=l.tolist()) for r, l in zip(batch()["input_ids"], batch()["labels"])]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = ml.train(model, rows * 4, ml.TrainConfig(steps=20, batch_size=3, lr=1e-2, warmup_steps=0, log_every=1, progress=False))
    assert history.loss[-1] < history.loss[0]
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("lora_A" in n for n in moved) and "alignment_adapter.gate" in moved


def test_attaching_after_inject_keeps_what_inject_left_trainable():
    model = seq2seq()
    ml.inject(model, ml.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["relative_attention_bias"]))
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in before)
    AlignmentAdapter(model)
    after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert after == before | {n for n in after if n.startswith("alignment_adapter.")}


def test_hooks_follow_modules_that_inject_swaps_in_later():
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(cross_rank=2))
    randomise(adapter)
    before = model(**b).logits
    ml.inject(model, ml.LoraConfig(r=2, alpha=4, target_modules=["v_proj"]))  # wraps cross_attn.v_proj; B = 0
    adapter.requires_grad_(True)
    torch.testing.assert_close(model(**b).logits, before, rtol=0, atol=1e-10)
    merged = ml.merge_and_unload(model)
    torch.testing.assert_close(merged(**b).logits, before, rtol=0, atol=1e-10)


def test_detach_restores_the_base_exactly():
    model, b = seq2seq(), batch()
    base = model(**b).logits
    adapter = AlignmentAdapter(model, AlignmentConfig(cross_rank=1))
    randomise(adapter)
    assert not torch.allclose(model(**b).logits, base)
    adapter.detach()
    assert torch.equal(model(**b).logits, base) and not hasattr(model, "alignment_adapter")


def test_alignment_files_round_trip(tmp_path):
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=3, pooling="attention", cross_rank=2))
    randomise(adapter)
    adapter.save(tmp_path / "a")
    expected = model(**b).logits
    fresh = seq2seq()
    loaded = AlignmentAdapter.load(fresh, str(tmp_path / "a"))
    assert loaded.config == adapter.config and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(fresh(**b).logits, expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "a" / "hyper_config.json").read_text())["hyper_type"] == "AlignmentAdapter"


def test_a_bad_alignment_file_leaves_the_model_as_it_was(tmp_path):
    model, b = seq2seq(), batch()
    AlignmentAdapter(model, AlignmentConfig(num_prefix=3)).save(tmp_path / "a")
    fresh = seq2seq()
    base = fresh(**b).logits
    config = json.loads((tmp_path / "a" / "hyper_config.json").read_text())
    (tmp_path / "a" / "hyper_config.json").write_text(json.dumps({**config, "num_prefix": 4}))
    with pytest.raises(ValueError, match="does not fit"):
        AlignmentAdapter.load(fresh, str(tmp_path / "a"))
    assert not hasattr(fresh, "alignment_adapter") and torch.equal(fresh(**b).logits, base)
    with pytest.raises(ValueError, match="load it with AlignmentAdapter.load"):
        TaskHyperAdapter.load(fresh, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="hyper_config.json is missing"):
        AlignmentAdapter.load(fresh, str(tmp_path / "nothing"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_prefix=0), "num_prefix must be a positive integer"),
    (dict(pooling="max"), "pooling must be 'mean' or 'attention'"),
    (dict(cross_rank=-1), "cross_rank must be an integer >= 0"),
    (dict(cross_rank=2, cross_targets=("gate_proj",)), "cross_targets must name cross-attention projections"),
])
def test_alignment_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignmentConfig(**kwargs)


def test_attaching_to_the_wrong_model_or_twice_is_refused():
    with pytest.raises(TypeError, match="works on an encoder-decoder"):
        AlignmentAdapter(ml.DecoderLM(ml.get_config("decoder-tiny")))
    model = seq2seq()
    AlignmentAdapter(model)
    with pytest.raises(ValueError, match=r"call model.alignment_adapter.detach\(\) first"):
        AlignmentAdapter(model)
    with pytest.raises(TypeError, match="takes a TaskHyperConfig"):
        TaskHyperAdapter(seq2seq(), AlignmentConfig())


# ----------------------------------------------------------------------------- Hyperformer++

TASKS = ["num2words", "dates", "translate"]


def test_task_hyper_adapter_changes_nothing_before_training():
    model, b = seq2seq(), batch()
    base = model(**b).logits
    TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    assert torch.equal(model(**b, task_ids=["dates", "num2words", "dates"]).logits, base)


def test_hypernetwork_shapes_and_sizes():
    model = seq2seq()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    assert [m.weight.shape for m in adapter.project if hasattr(m, "weight")] == [(128, 192), (64, 128), (64,)]
    w = adapter.generate_weights(torch.tensor([0, 2]))
    m = 128 // 32
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "down_w": (2, 6, 2, m, 128), "down_b": (2, 6, 2, m), "up_w": (2, 6, 2, 128, m), "up_b": (2, 6, 2, 128),
        "gain": (2, 6, 2, 128), "shift": (2, 6, 2, 128)}
    generated = 64 * (m * 128 + m + 128 * m + 128 + 128 + 128) + (m * 128 + m + 128 * m + 128 + 128 + 128)
    embeddings = 64 * (3 + 6 + 2)
    mlp = 192 * 128 + 128 + 128 * 64 + 64 + 2 * 64
    assert sum(p.numel() for p in adapter.parameters()) == generated + embeddings + mlp
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n.split(".")[-2])
    assert ml.trainable_report(model, verbose=False).trainable == generated + embeddings + mlp + norms


def test_adapter_is_the_equation_written_out():
    model = seq2seq()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    h = torch.randn(2, 5, 128, dtype=torch.float64)
    tasks = torch.tensor([2, 0])
    adapter._weights = {k: v for k, v in adapter.generate_weights(tasks).items()}
    out = adapter.adapt(h, 4, 1)
    for i, t in enumerate(tasks.tolist()):
        s = torch.cat([adapter.task_embedding.weight[t], adapter.layer_embedding.weight[4],
                       adapter.position_embedding.weight[1]])
        s = adapter.project[1](adapter.project[0](s))
        s = F.layer_norm(adapter.project[2](s), (64,), adapter.project[3].weight, adapter.project[3].bias)
        D, bD = (adapter.down_w.weight @ s + adapter.down_w.bias).view(4, 128), adapter.down_b.weight @ s + adapter.down_b.bias
        U, bU = (adapter.up_w.weight @ s + adapter.up_w.bias).view(128, 4), adapter.up_b.weight @ s + adapter.up_b.bias
        gain, shift = adapter.gain.weight @ s + adapter.gain.bias, adapter.shift.weight @ s + adapter.shift.bias
        z = h[i] @ D.T + bD
        o = (z * torch.sigmoid(z)) @ U.T + bU
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(out[i], h[i] + o * gain + shift, rtol=0, atol=1e-10)


def test_examples_of_different_tasks_in_one_batch_equal_each_alone():
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    mixed = model(**b, task_ids=torch.tensor([[2], [0], [2]])).logits
    for i, task in enumerate(["translate", "num2words", "translate"]):
        adapter.set_task(task)
        alone = model(**{k: v[i : i + 1] for k, v in b.items()}).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-10)
    assert not torch.allclose(mixed[0], model(**b, task_ids="dates").logits[0])


def test_task_hyper_generation_with_the_cache_equals_without_and_trains():
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    ids = ["dates", "translate", "num2words"]
    cached = model.generate(b["input_ids"], 8, attention_mask=b["attention_mask"], task_ids=ids)
    assert torch.equal(cached, model.generate(b["input_ids"], 8, attention_mask=b["attention_mask"], use_cache=False,
                                              task_ids=ids))
    model.zero_grad()
    model(**b, task_ids=ids).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    assert all(n.startswith("task_hyper_adapter.") or "norm" in n for n in trainable)


def test_task_hyper_files_round_trip_with_the_layer_norms(tmp_path):
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    with torch.no_grad():
        model.decoder.layers[0].post_attention_layernorm.weight.mul_(1.5)
    adapter.save(tmp_path / "t")
    expected = model(**b, task_ids="translate").logits
    fresh = seq2seq()
    loaded = TaskHyperAdapter.load(fresh, str(tmp_path / "t"), is_trainable=True)
    torch.testing.assert_close(fresh(**b, task_ids="translate").logits, expected, rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.extra_state().values())


def test_task_errors_name_the_fix():
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    with pytest.raises(ValueError, match=r"pass task_ids=\[...\] to the forward call or generate\(\)"):
        model(**b)
    with pytest.raises(ValueError, match="unknown tasks"):
        model(**b, task_ids=["dates", "poetry", "dates"])
    with pytest.raises(ValueError, match="one task of"):
        model(**b, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        adapter.set_task("poetry")
    with pytest.raises(ValueError, match="distinct task names"):
        TaskHyperConfig(tasks=["a", "a"])
    with pytest.raises(ValueError, match="leaves no bottleneck"):
        TaskHyperAdapter(seq2seq(), TaskHyperConfig(tasks=TASKS, reduction_factor=256))
