"""Model-level LoRA: target matching, freezing, several adapters, mixed batches, merging, combining, counting;
modules_to_save (the copies, what trains, switching, and the errors)."""

import copy
import re

import pytest
import torch
import torch.nn as nn

from minilora.inject import (ModulesToSave, add_weighted_adapter, delete_adapter, disable_adapters, inject,
                             adapter_layers, merge, merge_and_unload, saved_modules, set_adapter, trainable_report,
                             unmerge)
from minilora.io import adapter_state_dict
from minilora.methods.adalora import AdaLoraConfig
from minilora.methods.ia3 import IA3Config
from minilora.methods.lora import LoraConfig
from minilora.models import DecoderLM, get_config

from adapters import assert_close_fp32, randomize_adapters


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
    assert set(adapter_layers(model)) == expected


@pytest.mark.parametrize("targets, exclude, expected", [
    (["q_proj", "v_proj"], ["layers.0.q_proj"], {"layers.1.q_proj", "layers.0.v_proj", "layers.1.v_proj"}),
    (r".*_proj", ["v_proj"], {"layers.0.q_proj", "layers.1.q_proj"}),  # a suffix, as in target_modules
    (["q_proj", "v_proj"], r"layers\.1\..*", {"layers.0.q_proj", "layers.0.v_proj"}),  # one full-match regex
    (r".*_proj", ("layers.0.v_proj", "layers.1.v_proj"), {"layers.0.q_proj", "layers.1.q_proj"}),  # tuple = list
])
def test_exclude_modules_wins_over_target_modules(targets, exclude, expected):
    model = inject(Net(), cfg(target_modules=targets, exclude_modules=exclude))
    assert set(adapter_layers(model)) == expected
    assert type(model.layers[0].norm) is nn.LayerNorm and type(model.head) is nn.Linear


def test_exclude_modules_suffix_needs_a_whole_name_part():
    model = inject(Net(), cfg(exclude_modules=["proj"]))  # "proj" is no module's last name part
    assert len(adapter_layers(model)) == 4


def test_excluding_every_match_of_a_target_is_an_error_that_says_so():
    model = Net()
    with pytest.raises(ValueError, match=r"\['v_proj'\] match no module of Net \(after exclude_modules\)"):
        inject(model, cfg(exclude_modules=["layers.0.v_proj", "layers.1.v_proj"]))
    assert not adapter_layers(model)


def test_a_regex_target_that_matches_nothing_is_named():
    pattern = r"layers\.9\.q_proj"
    with pytest.raises(ValueError, match=re.escape(str([pattern]) + " match no module of Net.")):
        inject(Net(), cfg(target_modules=pattern))


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
    assert not adapter_layers(model)  # nothing was wrapped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_outputs_unchanged_at_init_and_only_adapters_train():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 5, 16)
    y0 = model(x)
    inject(model, cfg())
    assert torch.equal(model(x), y0)  # B = 0: exact zeros added to the same base products
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


def test_bias_all_trains_base_biases_but_not_the_lora_biases_of_inactive_adapters():
    model = inject(Net(), cfg(bias="all"), "a")
    inject(model, cfg(lora_bias=True), "b")  # inactive: its B biases stay frozen like the rest of b
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".lora_B.b." in n for n in trainable)
    assert "layers.0.q_proj.base_layer.bias" in trainable and "layers.0.norm.bias" in trainable


def test_a_model_without_adapters_has_none_to_set_or_merge():
    with pytest.raises(ValueError, match=r"unknown adapter 'x'; this model has \[\]"):
        set_adapter(Net(), "x")
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="nothing to do"):
        merge(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", [3, "", "my.adapter", "__base__"])
def test_adapter_names_must_be_plain_non_empty_strings(name):
    model = Net()
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string without '.'"):
        inject(model, cfg(), name)
    assert not adapter_layers(model)


def test_injecting_twice_with_the_same_name_raises():
    model = inject(Net(), cfg())
    with pytest.raises(ValueError, match="already in this model"):
        inject(model, cfg())


def test_several_adapters_set_active_and_summed():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 16)
    inject(model, cfg(), "a")
    inject(model, cfg(r=2, target_modules=["v_proj"]), "b")
    assert model.adapter_active == ["a"]  # a new adapter waits until set_adapter picks it
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
        assert_close_fp32(model(x), y0)  # W restored up to an ulp by unmerging
    assert all(layer.merged for layer in adapter_layers(model).values())
    assert_close_fp32(model(x), y1)  # W' x against W x + s B (A x): one sum in two orders


