"""The hypernetwork adapters (methods/hyper.py, methods/hyperformer.py): shapes, exact equality with the base at
initialisation, the equations written out in float64, gradients, the KV cache, LoRA beside them, files, errors."""

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import minilora as ml
from minilora.methods.hyper import AlignmentAdapter, AlignmentConfig
from minilora.methods.hyperformer import TaskHyperAdapter, TaskHyperConfig


def seq2seq(seed=0, dtype=torch.float64, **overrides):
    """seq2seq-tiny (fields overridden by `overrides`) in `dtype`, in eval mode."""
    torch.manual_seed(seed)
    # frozen, as the base is once an adapter is attached (frozen and trainable parameters may take different
    # attention kernels, which round differently)
    return ml.Seq2SeqLM(ml.get_config("seq2seq-tiny", **overrides)).to(dtype).eval().requires_grad_(False)


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
    mask = b["attention_mask"].clone()
    mask[0, 1:] = 0  # a one-token input: its mean is that token's state
    enc = model.encode(b["input_ids"], mask)
    h, prefix = adapter.condition(enc, mask.double())
    assert h.shape == (3, 12) and prefix.shape == (3, 5, 128)
    # the pooled vector is the mean over real tokens: written out row by row
    for i in range(3):
        real = enc[i][mask[i] == 1].mean(0)
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


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=2, attn_scale=1.0)], ids=["mha", "gqa-unscaled"])
def test_prefix_branch_is_the_gated_attention_written_out(overrides):
    """Also with grouped key/value heads (query head h reads key/value head h // 2) and T5's unscaled attention
    (attn_scale=1.0, as models loaded from HF T5 have)."""
    model, b = seq2seq(**overrides), batch()
    n_kv, scale = model.config.n_kv_heads, overrides.get("attn_scale", 32**-0.5)
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
        k, v = (p[bi] @ attn.k_proj.weight.T).view(3, n_kv, 32), (p[bi] @ attn.v_proj.weight.T).view(3, n_kv, 32)
        heads = []
        for hd in range(4):
            kv = hd // (4 // n_kv)
            weights = torch.softmax(q[:, hd] @ k[:, kv].T * scale, dim=-1)  # (T, k)
            heads.append(torch.tanh(adapter.gate[1, hd]) * weights @ v[:, kv])
        expected[bi] += torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("target", ["q_proj", "k_proj", "v_proj", "o_proj"])
def test_cross_attention_update_is_per_example_low_rank(target):
    model, b = seq2seq(), batch()
    enc = model.encode(b["input_ids"], b["attention_mask"])
    proj = getattr(model.decoder.layers[2].cross_attn, target)  # every projection takes and gives 128 here
    base = proj(enc)
    adapter = AlignmentAdapter(model, AlignmentConfig(hidden=8, cross_rank=3, cross_targets=[target]))
    assert adapter.config.cross_targets == (target,)
    randomise(adapter)
    model(**b)  # the forward call registers the hooks on the current modules; the state is cleared after it
    adapter._current(enc, None)
    out = proj(enc)
    h = adapter._state[1]
    for i in range(3):
        gen_A, gen_B = adapter.cross_A[f"2_{target}"], adapter.cross_B[f"2_{target}"]
        A = (gen_A.weight @ h[i] + gen_A.bias).view(3, 128)
        B = (gen_B.weight @ h[i] + gen_B.bias).view(128, 3)
        torch.testing.assert_close(out[i], base[i] + enc[i] @ A.T @ B.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_padding_changes_nothing_through_the_forward_call(pooling):
    """The decoder hands its cross-attention mask to the hooks: a padded row equals the row alone without its
    padding (the pooled vector, and so the prefix, come from the real tokens only)."""
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=3, pooling=pooling, cross_rank=2))
    randomise(adapter)
    padded = model(**b).logits
    for i in (1, 2):  # left and right padding
        real = b["attention_mask"][i] == 1
        alone = model(input_ids=b["input_ids"][i : i + 1, real], labels=b["labels"][i : i + 1]).logits
        torch.testing.assert_close(padded[i : i + 1], alone, rtol=0, atol=1e-10)


def test_the_hypernetwork_runs_once_per_forward_call():
    """Every decoder layer reads the same prefix and h: they are generated once per call, not once per layer."""
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(cross_rank=1))
    calls = []
    adapter.hyper.register_forward_hook(lambda *args: calls.append(1))
    model(**b)
    assert len(calls) == 1  # 3 decoder layers
    model.generate(b["input_ids"], 4, attention_mask=b["attention_mask"], eos_token_id=-1)
    assert len(calls) == 1 + 4  # once per decoding step


def test_a_call_that_raises_keeps_nothing_of_it():
    """A forward call that fails half-way (out of memory, say) clears what the adapters generated for it, as one
    that returns does: nothing of it stays alive for the next call."""
    def fail(*args):
        raise RuntimeError("out of memory")

    model, b = seq2seq(), batch()
    align = AlignmentAdapter(model, AlignmentConfig(cross_rank=1))
    handle = model.decoder.norm.register_forward_hook(fail)  # after every decoder layer has run
    with pytest.raises(RuntimeError, match="out of memory"):
        model(**b)
    assert align._state is None
    align.detach()
    tasks = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    with pytest.raises(RuntimeError, match="out of memory"):
        model(**b, task_ids="dates")
    assert tasks._weights is None
    handle.remove()


