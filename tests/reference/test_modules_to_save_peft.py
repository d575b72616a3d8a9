"""modules_to_save against peft's on the same weights: the copies of T5's relative position bias tables
(Seq2SeqLM) and of a decoder's norms and head, with LoRA around them: state-dict names, outputs and the
copies' gradients, the merged model, files both ways, switching between two adapters, disabling, deleting,
mixed batches; then DoRA, IA3 and AdaLoRA with copies: outputs, the copies' gradients and peft's files.

Every copy is moved off the original before comparing: a copy equal to it would hide running the wrong one.
The saved names are ones peft's bare-suffix matching and ours agree on (inject.py's docstring says where they
differ). float32 is held to 1e-5 of the output's scale (TOL: the summation orders of the two graphs differ by
rounding only, as in test_lora_peft.py), and equality is proven in float64 (1e-10)."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peft

from minilora.inject import (ModulesToSave, delete_adapter, disable_adapters, inject, merge_and_unload, saved_modules,
                             set_adapter)
from minilora.io import load_adapter, save_adapter
from minilora.methods.adalora import AdaLoraConfig
from minilora.methods.ia3 import IA3Config
from minilora.methods.lora import LoraConfig

from adapters import adapter_grads, rel, run, seq2seq_batch, tiny_decoder, tiny_seq2seq, to_dtype

warnings.filterwarnings("ignore", category=UserWarning)
TOL = 1e-5  # float32, relative to the tensor's scale: rounding of different summation orders, with margin
TOL64 = 1e-10  # float64: only summation order may differ
PREFIX = "base_model.model."
SAVED = ".modules_to_save."  # in the name of every copy's tensor, ours and peft's
TARGETS = ["q_proj", "v_proj"]

CASES = {  # base model, modules_to_save, input
    # called with lengths, not a batch; q/v match self- and cross-attention
    "seq2seq": (tiny_seq2seq, ["relative_attention_bias"], seq2seq_batch),
    # RMSNorms inside the layers and at the end, and the head (an nn.Linear)
    "decoder": (tiny_decoder, ["post_attention_layernorm", "model.norm", "lm_head"],
                lambda: torch.randint(0, 64, (4, 10))),
}


def perturb(model, name="default", seed=0):
    """Move adapter `name`'s tensors off their init: B = 0, λ = 0, l = 1 or a copy equal to its original would
    each hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if f".{name}." in k + ".":
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def copy_into_peft(ours, theirs):
    """Our whole state into peft's model: the keys are the same once peft's prefix is added (base, adapter tensors,
    `original_module` and `modules_to_save.<adapter>`); only peft's AdaLoRA has a tensor more, its r_0."""
    result = theirs.load_state_dict({PREFIX + k: v for k, v in ours.state_dict().items()}, strict=False)
    assert not result.unexpected_keys and all(".ranknum." in k for k in result.missing_keys), result


def trainable(model, prefix=""):
    return {n.removeprefix(prefix) for n, p in model.named_parameters() if p.requires_grad}


def peft_lora(cfg: LoraConfig):
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules,
                           modules_to_save=cfg.modules_to_save)


def pair(case, name="default", saved=None):
    make, case_saved, make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    cfg = LoraConfig(r=4, alpha=8, target_modules=TARGETS, modules_to_save=saved or case_saved)
    ours = inject(copy.deepcopy(base), cfg, name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_lora(cfg), adapter_name=name)
    assert trainable(ours) == trainable(theirs, PREFIX)  # A, B and the copies; never an original
    perturb(ours, name)
    copy_into_peft(ours, theirs)
    return base, ours.eval(), theirs.eval(), cfg, make_x()


