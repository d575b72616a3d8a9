"""The token-level mixture (methods/mixture.py) against a slow reference written here: for every generated token,
a copy of the plain base with every adapted weight re-merged, W + sum_i w_i s_i B_i A_i (exact) or
W + (sum_j B_j)(sum_i w_i s_i A_i) (faithful, the original's linear combination), all in float64 so that
anything but summation order would show far above 1e-10. Adapters of different ranks and targets, batches of
left-padded prompts, the three granularities, the KV cache against the original's re-run of the whole text, files
in peft's format, and the errors."""

import copy

import pytest
import torch

import minilora as ml
from minilora.inject import adapter_layers, disable_adapters, inject
from minilora.io import load_adapter, save_adapter
from minilora.methods.lora import LoraConfig
from minilora.methods.router import MeanPooledEmbedder, Router, RouterConfig

from adapters import randomize_adapters, tiny_decoder

# adapters of three ranks over overlapping target sets; "c" skips attention, "a" the MLP
ADAPTERS = {"a": LoraConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"]),
            "b": LoraConfig(r=3, alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
            "c": LoraConfig(r=4, alpha=2, target_modules=["gate_proj", "up_proj", "down_proj"])}
SAME_RANK = {n: LoraConfig(r=3, alpha=c.alpha, target_modules=c.target_modules) for n, c in ADAPTERS.items()}


def setup(configs=ADAPTERS, seed=0):
    """(plain base, the base with the adapters, an embedder with a model of its own, a router over the adapters)."""
    torch.manual_seed(seed)
    base = tiny_decoder().double()
    model = copy.deepcopy(base)
    for i, (name, cfg) in enumerate(configs.items()):
        inject(model, cfg, name)
        randomize_adapters(model, name, seed=10 + i, std=0.3)
    torch.manual_seed(seed + 1)
    embed_lm = tiny_decoder().double()
    embedder = MeanPooledEmbedder(embed_lm, tokenizer=None)
    centroids = torch.stack([embedder.start(torch.randint(3, 64, (1, 6)))[0] for _ in configs])
    router = Router(centroids, list(configs), RouterConfig(rule="temperature", temperature=0.02))
    return base, model.eval(), embedder, router


def lora_tensors(model, names):
    """{layer name: [(adapter index, A, B, s), ...]} read from the injected model."""
    out = {}
    for lname, layer in model.named_modules():
        if hasattr(layer, "lora_A"):
            out[lname] = [(i, layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n])
                          for i, n in enumerate(names) if n in layer.lora_A]
    return out


def merged(base, tensors, w, mode):
    """A copy of the plain base whose adapted weights are re-merged for the weights w (n,)."""
    m = copy.deepcopy(base)
    for lname, present in tensors.items():
        if mode == "exact":
            delta = sum(w[i] * s * B @ A for i, A, B, s in present)
        else:
            delta = sum(B for _, _, B, _ in present) @ sum(w[i] * s * A for i, A, _, s in present)
        m.get_submodule(lname).weight.data += delta
    return m


def mean_embedding(lm, ids):
    seen = {}
    hook = lm.model.norm.register_forward_hook(lambda m, a, o: seen.update(h=o))
    lm(torch.tensor([ids]))
    hook.remove()
    return seen["h"][0].mean(0, keepdim=True)