def test_adapters_are_built_on_the_models_device():
    with torch.device("meta"):  # a device other than the default, without a GPU
        model = ml.Seq2SeqLM(ml.get_config("seq2seq-tiny"))
    align = AlignmentAdapter(model, AlignmentConfig(pooling="attention", cross_rank=1))
    tasks = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    assert {p.device.type for p in [*align.parameters(), *tasks.parameters()]} == {"meta"}
    align._current(torch.empty(2, 5, 128, device="meta"), None)  # no mask: every token real
    assert align._state[2].device.type == "meta"


def test_a_bf16_model_with_and_without_an_attention_mask():
    model, b = seq2seq(dtype=torch.bfloat16), batch()
    plain = dict(input_ids=b["input_ids"], labels=b["labels"])
    base, base_padded = model(**plain).logits, model(**b).logits
    adapter = AlignmentAdapter(model)
    assert adapter.hyper.weight.dtype == torch.bfloat16
    assert torch.equal(model(**plain).logits, base) and torch.equal(model(**b).logits, base_padded)


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
    adapter.detach()  # again (a notebook cell run twice): nothing left to remove
    assert torch.equal(model(**b).logits, base)


def test_alignment_files_round_trip(tmp_path):
    model, b = seq2seq(), batch()
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=3, pooling="attention", cross_rank=2))
    adapter.save(tmp_path / "a")
    randomise(adapter)
    adapter.save(tmp_path / "a")  # into the same folder again: the files are replaced
    expected = model(**b).logits
    fresh = seq2seq()
    loaded = AlignmentAdapter.load(fresh, str(tmp_path / "a"))
    assert loaded.config == adapter.config and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(fresh(**b).logits, expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "a" / "hyper_config.json").read_text())["hyper_type"] == "AlignmentAdapter"
    with safe_open(tmp_path / "a" / "hyper_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_bad_alignment_file_leaves_the_model_as_it_was(tmp_path):
    model, b = seq2seq(), batch()
    AlignmentAdapter(model, AlignmentConfig(num_prefix=3, pooling="attention")).save(tmp_path / "a")
    # the adapter's tensors and nothing else (no cross-attention generators without cross_rank)
    assert set(load_file(tmp_path / "a" / "hyper_model.safetensors")) == {
        "query", "hyper.weight", "hyper.bias", "to_prefix.weight", "to_prefix.bias", "gate"}
    fresh = seq2seq()
    base = fresh(**b).logits
    config = json.loads((tmp_path / "a" / "hyper_config.json").read_text())
    for edit, differ in [(dict(num_prefix=4), "['to_prefix.bias', 'to_prefix.weight']"),  # shapes
                         (dict(pooling="mean"), "['query']")]:  # keys
        (tmp_path / "a" / "hyper_config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(ValueError, match=f"does not fit this model and config: {re.escape(differ)} differ"):
            AlignmentAdapter.load(fresh, str(tmp_path / "a"))
        assert not hasattr(fresh, "alignment_adapter") and torch.equal(fresh(**b).logits, base)
    without_kind = {k: v for k, v in config.items() if k != "hyper_type"}
    (tmp_path / "a" / "hyper_config.json").write_text(json.dumps(without_kind))
    with pytest.raises(ValueError, match="holds a None, not a AlignmentAdapter"):
        AlignmentAdapter.load(fresh, str(tmp_path / "a"))
    (tmp_path / "a" / "hyper_config.json").write_text(json.dumps(config))
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


def test_alignment_config_takes_the_smallest_sizes_and_every_projection():
    config = AlignmentConfig(num_prefix=1, hidden=1, cross_rank=1,
                             cross_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert config.cross_targets == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_attaching_to_the_wrong_model_or_twice_is_refused():
    with pytest.raises(TypeError, match="works on an encoder-decoder"):
        AlignmentAdapter(ml.DecoderLM(ml.get_config("decoder-tiny")))
    with pytest.raises(TypeError, match="works on an encoder-decoder"):  # PyTorch's: a decoder, but no config
        AlignmentAdapter(nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                        dim_feedforward=8, batch_first=True))
    AlignmentAdapter(seq2seq(n_encoder_layers=1))  # one encoder layer is an encoder-decoder too
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


def test_generators_start_like_the_papers_code():
    """Normal with std 1e-2 and zero biases; the layer norm's gain and bias generators at zero (A(h) = h)."""
    adapter = TaskHyperAdapter(seq2seq(), TaskHyperConfig(tasks=TASKS))
    normal = [adapter.down_w, adapter.down_b, adapter.up_w, adapter.up_b]
    w = torch.cat([g.weight.flatten() for g in normal])  # 73,984 draws: the sample std's standard error is 0.26%
    assert 0.0095 < w.std() < 0.0105 and w.mean().abs() < 1e-3 and all(g.weight.abs().min() > 0 for g in normal)
    assert all(not g.bias.any() for g in normal)
    assert all(not t.any() for g in (adapter.gain, adapter.shift) for t in (g.weight, g.bias))


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
        o = (0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))) @ U.T + bU  # GELU, tanh form
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(out[i], h[i] + o * gain + shift, rtol=0, atol=1e-10)