def test_delete_adapter_removes_every_trace_of_it():
    model = inject(Net(), cfg(dropout=0.1), "a")
    inject(model, cfg(r=2), "b")
    delete_adapter(model, "a")
    for layer in adapter_layers(model).values():
        for table in (layer.lora_A, layer.lora_B, layer.lora_dropout, layer.r, layer.scaling):
            assert list(table) == ["b"]
        assert layer.active_adapters == []
    assert model.adapter_active == [] and set(model.adapter_configs) == {"b"}
    assert not any(".a." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="unknown adapter"):
        delete_adapter(model, "a")


def test_forward_after_deleting_the_active_adapter_is_the_base_then_the_other_adapter():
    torch.manual_seed(0)
    base, x = Net(), torch.randn(3, 16)
    model = inject(copy.deepcopy(base), cfg(), "a")
    inject(model, cfg(r=2), "b")
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    delete_adapter(model, "a")  # the only active one
    assert model.adapter_active == []
    assert torch.equal(model(x), base(x))  # nothing active: every LoRA layer runs its base layer alone
    set_adapter(model, "b")
    expected = copy.deepcopy(model)
    merge_and_unload(expected)  # W + dW_b, by another route
    assert_close_fp32(model(x), expected(x))


def test_deleting_one_adapter_keeps_the_other_active():
    model = inject(Net(), cfg(), "a")
    inject(model, cfg(), "b")
    set_adapter(model, ["b", "a"])
    delete_adapter(model, "b")
    assert model.adapter_active == ["a"]
    assert all(layer.active_adapters == ["a"] for layer in adapter_layers(model).values())


def test_deleting_a_merged_adapter_raises_and_keeps_it():
    model = inject(Net(), cfg(), "a")
    inject(model, cfg(), "b")
    merge(model, ["a"])
    with pytest.raises(ValueError, match="adapter 'a' is merged; call unmerge"):
        delete_adapter(model, "a")
    assert "a" in model.adapter_configs and all("a" in layer.lora_A for layer in adapter_layers(model).values())
    delete_adapter(model, "b")  # an adapter that is not merged can go
    assert set(model.adapter_configs) == {"a"}


