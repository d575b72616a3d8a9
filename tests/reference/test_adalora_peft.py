"""minilora's AdaLoRA against peft's, step by step: the same base, adapter weights, data and optimizer, over a
run that crosses tinit, several masking steps (deltaT) and the final fine-tuning phase. At every step the
loss (task loss + orth_reg_weight × regulariser; float32 as the decoder computes it), the importance scores of every entry, the triplet scores, the
budget, the masks and kept ranks, and the outputs are compared; then the files, both ways.

Everything runs in float64, where both libraries compute the same operations and agree to rounding (1e-10
relative, far below anything a wrong formula changes); masks are compared exactly. A float32 run of the same
length checks the budget and kept ranks, which do not depend on the last bits unless two scores tie."""

import copy
import json
import warnings

import pytest
import torch

import peft

import minilora as ml
from minilora.inject import adapter_layers
from minilora.methods.adalora import AdaLoraLayer

from adapters import max_rel_err, tiny_decoder, tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)
TOL64 = 1e-10
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=14, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5, alpha=8)


def close(got, want, tol=TOL64):
    """Equal up to float64 rounding (relative to the tensor's scale); all-zero tensors must be exactly zero."""
    return torch.equal(got, want) or max_rel_err(got, want) <= tol


def peft_config(cfg: ml.AdaLoraConfig):
    return peft.AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal,
                              deltaT=cfg.deltaT, total_step=cfg.total_step, beta1=cfg.beta1, beta2=cfg.beta2,
                              orth_reg_weight=cfg.orth_reg_weight, lora_alpha=cfg.alpha,
                              target_modules=cfg.target_modules)


def pair(make=tiny_decoder, dtype=torch.float64, **kw):
    """minilora and peft AdaLoRA on one base; λ drawn non-zero so every entry has a gradient from step 1."""
    torch.manual_seed(0)
    base = make().to(dtype)
    cfg = ml.AdaLoraConfig(**{**SCHEDULE, "target_modules": TARGETS, **kw})
    ours = ml.inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    for name, p in theirs.named_parameters():
        if ".ranknum." in name:  # peft 0.21 makes r_0 trainable on non-fp32 bases (adalora.py); it is a constant
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(ours).values():
            layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=g) * 0.1)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for k, p in ours.named_parameters():
            if ".lora_" in k:
                theirs_params["base_model.model." + k].copy_(p)
    return base, ours, theirs, cfg


def peft_triplet_scores(alloc, layer_names):
    """Eq. 11 written out from peft's per-entry scores: s(λ_i) + mean_k s(P_ki) + mean_j s(Q_ij)."""
    s = {n: alloc.exp_avg_ipt[n] * alloc.exp_avg_unc[n] for n in alloc.exp_avg_ipt}
    out = {}
    for lname in layer_names:
        A, B, E = (s[f"{lname}.{a}.default"] for a in ("lora_A", "lora_B", "lora_E"))
        out[lname] = torch.stack([E[i, 0] + A[i].mean() + B[:, i].mean() for i in range(E.shape[0])])
    return out


def run_both(ours, theirs, cfg, check):
    """Train both for total_step steps with AdamW on the same batches; `check(step, ...)` after each step."""
    alloc = ml.RankAllocator(ours)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.02)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.02)
    g = torch.Generator().manual_seed(2)
    for step in range(1, cfg.total_step + 1):
        x = torch.randint(0, 64, (4, 12), generator=g)
        out_ours = ours(input_ids=x, labels=x)
        loss_ours = out_ours.loss + alloc.penalty(ours)
        # AdaLoraModel.forward adds the regulariser to .loss (PeftModel's own forward, without a task_type, skips it)
        out_theirs = theirs.base_model(input_ids=x, labels=x)
        check(step, "loss", loss_ours, out_theirs.loss)
        check(step, "logits", out_ours.logits, out_theirs.logits)
        loss_ours.backward()
        out_theirs.loss.backward()
        opt_ours.step()
        opt_theirs.step()
        budget = alloc.update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        check(step, "allocate", alloc, theirs, budget)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
    return alloc