def test_examples_of_different_tasks_in_one_batch_equal_each_alone():
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    mixed = model(**b, task_ids=torch.tensor([[2], [0], [2]])).logits
    assert torch.equal(model(**b, task_ids=[2, 0, 2]).logits, mixed)  # indices in a list
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


def test_task_ids_with_precomputed_encoder_states():
    """A call with encoder_outputs and labels only (no input or decoder ids) takes its batch size from the labels."""
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    ids = ["dates", "translate", "num2words"]
    out = model(**b, task_ids=ids)
    again = model(encoder_outputs=out.encoder_hidden_states, attention_mask=b["attention_mask"], labels=b["labels"],
                  task_ids=ids)
    assert torch.equal(again.logits, out.logits)


def test_task_hyper_detach_restores_the_base_exactly():
    model, b = seq2seq(), batch()
    base = model(**b).logits
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    assert not torch.allclose(model(**b, task_ids="dates").logits, base)
    adapter.detach()
    assert torch.equal(model(**b).logits, base) and not hasattr(model, "task_hyper_adapter")
    adapter.detach()  # again: nothing left to remove
    assert torch.equal(model(**b).logits, base)


def test_detach_freezes_the_layer_norms_that_trained_with_the_adapter():
    model = seq2seq()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    assert any(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    adapter.detach()
    assert not any(p.requires_grad for p in model.parameters())


def test_encode_and_decode_called_directly_use_the_default_task():
    """Outside a model call no forward pre-hook generates the adapters: the default task's are used, or the error
    asks for one."""
    model, b = seq2seq(), batch()
    adapter = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    randomise(adapter, std=0.1)
    with pytest.raises(ValueError, match=r"call adapter.set_task\(name\) first"):
        model.encode(b["input_ids"], b["attention_mask"])
    adapter.set_task("dates")
    out = model(**b, task_ids="dates")
    enc = model.encode(b["input_ids"], b["attention_mask"])
    assert torch.equal(enc, out.encoder_hidden_states)
    decoder_ids = ml.models.seq2seq.shift_right(b["labels"], model.config.decoder_start_token_id, model.config.pad_token_id)
    logits, _ = model.decode(decoder_ids, enc, b["attention_mask"])
    assert torch.equal(logits, out.logits)


def test_a_call_without_ids_gets_the_models_own_error():
    model = seq2seq()
    TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    with pytest.raises(ValueError, match="pass input_ids"):
        model(task_ids="dates")


def test_attaching_a_second_hypernetwork_adapter_keeps_the_first_as_it_was():
    """Trainable stays trainable (the first adapter and its layer norms), frozen stays frozen; the rest of the base
    is frozen."""
    model = seq2seq()
    task = TaskHyperAdapter(model, TaskHyperConfig(tasks=TASKS))
    align = AlignmentAdapter(model, AlignmentConfig())
    assert all(p.requires_grad for p in [*task.parameters(), *task.extra_state().values(), *align.parameters()])
    align.detach()
    task.requires_grad_(False)
    AlignmentAdapter(model, AlignmentConfig())
    assert not any(p.requires_grad for p in task.parameters())
    base = [p for n, p in model.named_parameters() if not n.startswith(("task_hyper_adapter.", "alignment_adapter."))
            and "norm" not in n]
    assert base and not any(p.requires_grad for p in base)


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
    for wrong in ([0, 1], [0, 1, 3], [-1, 0, 1]):  # too few; indices past the last task, below the first
        with pytest.raises(ValueError, match="one task of"):
            model(**b, task_ids=torch.tensor(wrong))
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        adapter.set_task("poetry")
    with pytest.raises(ValueError, match="leaves no bottleneck"):
        TaskHyperAdapter(seq2seq(), TaskHyperConfig(tasks=TASKS, reduction_factor=256))
    assert TaskHyperAdapter(seq2seq(), TaskHyperConfig(tasks=TASKS, reduction_factor=128)).m == 1  # d_model 128


@pytest.mark.parametrize("kwargs, message", [
    (dict(tasks=["a", "a"]), "distinct task names"),
    (dict(tasks=[]), "distinct task names"),
    (dict(tasks=["a", 3]), "distinct task names"),
    (dict(hidden=0), "hidden must be a positive integer"),
    (dict(embedding_dim=2.5), "embedding_dim must be a positive integer"),
])
def test_task_hyper_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskHyperConfig(**{"tasks": TASKS, **kwargs})


def test_task_hyper_config_takes_the_smallest_sizes():
    config = TaskHyperConfig(tasks=("a",), embedding_dim=1, hidden=1, projected=1, reduction_factor=1)
    assert config.tasks == ["a"]
