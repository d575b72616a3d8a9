"""The committed base checkpoints load in one call and carry the recipe and quality they were built with."""

import json

import pytest
import torch

import minilora as ml
from minilora.pretrain import BASES, RECIPE, checkpoint_dir, seq2seq_rows
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
    assert meta["recipe"]["steps"] == RECIPE.steps
    assert meta["wall_time_s"] > 0 and "val_perplexity" in meta["quality"]


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