def add_second(ours, theirs, cfg, name="second", seed=1, **changes):
    cfg = LoraConfig(**{**cfg.__dict__, "r": 2, "alpha": 3.0, **changes})
    inject(ours, cfg, name)
    theirs.add_adapter(name, peft_lora(cfg))
    perturb(ours, name, seed)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_wraps_the_same_modules_under_peft_names(case):
    base, ours, theirs, cfg, x = pair(case)
    peft_wrapped = {n.removeprefix(PREFIX) for n, m in theirs.named_modules()
                    if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert set(saved_modules(ours)) == peft_wrapped and len(peft_wrapped) >= 2
    assert {PREFIX + k for k in ours.state_dict()} == set(theirs.state_dict())


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_outputs_and_gradients_of_the_copies(case):
    base, ours, theirs, cfg, x = pair(case)
    assert rel(run(ours, x), run(theirs, x)) <= TOL
    assert rel(run(ours, x), run(base, x)) > 1e-3  # the copies (and A, B) really changed something

    for marker in (SAVED, ".lora_"):
        grads = adapter_grads(ours, theirs, x, marker)
        assert grads and all(got is not None and rel(got, want) <= TOL for got, want in grads.values()), marker
    for wrapper in saved_modules(ours).values():  # the original is frozen and gets nothing
        assert all(not p.requires_grad and p.grad is None for p in wrapper.original_module.parameters())

    ours64, theirs64, x64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double(), to_dtype(x, torch.float64)
    assert rel(run(ours64, x64), run(theirs64, x64)) <= TOL64
    for marker in (SAVED, ".lora_"):
        for k, (got, want) in adapter_grads(ours64, theirs64, x64, marker).items():
            assert rel(got, want) <= TOL64, k


@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_puts_the_active_copy_back_like_peft(case):
    base, ours, theirs, cfg, x = pair(case)
    ours_merged, theirs_merged = merge_and_unload(ours), theirs.merge_and_unload()
    assert not any(isinstance(m, ModulesToSave) for m in ours_merged.modules())
    assert [type(m) for m in ours_merged.modules()] == [type(m) for m in theirs_merged.modules()]
    want = theirs_merged.state_dict()
    assert ours_merged.state_dict().keys() == want.keys()
    for k, v in ours_merged.state_dict().items():  # merged weights W + s B A: float32 rounding; copies: equal
        assert rel(v, want[k]) <= TOL, k
    assert rel(run(ours_merged, x), run(theirs_merged, x)) <= TOL
    assert trainable(ours_merged) == trainable(theirs_merged)  # the copies stay trainable, as in peft


@pytest.mark.parametrize("case", list(CASES))
def test_files_round_trip_with_peft(case, tmp_path):
    base, ours, theirs, cfg, x = pair(case)
    expected = run(ours, x)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ka = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    kb = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ka.keys() == kb.keys() and all(torch.equal(ka[k], kb[k]) for k in ka)
    for name in saved_modules(ours):  # a copy is saved under its module's own keys
        assert PREFIX + name + ".weight" in ka
    da = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    db = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert da["modules_to_save"] == db["modules_to_save"] == cfg.modules_to_save

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()  # peft loads ours
    assert rel(run(loaded, x), expected) <= TOL
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()  # we load peft's
    assert rel(run(mine, x), expected) <= TOL
    assert not any(p.requires_grad for p in mine.parameters())  # inference mode, like peft
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    theirs_trainable = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    assert trainable(mine) == trainable(theirs_trainable, PREFIX)


@pytest.mark.parametrize("case", list(CASES))
def test_set_adapter_disable_and_delete_match_peft(case):
    base, ours, theirs, cfg, x = pair(case, "first")
    add_second(ours, theirs, cfg)
    add_second(ours, theirs, cfg, "plain", seed=2, modules_to_save=None)  # no copies: the originals run
    for name in ["second", "plain", "first"]:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        assert rel(run(ours, x), run(theirs, x)) <= TOL, name
        assert trainable(ours) == trainable(theirs, PREFIX), name  # only the active adapter's copies train

    with pytest.raises(ValueError, match=r"adapters \['first', 'second'\] each have a copy"):
        set_adapter(ours, ["first", "second"])
    with pytest.raises(ValueError, match="Only one adapter can be set"):  # peft refuses too
        theirs.base_model.set_adapter(["first", "second"])

    with disable_adapters(ours), theirs.disable_adapter(), torch.no_grad():  # no_grad: the same attention kernels
        assert torch.equal(run(ours, x), run(base, x))  # the originals, bit for bit
        assert rel(run(ours, x), run(theirs, x)) <= TOL
    assert rel(run(ours, x), run(theirs, x)) <= TOL  # the copies are back

    delete_adapter(ours, "second")
    theirs.delete_adapter("second")
    assert {PREFIX + k for k in ours.state_dict()} == set(theirs.state_dict())
    assert rel(run(ours, x), run(theirs, x)) <= TOL


def test_mixed_batch_through_a_saved_head_matches_peft():
    base, ours, theirs, cfg, x = pair("decoder", "first", saved=["lm_head"])  # peft mixes Linear copies only
    add_second(ours, theirs, cfg)
    names = ["first", "__base__", "second", "first"]
    assert rel(run(ours, x, adapter_names=names), run(theirs, x, adapter_names=names)) <= TOL


def test_mixed_batch_through_saved_norms_gives_each_example_what_peft_gives_it_alone():
    """peft refuses a mixed batch through copies of a norm (TypeError); each example is normalised on its own,
    so running every adapter's rows through its copy gives what peft gives each example alone."""
    base, ours, theirs, cfg, x = pair("decoder", "first")
    add_second(ours, theirs, cfg)
    names = ["first", "__base__", "second", "first"]
    with pytest.raises(TypeError, match="Mixed batching is only supported"):
        run(copy.deepcopy(theirs), x, adapter_names=names)  # a copy: peft's hooks stay behind after the error
    mixed = run(ours, x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            alone = run(base, x[i:i + 1])
        else:
            theirs.set_adapter(name)
            alone = run(theirs, x[i:i + 1])
        assert rel(mixed[i:i + 1], alone) <= TOL, i


def test_a_mixed_batch_cannot_mix_copies_of_the_relative_position_bias():
    """The tables are called with lengths, not with the batch, so one call serves every example: examples may
    mix adapters only where they share the module that runs (its original, or one adapter's copy)."""
    base, ours, theirs, cfg, x = pair("seq2seq", "first")
    add_second(ours, theirs, cfg, "plain", modules_to_save=None)
    with pytest.raises(ValueError, match="needs the batch of 4 examples as its first argument; it got int"):
        run(ours, x, adapter_names=["first", "__base__", "first", "first"])
    names = ["plain", "__base__", "plain", "plain"]  # both run the originals: fine
    mixed = run(ours, x, adapter_names=names)
    for i, name in enumerate(names):
        example = {k: v[i:i + 1] for k, v in x.items()}
        if name == "__base__":
            alone = run(base, example)
        else:
            theirs.set_adapter(name)
            alone = run(theirs, example)
        assert rel(mixed[i:i + 1], alone) <= TOL, i


# ----------------------------------------------------------------------------- DoRA, IA3 and AdaLoRA

OTHER_METHODS = {  # our config, peft's
    "dora": (LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True, modules_to_save=["model.norm", "lm_head"]),
             peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                             modules_to_save=["model.norm", "lm_head"])),
    "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                      modules_to_save=["model.norm", "lm_head"]),
            peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           modules_to_save=["model.norm", "lm_head"])),
    "adalora": (AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, total_step=10, alpha=8,
                              modules_to_save=["model.norm", "lm_head"]),
                peft.AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                   modules_to_save=["model.norm", "lm_head"])),
}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_other_methods_with_copies_match_peft_and_round_trip_through_its_files(method, tmp_path):
    cfg, peft_cfg = OTHER_METHODS[method]
    torch.manual_seed(0)
    base, x = tiny_decoder(), torch.randint(0, 64, (4, 10))
    ours = inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    assert set(saved_modules(ours)) == {"model.norm", "lm_head"}
    perturb(ours)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()
    expected = run(ours, x)
    assert rel(expected, run(theirs, x)) <= TOL
    for k, (got, want) in adapter_grads(ours, theirs, x, SAVED).items():
        assert rel(got, want) <= TOL, k

    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ka = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    kb = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ka.keys() == kb.keys() and PREFIX + "lm_head.weight" in ka
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert rel(run(loaded, x), expected) <= TOL
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert mine.adapter_configs["default"].modules_to_save == ["model.norm", "lm_head"]
    assert rel(run(mine, x), expected) <= TOL