def test_equal_to_peft_at_every_step_in_float64():
    base, ours, theirs, cfg = pair()
    layer_names = sorted(n for n, m in ours.named_modules() if isinstance(m, AdaLoraLayer))
    final_start = cfg.total_step - cfg.tfinal
    seen = {"masked": 0, "scores": 0}

    def check(step, what, *args):
        if what in ("loss", "logits"):
            got, want = args  # the decoder's loss is float32, and peft adds the regulariser in float32
            tol = TOL64 if what == "logits" else 2 ** -23
            assert max_rel_err(got, want) <= tol, (step, what, max_rel_err(got, want))
            return
        alloc, theirs_, budget = args
        peft_alloc = theirs_.base_model.rankallocator
        want_budget = peft_alloc.budget_schedule(step)[0] if step <= final_start else peft_alloc.target_bgt
        assert budget == want_budget, (step, budget, want_budget)
        if step < final_start:  # scores exist until the final allocation resets them (in both)
            for key, want in peft_alloc.exp_avg_ipt.items():
                ours_key = key.removesuffix(".default")
                assert close(alloc.exp_avg[ours_key], want), (step, key)
                assert close(alloc.uncertainty[ours_key], peft_alloc.exp_avg_unc[key]), (step, key)
            want_triplets = peft_triplet_scores(peft_alloc, layer_names)
            for lname, got in alloc.triplet_scores().items():
                assert close(got, want_triplets[lname]), (step, lname)
            seen["scores"] += 1
        else:
            assert not alloc.exp_avg and not peft_alloc.exp_avg_ipt
        peft_params = dict(theirs_.named_parameters())
        for lname in layer_names:  # the masks: which λ are zero, and the saved pattern
            got = ours.get_submodule(lname).lora_E["default"]
            want = peft_params[f"base_model.model.{lname}.lora_E.default"]
            assert torch.equal(got == 0, want == 0), (step, lname)
            assert close(got, want), (step, lname)
        pattern = theirs_.peft_config["default"].rank_pattern
        if pattern:
            want_pattern = {k.removesuffix(".default"): v for k, v in pattern.items()}
            assert cfg.rank_pattern == want_pattern, step
            assert alloc.kept_ranks(ours) == {k.removesuffix(".lora_E"): sum(v) for k, v in want_pattern.items()}
            seen["masked"] += 1

    run_both(ours, theirs, cfg, check)
    # the run really crossed the phases: scores before the end, masks from the first deltaT step on
    assert seen["scores"] == final_start - 1 and seen["masked"] >= cfg.total_step - cfg.tinit - 1
    assert sum(ml.RankAllocator(ours).kept_ranks(ours).values()) <= cfg.target_r * len(layer_names)
    kept = {k: sum(v) for k, v in cfg.rank_pattern.items()}
    assert len(set(kept.values())) > 1  # the allocation is uneven, so the comparison was not trivial


def test_budget_and_ranks_follow_peft_in_float32():
    base, ours, theirs, cfg = pair(dtype=torch.float32)
    final_start = cfg.total_step - cfg.tfinal

    def check(step, what, *args):
        if what == "allocate":
            alloc, theirs_, budget = args
            peft_alloc = theirs_.base_model.rankallocator
            assert budget == (peft_alloc.budget_schedule(step)[0] if step <= final_start else peft_alloc.target_bgt)
            pattern = theirs_.peft_config["default"].rank_pattern
            if pattern:
                assert cfg.rank_pattern == {k.removesuffix(".default"): v for k, v in pattern.items()}, step

    run_both(ours, theirs, cfg, check)


def trained_pair(make=tiny_decoder):
    base, ours, theirs, cfg = pair(make)
    run_both(ours, theirs, cfg, lambda *a: None)
    ours.eval(), theirs.eval()
    return base, ours, theirs, cfg


