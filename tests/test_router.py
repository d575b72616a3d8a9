"""The token-level mixture's router (methods/router.py): LoRA-TLE's rule written out as the original code runs it
(a Python list, the index of the largest score, that one score times T, a softmax), the other rules from their
equations in float64, centroids, the base model's mean-pooled embeddings, and the errors."""

import math

import pytest
import torch

import minilora as ml
from minilora.methods.router import MeanPooledEmbedder, Router, RouterConfig


def cosine(x, c):
    return sum(a * b for a, b in zip(x, c)) / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in c)))


def softmax(v):
    e = [math.exp(a - max(v)) for a in v]
    return [a / sum(e) for a in e]


def original_rule(x, centroids, T):
    """LoRA-TLE's similarity(): the scores in a list, the largest one multiplied by T, a softmax."""
    scores = [cosine(x, c) for c in centroids]
    scores[scores.index(max(scores))] *= T
    return softmax(scores)


def random_router(seed=0, n=4, dim=6, **config):
    g = torch.Generator().manual_seed(seed)
    return Router(torch.randn(n, dim, generator=g, dtype=torch.float64), [f"t{i}" for i in range(n)],
                  RouterConfig(**config)), torch.randn(5, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("T", [4.0, 1.5])
def test_top_scaled_rule_is_the_original_code(T):
    router, x = random_router(temperature=T)
    x = torch.cat([x, -router.centroids.sum(0, keepdim=True)])  # a text whose every similarity is negative
    C = router.centroids.tolist()
    assert max(cosine(x[-1].tolist(), c) for c in C) < 0  # there the top score times T gets smaller, as in the original
    want = torch.tensor([original_rule(row, C, T) for row in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(router(x), want, rtol=0, atol=1e-12)


def test_similarities_and_the_temperature_rule():
    router, x = random_router(rule="temperature", temperature=0.5)
    C = router.centroids.tolist()
    sims = torch.tensor([[cosine(r, c) for c in C] for r in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(router.similarities(x), sims, rtol=0, atol=1e-12)
    want = torch.tensor([softmax([s / 0.5 for s in row]) for row in sims.tolist()], dtype=torch.float64)
    torch.testing.assert_close(router(x), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["top_scaled", "temperature"])
def test_top_k_keeps_the_k_most_similar_tasks_renormalised(rule):
    full, x = random_router(rule=rule)
    router, _ = random_router(rule=rule, top_k=2)
    w, w_all = router(x), full(x)
    sims = full.similarities(x)
    for row, row_all, s in zip(w, w_all, sims):
        kept = set(s.argsort(descending=True)[:2].tolist())
        assert {i for i, v in enumerate(row.tolist()) if v > 0} == kept
        torch.testing.assert_close(row[list(kept)], row_all[list(kept)] / row_all[list(kept)].sum(), rtol=0, atol=1e-12)
    one, _ = random_router(top_k=1)
    assert torch.equal(one(x), torch.nn.functional.one_hot(sims.argmax(-1), 4).to(x.dtype))


def test_centroids_are_the_mean_embedding_of_each_tasks_texts():
    table = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [3.0, 1.0], "d": [1.0, 1.0]}
    embed = lambda texts: torch.tensor([table[t] for t in texts])
    router = Router.from_examples(embed, {"x": ["a", "b"], "y": ["c", "d", "d"]})
    assert router.tasks == ["x", "y"]
    torch.testing.assert_close(router.centroids, torch.tensor([[0.5, 1.0], [5 / 3, 1.0]]))


class CharTokenizer:
    """Characters as token ids (what the embedder needs of a tokenizer: encode and pad_id), no data files."""
    pad_id, bos_id = 0, 1

    def encode(self, text, add_bos=False):
        return [self.bos_id] * add_bos + [3 + ord(c) % 500 for c in text]


def test_mean_pooled_embeddings_ignore_padding_and_batching():
    torch.manual_seed(0)
    model = ml.DecoderLM(ml.get_config("decoder-tiny", vocab_size=1331)).double().eval()
    tok = CharTokenizer()
    texts = ["What is seven plus eight?", "The plonk is small.", "Write the number in words: 914"]
    embed = MeanPooledEmbedder(model, tok, batch_size=2)
    batched = embed(texts)
    for i, text in enumerate(texts):  # alone, no padding: the mean of the final norm's output over its tokens
        seen = {}
        hook = model.model.norm.register_forward_hook(lambda m, a, o: seen.update(h=o))
        with torch.no_grad():
            model(torch.tensor([tok.encode(text, add_bos=True)]))
        hook.remove()
        torch.testing.assert_close(batched[i], seen["h"][0].mean(0), rtol=0, atol=1e-10)
    assert not model.model.norm._forward_hooks  # the embedder leaves no hook behind


def direct_mean(model, ids):
    """The mean of the final norm's output over one unpadded row of ids."""
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda m, a, o: seen.update(h=o))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    return seen["h"][0].mean(0)


def test_growing_text_embeddings_follow_the_kv_cache():
    """start on left-padded prompts, then extend by one and by two tokens: each row's embedding is the mean over
    its whole text so far, computed from scratch."""
    torch.manual_seed(1)
    model = ml.DecoderLM(ml.get_config("decoder-tiny", vocab_size=97)).double().eval()
    embed = MeanPooledEmbedder(model, CharTokenizer())
    rows = [[1, 5, 9, 14, 3], [1, 7, 2]]
    ids = torch.tensor([rows[0], [0, 0] + rows[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    got = [embed.start(ids, mask)]
    for new in ([[11], [12]], [[20, 21], [30, 31]]):
        got.append(embed.extend(torch.tensor(new)))
        rows = [r + n for r, n in zip(rows, new)]
        for i, row in enumerate(rows):
            torch.testing.assert_close(got[-1][i], direct_mean(model, row), rtol=0, atol=1e-10)
    assert (got[0] - got[-1]).abs().max() > 1e-3  # the embedding moves as the text grows: the check can fail
    assert embed.dim == 128 and not model.model.norm._forward_hooks
    with pytest.raises(RuntimeError, match=r"call start\(prompt_ids, mask\) before extend"):
        MeanPooledEmbedder(model, CharTokenizer()).extend(torch.tensor([[1]]))


@pytest.mark.parametrize("kwargs, message", [
    ({"rule": "linear"}, "rule must be one of"), ({"temperature": 0}, "temperature must be a positive"),
    ({"top_k": 0}, "top_k must be None or a positive"),
])
def test_router_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_router_errors_name_the_fix():
    with pytest.raises(ValueError, match="at least one task"):
        Router(torch.zeros(0, 4), [])
    with pytest.raises(ValueError, match="one row per task"):
        Router(torch.zeros(3, 4), ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        Router(torch.zeros(2, 4), ["a", "a"])
    with pytest.raises(ValueError, match="more than the 2 tasks"):
        Router(torch.zeros(2, 4), ["a", "b"], RouterConfig(top_k=3))
    with pytest.raises(ValueError, match="at least one example text"):
        Router.from_examples(lambda t: torch.zeros(len(t), 4), {"a": ["x"], "b": []})
    with pytest.raises(ValueError, match="at least one example text"):
        Router.from_examples(lambda t: torch.zeros(len(t), 4), {})
    router, _ = random_router(dim=6)
    with pytest.raises(ValueError, match=r"\(batch, 6\), the centroids' size; got \(2, 5\)"):
        router(torch.zeros(2, 5, dtype=torch.float64))


def test_top_k_of_every_task_is_the_plain_rule_and_configs_reach_the_router():
    full, x = random_router()
    every, _ = random_router(top_k=4)
    torch.testing.assert_close(every(x), full(x), rtol=0, atol=0)
    embed = lambda texts: torch.tensor([[1.0, float(len(t))] for t in texts])
    router = Router.from_examples(embed, {"a": ["x"], "b": ["xyz"]}, RouterConfig(rule="temperature", temperature=2.0))
    assert router.config.rule == "temperature" and router.config.temperature == 2.0


def test_float32_embeddings_against_float64_centroids():
    router, x = random_router()
    w = router(x.float())
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, router(x).float(), rtol=0, atol=1e-6)


def test_a_task_that_is_never_the_top_keeps_its_unscaled_score():
    """Every text closest to the first task: only that score is scaled, whatever the other tasks are."""
    centroids = torch.eye(3, dtype=torch.float64)
    router = Router(centroids, ["a", "b", "c"])
    x = torch.tensor([[1.0, 0.2, 0.1], [0.9, 0.0, 0.3]], dtype=torch.float64)
    want = torch.tensor([original_rule(r, centroids.tolist(), 4.0) for r in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(router(x), want, rtol=0, atol=1e-12)
