"""The router's small sentence encoder (minilora/sentence_encoder.py): the contrastive loss written out pair by pair
in float64, the views are spans of their document, the pooling is MeanPooledEmbedder's, a short build writes files
that load back equal and deterministic, the missing-file error, and the committed encoder's config."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import save_model

import minilora as ml
from minilora import sentence_encoder as se
from minilora.methods.router import MeanPooledEmbedder
from minilora.train import collate


def info_nce_by_hand(z1, z2, tau):
    """Each direction, each document i: -log( exp(cos(i, i) / tau) / sum_j exp(cos(i, j) / tau) ), averaged."""
    z1, z2 = z1.tolist(), z2.tolist()
    cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    n, total = len(z1), 0.0
    for queries, keys in ((z1, z2), (z2, z1)):
        for i in range(n):
            logits = [cos(queries[i], keys[j]) / tau for j in range(n)]
            total += -logits[i] + math.log(sum(math.exp(s) for s in logits))
    return total / (2 * n)


@pytest.mark.parametrize("tau", [se.TAU, 0.5])
def test_info_nce_is_the_symmetric_cross_entropy_over_pairs(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert se.info_nce(z1, z2, tau).item() == pytest.approx(info_nce_by_hand(z1, z2, tau), rel=1e-12)


def test_info_nce_is_lowest_when_each_view_points_at_its_twin():
    z = torch.eye(4, dtype=torch.float64)
    assert se.info_nce(z, z) < 1e-8 < se.info_nce(z, z.roll(1, 0))


def test_views_are_bos_then_contiguous_spans_of_the_document():
    rng, doc = random.Random(0), list(range(100, 140))
    for _ in range(200):
        for view in se.crop_views(doc, rng, bos_id=1):
            assert view[0] == 1 and se.MIN_SPAN <= len(view) - 1 <= se.MAX_SPAN
            start = doc.index(view[1])
            assert view[1:] == doc[start:start + len(view) - 1]
    short = list(range(5))  # shorter than MIN_SPAN: the whole document
    assert se.crop_views(short, rng, bos_id=1) == ([1] + short, [1] + short)


def test_mean_pool_is_the_embedders_pooling_and_has_gradients():
    tok = ml.load_tokenizer()
    torch.manual_seed(0)
    lm = ml.DecoderLM(se.encoder_config(tok.vocab_size)).eval()
    texts = ["Finn wrote 93 in words: ninety-three.", "c = 10; print(c + 5)", "Tom met Max at the garden."]
    rows = [{"input_ids": tok.encode(t, add_bos=True)} for t in texts]
    batch = collate(rows, tok.pad_id)
    pooled = se.mean_pool(lm, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(pooled, MeanPooledEmbedder(lm, tok)(texts), rtol=0, atol=1e-6)
    pooled.sum().backward()
    assert lm.model.embed_tokens.weight.grad.abs().sum() > 0


def test_a_short_build_writes_files_that_load_back_equal(tmp_path, monkeypatch):
    trained = {}

    def save_and_remember(model, path):  # the weights build() saves, as they are in memory
        trained.update({k: v.clone() for k, v in model.state_dict().items()})
        save_model(model, path)

    monkeypatch.setattr(se, "save_model", save_and_remember)
    meta = se.build(steps=3, progress=False, directory=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentence-small.json", "sentence-small.safetensors"]
    stored = json.loads((tmp_path / "sentence-small.json").read_text())
    assert stored == meta and stored["recipe"]["steps"] == 3 and stored["loss_curve"]["steps"] == [3]
    loaded = se.load_sentence_encoder(tmp_path)
    assert not loaded.training and loaded.config == se.encoder_config(ml.load_tokenizer().vocab_size)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied after loading
    state = loaded.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)


def test_missing_encoder_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m minilora.sentence_encoder"):
        se.load_sentence_encoder(tmp_path)


def test_committed_encoder_loads_with_its_recipe():
    lm = se.load_sentence_encoder()
    meta = json.loads((se.encoder_dir() / "sentence-small.json").read_text())
    assert ml.ModelConfig.from_dict(meta["config"]) == lm.config == se.encoder_config(ml.load_tokenizer().vocab_size)
    assert meta["recipe"]["steps"] == se.RECIPE.steps and meta["recipe"]["tau"] == se.TAU
    assert meta["parameters"] == sum(p.numel() for p in lm.parameters())
    assert lm.model.embed_tokens.weight.dtype == torch.float32 and (se.encoder_dir() / "sentence-small.safetensors").stat().st_size < 1e6
    q = meta["quality"]
    assert q["held_out_retrieval_top1"] > q["held_out_retrieval_top1_untrained"] + 0.1  # training found the twins