@pytest.mark.parametrize("make", [tiny_decoder, tiny_llama])
def test_files_round_trip_with_peft_truncated_to_the_kept_ranks(make, tmp_path):
    from safetensors.torch import load_file

    base, ours, theirs, cfg = trained_pair(make)
    x = torch.randint(0, 64, (3, 9))
    expected = ours(input_ids=x).logits
    ml.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ka = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    kb = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ka) == set(kb) and all(ka[k].shape == kb[k].shape for k in ka)
    assert all(close(ka[k], kb[k]) for k in ka)
    kept = {k: sum(v) for k, v in cfg.rank_pattern.items()}
    for k, r in kept.items():  # truncated: only the kept triplets are in the file
        assert ka["base_model.model." + k].shape[0] == r
    da = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    db = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert da["rank_pattern"] == db["rank_pattern"]
    assert {k: v for k, v in da.items() if k not in ("auto_mapping", "target_modules")} == \
           {k: v for k, v in db.items() if k not in ("auto_mapping", "target_modules")}

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()  # peft loads ours
    assert max_rel_err(loaded(input_ids=x).logits, expected) <= TOL64
    mine = ml.load_adapter(copy.deepcopy(base), tmp_path / "peft")  # we load peft's
    assert max_rel_err(mine(input_ids=x).logits, expected) <= TOL64
    assert mine.adapter_configs["default"].rank_pattern == cfg.rank_pattern
    for k, r in kept.items():
        assert mine.get_submodule(k.removesuffix(".lora_E")).lora_E["default"].shape == (r, 1)


def test_pruned_model_saves_what_peft_saves(tmp_path):
    from safetensors.torch import load_file

    base, ours, theirs, cfg = trained_pair()
    x = torch.randint(0, 64, (3, 9))
    expected = ours(input_ids=x).logits
    ml.prune(ours)
    assert max_rel_err(ours(input_ids=x).logits, expected) <= TOL64
    ml.save_adapter(ours, tmp_path / "pruned")
    theirs.save_pretrained(tmp_path / "peft")
    ka, kb = load_file(tmp_path / "pruned" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ka.items()} == {k: v.shape for k, v in kb.items()}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pruned").eval()
    assert max_rel_err(loaded(input_ids=x).logits, expected) <= TOL64


def test_merge_matches_peft():
    base, ours, theirs, cfg = trained_pair()
    x = torch.randint(0, 64, (3, 9))
    ml.merge(ours)
    theirs.merge_adapter()
    for k, p in ours.named_parameters():
        if k.endswith("base_layer.weight"):
            want = dict(theirs.named_parameters())["base_model.model." + k]
            assert max_rel_err(p, want) <= 1e-13, k
    theirs.unmerge_adapter()
    ml.unmerge(ours)
    base_params = dict(base.named_parameters())
    for k, p in ours.named_parameters():
        if k.endswith("base_layer.weight"):
            assert max_rel_err(p, base_params[k.replace(".base_layer", "")]) <= 1e-13, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_outputs_equal_peft(dtype):
    """fp32 adapters over a half-precision base in both libraries: the fp32 update added to the base output and
    rounded once, so outputs agree bit for bit."""
    torch.manual_seed(0)
    base = tiny_decoder().to(dtype)
    cfg = ml.AdaLoraConfig(**{**SCHEDULE, "target_modules": TARGETS})
    ours = ml.inject(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    g = torch.Generator().manual_seed(1)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for layer in adapter_layers(ours).values():
            layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=g) * 0.1)
        for k, p in ours.named_parameters():
            if ".lora_" in k:
                assert p.dtype == theirs_params["base_model.model." + k].dtype == torch.float32
                theirs_params["base_model.model." + k].copy_(p)
    x = torch.randint(0, 64, (3, 9))
    assert torch.equal(ours(input_ids=x).logits, theirs(input_ids=x).logits)
