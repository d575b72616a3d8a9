"""The committed base checkpoints load in one call and carry the recipe and quality they were built with."""

import json

import pytest
import torch

import minilora as ml
from minilora.pretrain import BASES, RECIPES, STORED_DTYPE, checkpoint_dir, seq2seq_rows
from minilora.train import evaluate, lm_chunks


def test_unknown_base_lists_the_available_ones():
    with pytest.raises(ValueError, match="did you mean 'decoder-tiny'"):
        ml.load_base("decoder-tiyn")


@pytest.mark.parametrize("name", list(BASES))
def test_committed_base_loads_and_records_how_it_was_made(name):
    model = ml.load_base(name)
    meta = json.loads((checkpoint_dir() / f"{name}.json").read_text())
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]
    assert meta["recipe"]["steps"] == RECIPES[name].steps and meta["recipe"]["lr"] == RECIPES[name].lr
    assert meta["wall_time_s"] > 0 and "val_perplexity" in meta["quality"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # whatever the file stores


def test_decoder_base_is_stored_in_bfloat16_and_loads_as_its_float32_upcast():
    from safetensors import safe_open

    path = checkpoint_dir() / "decoder-base.safetensors"
    assert STORED_DTYPE["decoder-base"] == torch.bfloat16 and path.stat().st_size <= 25e6
    model = ml.load_base("decoder-base")
    params = model.state_dict()  # with the tied head, which named_parameters lists once
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) <= set(params)
        for key in f.keys():
            stored = f.get_tensor(key)
            assert stored.dtype == torch.bfloat16
            assert torch.equal(params[key], stored.float())


def test_decoder_base_starts_near_zero_on_the_four_decoder_tasks():
    """Issue 13's ceiling on zero-shot exact match, read from the json its pretraining run wrote."""
    q = json.loads((checkpoint_dir() / "decoder-base.json").read_text())["quality"]
    for task in ml.DECODER_TASKS:
        assert q[f"exact_match/{task}"] <= (0.35 if task == "facts" else 0.1), task


def test_decoder_base_has_learned_the_corpus():
    """Held-out corpus perplexity is far below the uniform guess (vocab size), as recorded in its json."""
    tok = ml.load_tokenizer()
    model = ml.load_base("decoder-tiny")
    held_out = ml.load_corpus()[-40:]
    ppl = evaluate(model, lm_chunks(held_out, tok, 128), pad_id=tok.pad_id)["perplexity"]
    assert ppl < 0.01 * tok.vocab_size


def test_seq2seq_rows_mix_denoising_and_continuation():
    tok = ml.load_tokenizer()
    doc = "The plonk is huge and the plonk is red and it lives on the mountain ."
    rows = seq2seq_rows([doc] * 40, tok, max_len=64, seed=0)
    whole = tok.encode(doc, add_eos=True)
    denoise = [r for r in rows if r["labels"] == whole]
    cont = [r for r in rows if r["labels"] != whole]
    assert 10 < len(denoise) < 30 and len(cont) == 40 - len(denoise)
    # the source keeps the document's words in order, minus dropped ones (each p=0.15, so now and then none)
    words = doc.split(" ")
    for r in denoise:
        kept = iter(words)
        source = tok.decode(r["input_ids"]).split(" ")
        assert all(w in kept for w in source)
    assert sum(len(tok.decode(r["input_ids"]).split(" ")) < len(words) for r in denoise) > len(denoise) // 2
    for r in cont:  # source + target spell the document exactly
        assert tok.decode(r["input_ids"]) + tok.decode(r["labels"]) == doc
    assert rows == seq2seq_rows([doc] * 40, tok, max_len=64, seed=0)


def test_base_generation_is_deterministic():
    tok = ml.load_tokenizer()
    model = ml.load_base("decoder-tiny")
    ids = torch.tensor([tok.encode("The number 342 is written", add_bos=True)])
    assert torch.equal(model.generate(ids, max_new_tokens=6), model.generate(ids, max_new_tokens=6))


def test_readme_section_is_rewritten_in_place(tmp_path, monkeypatch):
    """Rebuilding a base rewrites its section of data/README.md and keeps every section after it."""
    import shutil

    from minilora.pretrain import update_data_readme

    src = ml.tasks.data_dir()
    shutil.copy(src / "README.md", tmp_path / "README.md")
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints", ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path))
    before = (tmp_path / "README.md").read_text()
    update_data_readme()
    assert (tmp_path / "README.md").read_text() == before  # the committed README holds the current section
    assert before.index("## Base checkpoints") < before.index("## Sweep results")
    start, end = before.index("### decoder-tiny"), before.index("### seq2seq-tiny")
    (tmp_path / "README.md").write_text(before[:start] + "stale\n\n" + before[end:])
    update_data_readme()
    assert (tmp_path / "README.md").read_text() == before