@torch.no_grad()
def reference_generate(base, tensors, router, embed_lm, prompt, n_new, every, mode, cache):
    """One prompt, token by token: route from the whole text so far, re-merge, and either feed the new token with
    the cache of the earlier merges (cache=True) or re-run the whole text with this merge (the original)."""
    ids, past, w, weights = list(prompt), None, None, []
    for step in range(n_new):
        if step == 0 or (every is not None and step % every == 0):
            w = router(mean_embedding(embed_lm, ids))[0]
        weights.append(w)
        m = merged(base, tensors, w, mode)
        if cache:
            fed = past[0][0].shape[2] if past is not None else 0
            out = m(torch.tensor([ids[fed:]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = m(torch.tensor([ids]))
        ids.append(int(out.logits[0, -1].argmax()))
    return ids, torch.stack(weights)


PROMPTS = [[1, 5, 9, 14, 3, 22, 40], [1, 7, 2, 33]]


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()  # no prompt holds id 0


@pytest.mark.parametrize("mode, configs", [("exact", ADAPTERS), ("faithful", SAME_RANK)])
@pytest.mark.parametrize("every", [1, 2, None])
@pytest.mark.parametrize("cache", [True, False])
def test_generation_equals_the_reference_loop(mode, configs, every, cache):
    base, model, embedder, router = setup(configs)
    names = list(configs)
    ids, mask = left_padded(PROMPTS)
    with ml.Mixture(model, names, mode=mode) as mix:
        out = mix.generate(router, embedder, ids, 6, attention_mask=mask, every=every, use_cache=cache, eos_token_id=-1)
    tensors = lora_tensors(model, names)
    for row, prompt in enumerate(PROMPTS):
        want, w = reference_generate(base, tensors, router, embedder.lm, prompt, 6, every, mode, cache)
        assert out[row, ids.shape[1] - len(prompt):].tolist() == want
        torch.testing.assert_close(mix.history[row], w, rtol=0, atol=1e-10)
    changes = (mix.history[:, 1:] - mix.history[:, :-1]).abs().amax(-1)  # (B, steps - 1)
    if every is None:
        assert changes.max() == 0
    else:
        assert changes.max() > 1e-3  # the weights do move with the text, so a wrong schedule would show
        if every == 2:
            assert changes[:, ::2].max() == 0  # steps 1, 3, 5 keep the weights of steps 0, 2, 4


@pytest.mark.parametrize("mode, configs", [("exact", ADAPTERS), ("faithful", SAME_RANK)])
def test_cached_logits_equal_an_uncached_pass_with_each_positions_weights(mode, configs):
    base, model, embedder, router = setup(configs)
    ids, mask = left_padded(PROMPTS)
    steps = []
    hook = model.register_forward_hook(lambda m, a, o: steps.append(o.logits[:, -1]))
    with ml.Mixture(model, list(configs), mode=mode) as mix:
        out = mix.generate(router, embedder, ids, 5, attention_mask=mask, eos_token_id=-1)
        hook.remove()
        w = mix.position_weights()
        assert w.shape == (2, out.shape[1] - 1, 3)
        mix.set_weights(w)
        with torch.no_grad():
            full = model(out[:, :-1], attention_mask=torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)).logits
    T = ids.shape[1]
    torch.testing.assert_close(full[:, T - 1:], torch.stack(steps, 1), rtol=0, atol=1e-10)
    with torch.no_grad():  # the newest weights on every position (the original's re-run) give other logits
        with ml.Mixture(model, list(configs), mode=mode) as mix:
            mix.set_weights(w[:, -1])
            latest = model(out[:, :-1], attention_mask=torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)).logits
    assert (latest[:, T - 1] - full[:, T - 1]).abs().max() > 1e-6


def test_per_example_weights_in_one_batch_equal_each_example_alone():
    base, model, _, _ = setup()
    x = torch.randint(3, 64, (3, 9))
    w = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.4, 1.5, 0.9]], dtype=torch.float64)
    tensors = lora_tensors(model, list(ADAPTERS))
    with torch.no_grad(), ml.Mixture(model, list(ADAPTERS)) as mix:
        mix.set_weights(w)
        got = model(x).logits
    for i in range(3):
        want = merged(base, tensors, w[i], "exact")(x[i:i + 1]).logits[0]
        torch.testing.assert_close(got[i], want.detach(), rtol=0, atol=1e-10)
    with torch.no_grad():  # a one-hot row is that adapter alone, as set_adapter runs it
        ml.set_adapter(model, "a")
        torch.testing.assert_close(got[0], model(x[:1]).logits[0], rtol=0, atol=1e-10)


def test_faithful_mode_holds_the_cross_terms():
    base, model, _, _ = setup(SAME_RANK)
    x = torch.randint(3, 64, (1, 8))
    w = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    outs = {}
    for mode in ("exact", "faithful"):
        with torch.no_grad(), ml.Mixture(model, list(SAME_RANK), mode=mode) as mix:
            mix.set_weights(w)
            outs[mode] = model(x).logits
        want = merged(base, lora_tensors(model, list(SAME_RANK)), w[0], mode)(x).logits
        torch.testing.assert_close(outs[mode], want.detach(), rtol=0, atol=1e-10)
    assert (outs["exact"] - outs["faithful"]).abs().max() > 1e-3


def test_the_mixture_leaves_the_model_as_it_found_it_and_respects_disable_adapters():
    base, model, embedder, router = setup()
    ml.set_adapter(model, ["b", "c"])
    pre_hooks = dict(model._forward_pre_hooks)
    x = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        before = model(x).logits
        with ml.Mixture(model, list(ADAPTERS)) as mix:
            mix.set_weights(torch.full((2, 3), 1 / 3, dtype=torch.float64))
            with disable_adapters(model):
                torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    assert model._forward_pre_hooks == pre_hooks
    assert all(not m._forward_hooks for name, m in model.named_modules() if name)  # the layers' hooks are gone
    assert [layer.active_adapters for layer in adapter_layers(model).values()][0] == ["b"]  # q_proj: b only


