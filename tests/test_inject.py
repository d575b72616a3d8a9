"""Model-level LoRA: target matching, freezing, several adapters, mixed batches, merging, combining, counting."""

import pytest
import torch
import torch.nn as nn

from minilora.inject import (add_weighted_adapter, delete_adapter, disable_adapters, inject, lora_layers, merge,
                             merge_and_unload, set_adapter, trainable_report, unmerge)
from minilora.lora import LoraConfig
from minilora.models import DecoderLM, get_config

from adapters import randomize_adapters


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.q_proj(x) * torch.sigmoid(self.v_proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # no adapter_names parameter: the hook has to take it away
        for block in self.layers:
            x = block(x)
        return self.head(x)


def cfg(**kw):
    return LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


@pytest.mark.parametrize("targets, expected", [
    (["q_proj"], {"layers.0.q_proj", "layers.1.q_proj"}),
    (["layers.1.q_proj", "head"], {"layers.1.q_proj", "head"}),
    (r"layers\.0\.(q|v)_proj", {"layers.0.q_proj", "layers.0.v_proj"}),
])
def test_target_matching_exact_suffix_and_regex(targets, expected):
    model = inject(Net(), cfg(target_modules=targets))
    assert set(lora_layers(model)) == expected


def test_suffix_match_needs_a_whole_name_part():
    with pytest.raises(ValueError, match="match no module"):
        inject(Net(), cfg(target_modules=["proj"]))


def test_unmatched_target_lists_closest_names():
    with pytest.raises(ValueError, match=r"\['q_prj'\].*Closest module names: \['q_proj'"):
        inject(Net(), cfg(target_modules=["q_prj", "v_proj"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match="'layers.0.norm' is a LayerNorm"):
        inject(Net(), cfg(target_modules=["layers.0.norm"]))


def test_rank_too_large_names_the_layer():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"r=8 is larger than min\(in, out\)=4 of layer 'head'"):
        inject(model, cfg(r=8, target_modules=["q_proj", "head"]))
    assert not lora_layers(model)  # nothing was wrapped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_outputs_unchanged_at_init_and_only_adapters_train():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 5, 16)
    y0 = model(x)
    inject(model, cfg())
    assert torch.equal(model(x), y0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    model(x).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_trainable_report_numbers(capsys):
    model = inject(Net(), cfg())
    total_base = 2 * (2 * (16 * 16 + 16) + 2 * 16) + 16 * 4 + 4
    lora = 4 * (4 * 16 + 16 * 4)  # 4 layers, A (4x16) and B (16x4)
    report = trainable_report(model)
    assert report == (lora, total_base + lora, 100 * lora / (total_base + lora))
    assert f"trainable params: {lora:,} || all params: {total_base + lora:,}" in capsys.readouterr().out


def test_bias_options_choose_trainable_biases():
    model = inject(Net(), cfg(bias="lora_only"))
    assert model.layers[0].q_proj.base_layer.bias.requires_grad and not model.head.bias.requires_grad
    model = inject(Net(), cfg(bias="all"))
    assert model.head.bias.requires_grad and model.layers[1].norm.bias.requires_grad
    assert not model.head.weight.requires_grad


def test_injecting_twice_with_the_same_name_raises():
    model = inject(Net(), cfg())
    with pytest.raises(ValueError, match="already in this model"):
        inject(model, cfg())


def test_several_adapters_set_active_and_summed():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 16)
    inject(model, cfg(), "a")
    inject(model, cfg(r=2, target_modules=["v_proj"]), "b")
    assert model.lora_active == ["a"]  # a new adapter waits until set_adapter picks it
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    layer = model.layers[0].v_proj
    set_adapter(model, ["a", "b"])
    xin = torch.randn(2, 16)
    expected = layer.base_layer(xin) + sum(layer.scaling[n] * xin @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T
                                           for n in ("a", "b"))
    torch.testing.assert_close(layer(xin), expected)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        set_adapter(model, "c")


def test_disable_adapters_runs_the_base_and_restores():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 16)
    y0 = model(x)
    inject(model, cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    y1 = model(x)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), y0)
    torch.testing.assert_close(model(x), y1)
    model.eval()
    merge(model)
    with disable_adapters(model):  # merged layers are taken apart for the block and merged back after
        torch.testing.assert_close(model(x), y0, atol=1e-6, rtol=1e-6)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(x), y1, atol=1e-6, rtol=1e-6)


def test_delete_adapter():
    model = inject(Net(), cfg(), "a")
    inject(model, cfg(), "b")
    delete_adapter(model, "a")
    assert all("a" not in layer.lora_A for layer in lora_layers(model).values())
    assert model.lora_active == [] and set(model.lora_configs) == {"b"}
    with pytest.raises(ValueError, match="unknown adapter"):
        delete_adapter(model, "a")


def test_model_merge_twice_is_noop_with_warning_and_unmerge_restores():
    model = inject(Net(), cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    W = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        merge(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())
    unmerge(model)
    for k, v in W.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-7, rtol=0)