def test_model_merge_twice_is_noop_with_warning_and_unmerge_restores():
    model = inject(Net(), cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    W = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        merge(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())  # nothing recomputed
    unmerge(model)
    for k, v in W.items():  # (W + dW) - dW: elementwise fp32, within an ulp of |W + dW| < 1
        torch.testing.assert_close(model.state_dict()[k], v, atol=2.5e-7, rtol=0)


def test_model_safe_merge_touches_no_layer_when_one_is_broken():
    model = inject(Net(), cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    with torch.no_grad():
        model.layers[1].v_proj.lora_B["default"].weight[0, 0] = float("inf")
    W = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.v_proj"):
        merge(model, safe_merge=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in W.items())
    assert not any(layer.merged for layer in adapter_layers(model).values())


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
    assert out is model and not adapter_layers(model)
    assert type(model.layers[0].q_proj) is nn.Linear
    assert not hasattr(model, "adapter_configs") and not model._forward_pre_hooks and not model._forward_hooks
    assert not hasattr(model, "adapter_active")
    assert_close_fp32(model(x), y)  # merged weights: the same sums in another order


def test_merge_and_unload_of_a_copy_leaves_the_original_working():
    torch.manual_seed(0)
    model = inject(Net(), cfg(), "a").eval()
    inject(model, cfg(r=2), "b")
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    x = torch.randn(2, 16)
    alone = []
    for i, n in enumerate(["a", "b"]):  # each example with its adapter, without adapter_names
        set_adapter(model, n)
        alone.append(model(x[i:i + 1]))
    set_adapter(model, "a")
    unloaded = merge_and_unload(copy.deepcopy(model))
    assert not unloaded._forward_pre_hooks and not unloaded._forward_hooks
    assert not unloaded._forward_pre_hooks_with_kwargs and not unloaded._forward_hooks_always_called
    with pytest.raises(TypeError):
        unloaded(x, adapter_names=["a", "b"])  # a plain model again: Net.forward takes no adapter_names
    assert_close_fp32(unloaded(x[:1]), alone[0])  # W + dW_a merged
    mixed = model(x, adapter_names=["a", "b"])  # the original still takes adapter_names
    assert_close_fp32(mixed[:1], alone[0])
    assert_close_fp32(mixed[1:], alone[1])
    assert adapter_layers(model) and model.adapter_active == ["a"]


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
    assert all(layer.batch_adapter_names is None for layer in adapter_layers(model).values())
    for i, n in enumerate(names):
        if n == "__base__":
            with disable_adapters(model):
                alone = model(x[i:i + 1])
        else:
            set_adapter(model, n)
            alone = model(x[i:i + 1])
        assert_close_fp32(mixed[i:i + 1], alone)  # batched (bmm) against one example: another summation order


def test_mixed_batch_of_base_rows_only_is_the_base_model():
    torch.manual_seed(0)
    base, x = Net(), torch.randn(3, 16)
    model = inject(copy.deepcopy(base), cfg(), "a").eval()
    inject(model, cfg(r=2, target_modules=["v_proj"]), "b")
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    out = model(x, adapter_names=["__base__"] * 3)
    assert_close_fp32(out, base(x))
    assert out.dtype == torch.float32
    # q_proj has no adapter "b": there it runs the base alone, while v_proj adds b's update
    mixed = model(x, adapter_names=["b", "__base__", "b"])
    set_adapter(model, "b")
    assert_close_fp32(mixed[[0, 2]], model(x[[0, 2]]))
    assert_close_fp32(mixed[1], base(x[1]))


def test_mixed_batch_names_are_cleared_after_an_exception():
    model = inject(Net(), cfg()).eval()
    with pytest.raises(ValueError, match="adapter_names has 2 entries"):
        model(torch.randn(3, 16), adapter_names=["default", "default"])
    assert all(layer.batch_adapter_names is None for layer in adapter_layers(model).values())
    model(torch.randn(3, 16))  # and the next plain call is plain


def test_mixed_batch_errors():
    model = inject(Net(), cfg())
    with pytest.raises(ValueError, match="model.eval"):
        model(torch.randn(2, 16), adapter_names=["default", "default"])
    model.eval()
    with pytest.raises(TypeError, match="one name per example"):
        model(torch.randn(2, 16), adapter_names="default")
    model(torch.randn(2, 16), adapter_names=("default", "__base__"))  # any sequence of names
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(torch.randn(2, 16), adapter_names=["default", "nope"])
    merge(model)
    with pytest.raises(ValueError, match="merged"):
        model(torch.randn(2, 16), adapter_names=["default", "default"])


def delta(model, name):
    """scaling * B A of adapter `name` in each layer, in float64 from the stored tensors."""
    return {n: layer.scaling[name] * layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()
            for n, layer in adapter_layers(model).items() if name in layer.lora_A}


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
        assert_close_fp32(d, target[n])  # w_i s_i A_i is rounded to fp32 once
    assert model.adapter_configs["cat"].r == 7 and model.adapter_configs["cat"].scaling == 1.0
    assert model.adapter_active == ["a"]  # the new adapter waits for set_adapter, like any added one

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
    assert torch.equal(model(ids).logits, y0)  # B = 0: exact zeros added to the same base products
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


def tiny_lm(kind):
    from minilora.models import Seq2SeqLM

    torch.manual_seed(0)
    if kind == "decoder":
        return DecoderLM(get_config("decoder-tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    d_ff=48, max_seq_len=32))
    return Seq2SeqLM(get_config("seq2seq-tiny", vocab_size=64, d_model=32, n_encoder_layers=2, n_layers=2, n_heads=4,
                                d_ff=48, max_seq_len=32))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kind", ["decoder", "seq2seq"])
def test_generate_with_adapter_names_decodes_each_row_with_its_adapter(kind, use_cache):
    base = tiny_lm(kind).eval()
    model = inject(copy.deepcopy(base), cfg(target_modules=["q_proj", "v_proj", "o_proj"]), "a")
    inject(model, cfg(r=2, target_modules=["q_proj", "v_proj", "o_proj"]), "b")
    randomize_adapters(model, "a", 1, std=0.5)  # large updates, so that the adapters pick different tokens
    randomize_adapters(model, "b", 2, std=0.5)
    ids = torch.randint(4, 64, (3, 6))
    names = ["b", "__base__", "a"]
    got = model.generate(ids, max_new_tokens=8, use_cache=use_cache, eos_token_id=-1, adapter_names=names)
    assert all(layer.batch_adapter_names is None for layer in adapter_layers(model).values())
    rows = []
    for i, n in enumerate(names):  # each prompt alone, the adapter chosen the ordinary way
        if n == "__base__":
            rows.append(base.generate(ids[i:i + 1], max_new_tokens=8, use_cache=use_cache, eos_token_id=-1))
        else:
            set_adapter(model, n)
            rows.append(model.generate(ids[i:i + 1], max_new_tokens=8, use_cache=use_cache, eos_token_id=-1))
    assert torch.equal(got, torch.cat(rows))  # token ids: a different adapter would pick other tokens
    assert len({tuple(r[0, -8:].tolist()) for r in rows}) == 3  # the three rows really differ


def test_generate_with_adapter_names_needs_eval_mode_and_one_name_per_row():
    model = inject(tiny_lm("decoder"), cfg(target_modules=["q_proj"]))
    ids = torch.randint(4, 64, (2, 5))
    with pytest.raises(ValueError, match="model.eval"):
        model.generate(ids, max_new_tokens=2, adapter_names=["default", "__base__"])
    model.eval()
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2"):
        model.generate(ids, max_new_tokens=2, adapter_names=["default"] * 3)


def test_merge_of_named_adapters_merges_only_those():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 16)
    inject(model, cfg(), "a")
    inject(model, cfg(r=2, target_modules=["v_proj"]), "b")  # b lives in the v_proj layers only
    randomize_adapters(model, "a", 1, std=0.2)
    randomize_adapters(model, "b", 2, std=0.2)
    exact = {n: layer.base_layer.weight.double() + delta(model, "b").get(n, 0) for n, layer in adapter_layers(model).items()}
    merge(model, ["b"], safe_merge=True)  # not the active adapter "a"
    for n, layer in adapter_layers(model).items():
        assert layer.merged_adapters == (["b"] if "v_proj" in n else [])
        assert_close_fp32(layer.base_layer.weight, exact[n])


def test_merge_and_unload_with_safe_merge_refuses_nan_and_keeps_the_adapters():
    model = inject(Net(), cfg())
    randomize_adapters(model, "default", 1, std=0.2)
    with torch.no_grad():
        model.layers[0].q_proj.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        merge_and_unload(model, safe_merge=True)
    assert len(adapter_layers(model)) == 4 and not any(layer.merged for layer in adapter_layers(model).values())


def test_merge_and_unload_after_a_mixed_batch_leaves_no_adapter_state():
    model = inject(Net(), cfg()).eval()
    model(torch.randn(2, 16), adapter_names=["default", "__base__"])
    merge_and_unload(model)
    assert not {"adapter_configs", "adapter_active", "_adapter_batch_set"} & set(vars(model))


def test_trainable_report_of_a_model_without_parameters_is_zero(capsys):
    assert trainable_report(nn.Sequential(), verbose=False) == (0, 0, 0.0)


def test_lora_layer_repr_names_adapters_ranks_and_state():
    model = inject(Net(), cfg(), "a")
    inject(model, cfg(r=2), "b")
    merge(model)
    assert "adapters={'a': 4, 'b': 2}, active=['a'], merged=['a']" in repr(model.layers[0].q_proj)


def test_a_second_adapter_wraps_lora_layers_never_their_insides():
    model = inject(Net(), cfg(target_modules=["q_proj"]), "a")
    inject(model, cfg(target_modules=r".*q_proj.*"), "b")  # would also match q_proj.lora_A.a, q_proj.base_layer
    assert set(adapter_layers(model)) == {"layers.0.q_proj", "layers.1.q_proj"}
    assert all(list(layer.lora_A) == ["a", "b"] for layer in adapter_layers(model).values())
    assert type(model.layers[0].q_proj.base_layer) is nn.Linear


def test_unknown_adapter_error_suggests_the_closest_name():
    model = inject(Net(), cfg(), "alpha")
    with pytest.raises(ValueError, match=r"unknown adapter 'alpah'; this model has \['alpha'\] \(did you mean 'alpha'\?\)"):
        set_adapter(model, "alpah")


def test_merge_without_safe_merge_writes_what_it_computes():
    model = inject(Net(), cfg())
    with torch.no_grad():
        model.layers[0].q_proj.lora_B["default"].weight[0, 0] = float("nan")
    merge(model)  # safe_merge is off by default, as in peft: no check, no error
    assert model.layers[0].q_proj.base_layer.weight[0].isnan().all()
    layer = model.layers[1].q_proj
    layer.unmerge()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    layer.merge()  # the layer's own merge: the same default
    assert layer.merged and not layer.base_layer.weight[0].isfinite().any()
    unmerge(model)
    merge_and_unload(model)  # the same default again
    assert not adapter_layers(model) and model.layers[0].q_proj.weight[0].isnan().all()


def test_injected_layers_follow_the_models_mode():
    """A model put in eval mode before inject stays in eval mode: no dropout on the new adapter."""
    model = Net().eval()
    inject(model, cfg(dropout=0.5))
    randomize_adapters(model)  # B = 0 would hide dropout
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 16)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    inject(model, cfg(dropout=0.5), "second")
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------- modules_to_save

def perturb_copies(model, name, seed):
    """Move adapter `name`'s copies off the original, so that running the wrong module shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in saved_modules(model).values():
            for p in wrapper.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g))


def two_adapters_with_copies():
    """Net with LoRA adapters "a" and "b", each with its own copy of the head, moved apart."""
    torch.manual_seed(0)
    base = Net()
    model = inject(copy.deepcopy(base), cfg(modules_to_save=["head"]), "a")
    inject(model, cfg(modules_to_save=["head"]), "b")
    perturb_copies(model, "a", 1)
    perturb_copies(model, "b", 2)
    return base, model


@pytest.mark.parametrize("config", [LoraConfig, IA3Config, lambda **kw: AdaLoraConfig(total_step=10, **kw)])
def test_modules_to_save_is_checked_and_normalised_by_every_config(config):
    for value, fix in [("head", r"not a string: write \['head'\]"), ([3], "must be a list of module names"),
                       (["head", ""], "must be a list of module names"), ({"head": 1}, "must be a list of module names")]:
        with pytest.raises(ValueError, match=fix):
            config(target_modules=["q_proj"], modules_to_save=value)
    assert config(target_modules=["q_proj"], modules_to_save=("head", "norm")).modules_to_save == ["head", "norm"]
    assert config(target_modules=["q_proj"], modules_to_save={"norm", "head"}).modules_to_save == ["head", "norm"]
    assert config(target_modules=["q_proj"], modules_to_save=[]).modules_to_save is None
    c = config(target_modules=["q_proj"], modules_to_save=["head"])
    assert c.to_peft_dict()["modules_to_save"] == ["head"] and type(c).from_peft_dict(c.to_peft_dict()) == c


def test_copies_start_as_the_original_and_train_in_its_place():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 16)
    y0 = model(x)
    inject(model, cfg(modules_to_save=["head", "layers.0.norm"]))
    assert torch.equal(model(x), y0)  # copies equal to the originals, B = 0
    assert set(saved_modules(model)) == {"head", "layers.0.norm"}  # ".norm" names the exact part, not layers.1's too
    assert {"head.original_module.weight", "head.modules_to_save.default.weight"} <= set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {
        "head.modules_to_save.default.weight", "head.modules_to_save.default.bias",
        "layers.0.norm.modules_to_save.default.weight", "layers.0.norm.modules_to_save.default.bias"}
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if ".original_module." in n)
    total_base = 2 * (2 * (16 * 16 + 16) + 2 * 16) + 16 * 4 + 4
    lora, copies = 4 * (4 * 16 + 16 * 4), (16 * 4 + 4) + 2 * 16  # 4 LoRA layers; the head and one LayerNorm
    assert trainable_report(model, verbose=False)[:2] == (lora + copies, total_base + lora + copies)


def test_set_adapter_disable_delete_and_unload_choose_the_copy_that_runs():
    base, model = two_adapters_with_copies()
    wrapper, x = model.head, torch.randn(3, 16)
    head_out = {n: wrapper.modules_to_save[n](x) for n in ("a", "b")}
    assert torch.equal(wrapper(x), head_out["a"])
    set_adapter(model, "b")
    assert torch.equal(wrapper(x), head_out["b"])
    assert not any(p.requires_grad for p in wrapper.adapter_parameters("a"))
    assert all(p.requires_grad for p in wrapper.adapter_parameters("b"))
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each have a copy of 'head'.*set_adapter\(model, 'a'\)"):
        set_adapter(model, ["a", "b"])
    assert model.adapter_active == ["b"]  # refused before anything changed
    with disable_adapters(model):
        assert torch.equal(wrapper(x), base.head(x))
    assert torch.equal(wrapper(x), head_out["b"])
    delete_adapter(model, "b")  # the active one: nothing runs but the original
    assert wrapper.adapters == ["a"] and torch.equal(wrapper(x), base.head(x))
    set_adapter(model, "a")
    copy_a = wrapper.modules_to_save["a"]
    merged = merge_and_unload(model)
    assert merged.head is copy_a and not saved_modules(merged)


def test_mixed_batch_runs_each_example_through_its_adapters_copy():
    base, model = two_adapters_with_copies()
    model.eval()
    x, names = torch.randn(4, 16), ["b", "__base__", "a", "b"]
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            alone = base(x[i:i + 1])
        else:
            set_adapter(model, name)
            alone = model(x[i:i + 1])
        assert_close_fp32(mixed[i:i + 1], alone)
    assert model.head.batch_adapter_names is None  # cleared after the call


def test_a_mixed_batch_through_a_module_that_takes_no_batch_says_so():
    class Lengths(nn.Module):  # like T5's relative position bias: called with a length, not with the batch
        def __init__(self):
            super().__init__()
            self.table = nn.Linear(1, 16)

        def forward(self, n: int):
            return self.table(torch.ones(n, 1))

    class WithLengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.lengths, self.q_proj = Lengths(), nn.Linear(16, 16)

        def forward(self, x):
            return self.q_proj(x) + self.lengths(x.shape[1])  # (N, T, 16) + (T, 16)

    model = inject(WithLengths(), cfg(target_modules=["q_proj"], modules_to_save=["lengths"])).eval()
    x = torch.randn(3, 5, 16)
    with pytest.raises(ValueError, match="needs the batch of 3 examples as its first argument; it got int. Run these "
                                         r"adapters one at a time with set_adapter\(model, name\)"):
        model(x, adapter_names=["default", "__base__", "default"])
    assert_close_fp32(model(x, adapter_names=["default"] * 3), model(x))  # one module runs for all: fine


@pytest.mark.parametrize("kw, fix", [
    (dict(modules_to_save=["haed"]), r"modules_to_save \['haed'\] match no module of Net. Closest module names: \['head'"),
    (dict(target_modules=["q_proj", "head"], modules_to_save=["head"]),
     r"'head' is a target and in modules_to_save \('head'\).*exclude_modules=\['head'\]"),
    (dict(modules_to_save=["layers.0"]), r"'layers.0.q_proj' is a target and nested with modules_to_save \('layers.0'\)"),
    (dict(target_modules=["head"], modules_to_save=["layers.0", "norm"]), "one inside the other"),
    (dict(target_modules=["head"], modules_to_save=["layers"]), "'layers' is a ModuleList, which has no forward"),
])
def test_modules_to_save_errors_name_the_fix_and_change_nothing(kw, fix):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=fix):
        inject(model, cfg(**kw))
    assert not adapter_layers(model) and not saved_modules(model) and not hasattr(model, "adapter_configs")
    assert model.state_dict().keys() == before.keys()


def test_modules_to_save_and_another_adapters_layers_stay_apart():
    model = inject(Net(), cfg(modules_to_save=["head"]), "a")
    with pytest.raises(ValueError, match=r"'head' holds modules_to_save copies of adapters \['a'\].*exclude_modules"):
        inject(model, cfg(target_modules=["head"]), "b")
    with pytest.raises(ValueError, match=r"modules_to_save 'layers.0' is or holds adapter layers \(of adapters \['a'\]\)"):
        inject(model, cfg(target_modules=["layers.1.q_proj"], modules_to_save=["layers.0"]), "b")
    inject(model, cfg(modules_to_save=["head"]), "b")  # a second copy in the same wrapper
    assert isinstance(model.head, ModulesToSave) and model.head.adapters == ["a", "b"]


def test_bias_all_leaves_the_original_frozen_and_saves_each_copy_once():
    model = inject(Net(), cfg(bias="all", modules_to_save=["head"]))
    assert model.layers[0].norm.bias.requires_grad and model.head.modules_to_save["default"].bias.requires_grad
    assert not model.head.original_module.bias.requires_grad
    keys = set(adapter_state_dict(model))
    assert {"head.weight", "head.bias", "layers.0.norm.bias"} <= keys  # the copy's bias under peft's key, once
    assert not any(".original_module." in k or ".modules_to_save." in k for k in keys)


def test_weighted_combination_refuses_adapters_with_copies():
    base, model = two_adapters_with_copies()
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] train copies of modules \(modules_to_save\)"):
        add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix")
    assert set(model.adapter_configs) == {"a", "b"}