def test_mixing_adapters_loaded_from_peft_format_files(tmp_path):
    base, model, embedder, router = setup()
    for name in ADAPTERS:
        save_adapter(model, str(tmp_path / name), adapter_name=name)
    loaded = copy.deepcopy(base)
    for name in ADAPTERS:
        load_adapter(loaded, str(tmp_path / name), adapter_name=name)
    ids, mask = left_padded(PROMPTS)
    outs = []
    for m in (model, loaded.eval()):
        with ml.Mixture(m, list(ADAPTERS)) as mix:
            outs.append((mix.generate(router, embedder, ids, 4, attention_mask=mask, eos_token_id=-1), mix.history))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


def test_a_subset_of_the_adapters_one_weight_row_for_the_batch_and_no_history_before_generating():
    """Mixing only "a" (which "c"'s MLP layers do not hold) with one row of weights for all three examples equals
    running "a" alone at that scale."""
    base, model, _, _ = setup()
    x = torch.randint(3, 64, (3, 6))
    mix = ml.Mixture(model, ["a"])
    assert mix.history is None and set(mix.layers) == {n for n, m in model.named_modules() if hasattr(m, "lora_A")
                                                       and "a" in m.lora_A}
    with torch.no_grad(), mix:
        mix.set_weights(torch.tensor([[0.5]], dtype=torch.float64))
        got = model(x).logits
    want = merged(base, lora_tensors(model, ["a"]), torch.tensor([0.5], dtype=torch.float64), "exact")(x).logits
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["exact", "faithful"])
def test_a_half_precision_base_with_float32_adapters(mode):
    """As peft keeps them: bf16 base, fp32 adapters. The mixture computes in the adapters' dtype from weights of any
    float dtype and returns the base's dtype, like the layer's own path for a one-hot mixture."""
    torch.manual_seed(0)
    model = tiny_decoder().to(torch.bfloat16)
    for i, name in enumerate(("a", "b")):
        inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name)
        randomize_adapters(model, name, seed=i, std=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["a"].weight.dtype == torch.float32
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        ml.set_adapter(model, "a")
        layer.fused = False  # the equation path: base result + fp32 update, rounded once
        want = layer(x)
        with ml.Mixture(model, ["a", "b"], mode=mode) as mix:
            mix.set_weights(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
            got = layer(x)
    assert got.dtype == torch.bfloat16
    if mode == "exact":
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # a one-hot faithful mixture still has b's B on a's A: it is not a alone
        assert (got.float() - want.float()).abs().max() > 1e-2


def test_bad_input_gets_clear_errors():
    base, model, embedder, router = setup()
    with pytest.raises(ValueError, match="at least one adapter"):
        ml.Mixture(model, [])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['d'\]"):
        ml.Mixture(model, ["a", "d"])
    with pytest.raises(ValueError, match="mode must be one of"):
        ml.Mixture(model, ["a"], mode="linear")
    with pytest.raises(ValueError, match="faithful mode sums the A and B matrices, which needs one rank"):
        ml.Mixture(model, ["a", "b"], mode="faithful")
    inject(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    with pytest.raises(ValueError, match=r"adapters \['dora'\] are not plain LoRA"):
        ml.Mixture(model, ["a", "dora"])
    inject(model, LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), "biased")
    inject(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "copies")
    for name in ("biased", "copies"):
        with pytest.raises(ValueError, match=rf"adapters \['{name}'\] are not plain LoRA"):
            ml.Mixture(model, ["a", name])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['a'\]; this model has \[\]"):
        ml.Mixture(tiny_decoder(), ["a"])  # a model without adapters
    mix = ml.Mixture(model, list(ADAPTERS))
    with pytest.raises(ValueError, match=r"weights must be \(batch, 3\) or \(batch, seq_len, 3\)"):
        mix.set_weights(torch.ones(2, 2))
    ids = torch.randint(3, 64, (2, 5))
    with pytest.raises(RuntimeError, match=r"inside `with mixture:`"):
        mix.generate(router, embedder, ids, 2)
    with mix, torch.no_grad():
        with pytest.raises(RuntimeError, match="has no weights"):
            model(ids)
        mix.set_weights(torch.ones(2, 4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"per-position weights \(2, 4, 3\) do not match the input \(2, 5\)"):
            model(ids)
        with pytest.raises(ValueError, match="the router's tasks"):
            mix.generate(Router(router.centroids[[1, 0, 2]], ["b", "a", "c"]), embedder, ids, 2)
        small = Router(torch.randn(3, 7, dtype=torch.float64), list(ADAPTERS))
        with pytest.raises(ValueError, match="the embedder gives 32-d embeddings but the router's centroids are 7-d"):
            mix.generate(small, embedder, ids, 2)
        with pytest.raises(ValueError, match="every must be None"):
            mix.generate(router, embedder, ids, 2, every=0)
        with pytest.raises(ValueError, match=r"the prompt \(30 tokens\) plus max_new_tokens=4 exceeds the model's "
                                             r"context of 32; shorten the prompt"):
            mix.generate(router, embedder, torch.randint(3, 64, (1, 30)), 4)