def test_model_safe_merge_touches_no_layer_when_one_is_broken():
    model = inject(Net(), cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    with torch.no_grad():
        model.layers[1].v_proj.lora_B["default"].weight[0, 0] = float("inf")
    W = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.v_proj"):
        merge(model, safe_merge=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in W.items())
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_training_a_merged_model_raises_and_adding_adapters_while_merged_raises():
    model = inject(Net(), cfg())
    merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        model.train()(torch.randn(2, 16))
    with pytest.raises(ValueError, match="unmerge"):
        inject(model, cfg(), "other")
    with pytest.raises(ValueError, match="unmerge"):
        set_adapter(model, "default")


def test_merge_and_unload_returns_plain_layers_with_same_outputs():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 16)
    inject(model, cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    model.eval()
    y = model(x)
    out = merge_and_unload(model)
    assert out is model and not lora_layers(model)
    assert type(model.layers[0].q_proj) is nn.Linear
    assert not hasattr(model, "lora_configs") and not model._forward_pre_hooks and not model._forward_hooks
    torch.testing.assert_close(model(x), y, atol=1e-6, rtol=1e-6)


def test_merge_and_unload_of_a_copy_leaves_the_original_working():
    import copy

    model = inject(Net(), cfg(), "a").eval()
    inject(model, cfg(), "b")
    unloaded = merge_and_unload(copy.deepcopy(model))
    assert not unloaded._forward_pre_hooks
    x = torch.randn(2, 16)
    model(x, adapter_names=["a", "b"])  # the original still takes adapter_names


def test_mixed_batch_hook_passes_names_and_clears_them():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 16)
    inject(model, cfg(), "a")
    inject(model, cfg(r=2), "b")
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    model.eval()
    names = ["b", "__base__", "a"]
    mixed = model(x, adapter_names=names)
    assert all(layer.batch_adapter_names is None for layer in lora_layers(model).values())
    for i, n in enumerate(names):
        if n == "__base__":
            with disable_adapters(model):
                alone = model(x[i:i + 1])
        else:
            set_adapter(model, n)
            alone = model(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=1e-6)


def test_mixed_batch_names_are_cleared_after_an_exception():
    model = inject(Net(), cfg()).eval()
    with pytest.raises(ValueError, match="adapter_names has 2 entries"):
        model(torch.randn(3, 16), adapter_names=["default", "default"])
    assert all(layer.batch_adapter_names is None for layer in lora_layers(model).values())
    model(torch.randn(3, 16))  # and the next plain call is plain


def test_mixed_batch_errors():
    model = inject(Net(), cfg())
    with pytest.raises(ValueError, match="model.eval"):
        model(torch.randn(2, 16), adapter_names=["default", "default"])
    model.eval()
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(torch.randn(2, 16), adapter_names=["default", "nope"])
    merge(model)
    with pytest.raises(ValueError, match="merged"):
        model(torch.randn(2, 16), adapter_names=["default", "default"])


def delta(model, name):
    return {n: layer.delta_weight(name) for n, layer in lora_layers(model).items() if name in layer.lora_A}


def test_weighted_combination_cat_is_exact_and_svd_reports_its_error():
    model = inject(Net(), cfg(r=4), "a")
    inject(model, cfg(r=3, alpha=5, use_rslora=True, target_modules=["q_proj"]), "b")
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    da, db = delta(model, "a"), delta(model, "b")
    target = {n: 0.6 * da[n] - 1.5 * db.get(n, 0) for n in da}

    errors = add_weighted_adapter(model, ["a", "b"], [0.6, -1.5], "cat")
    assert errors == {n: 0.0 for n in da}
    for n, d in delta(model, "cat").items():
        torch.testing.assert_close(d, target[n], atol=1e-6, rtol=1e-5)
    assert model.lora_configs["cat"].r == 7

    errors = add_weighted_adapter(model, ["a", "b"], [0.6, -1.5], "svd2", combination_type="svd", svd_rank=2)
    for n, d in delta(model, "svd2").items():
        actual = ((d - target[n]).norm() / target[n].norm()).item()
        assert errors[n] == pytest.approx(actual, rel=1e-3, abs=1e-6) and errors[n] > 0.01
    errors = add_weighted_adapter(model, ["a", "b"], [0.6, -1.5], "svd7", combination_type="svd", svd_rank=7)
    assert max(errors.values()) < 1e-5


def test_decoder_lm_inject_train_step_and_merge():
    torch.manual_seed(0)
    cfg_m = get_config("decoder-tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              d_ff=64, max_seq_len=32)
    model = DecoderLM(cfg_m)
    ids = torch.randint(0, 128, (2, 12))
    y0 = model(ids).logits
    inject(model, cfg(target_modules=["q_proj", "v_proj", "down_proj"]))
    assert torch.equal(model(ids).logits, y0)
    report = trainable_report(model, verbose=False)
    q, v, down = 4 * 32 + 32 * 4, 4 * 32 + 16 * 4, 4 * 64 + 32 * 4  # A (r x in) + B (out x r); v is GQA: 2 kv heads x 8
    assert report.trainable == 2 * (q + v + down)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    y = model(ids).logits
    torch.testing.assert_close(model(ids, adapter_names=["default", "__base__"]).logits[1], y0[1], atol=1e-5, rtol=1e-5)
    merge_and_unload(model)
    torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
