"""A small sentence encoder for the router of the token-level mixture, trained contrastively on the corpus.

    python -m minilora.sentence_encoder              # build data/encoders/sentence-small.{safetensors,json}
    python -m minilora.sentence_encoder --steps 50   # a quick run (same recipe, fewer steps)

The router (methods/router.py) needs an embedding of the text so far. `MeanPooledEmbedder` gives one for any causal
`DecoderLM`: the mean of its final hidden states (after the last norm) over the real tokens, kept up to date token
by token with a KV cache. Option (a) is decoder-base itself; option (b), this file, is a decoder of its own, two
layers of width 64 (159,232 parameters, 85,184 of them the embedding; 0.64 MB in float32), trained for this
and nothing else. It stays causal so that the embedding of a growing text still costs one cached step per token.

Training is unsupervised and sees only data/corpus/pretrain.txt (plain prose, never the instruction format):
contrastive learning from cropped views (Izacard et al. 2022, "Unsupervised dense information retrieval with
contrastive learning", section 3.1, independent cropping; the loss of SimCSE, Gao et al. 2021, eq. 1, in both
directions as CLIP). For a batch of N documents:

    doc_i ──► two random contiguous token spans, <bos> prepended ──► encoder ──► mean-pool ──► z_i, z'_i  (d,)
    s_ij = cos(z_i, z'_j) / tau                                                      (N, N), tau = 0.05
    L    = 1/2 [ CE(s, i -> i) + CE(s^T, i -> i) ]           the other N - 1 documents are the negatives

Two spans of one document share its names, numbers and kind of text (a number written out, a word problem, a
program, a passage, ...), so the encoder learns what makes a text like another. The build records the recipe, wall
time, loss curve and, on the 440 held-out corpus documents, how often a view's nearest neighbour among all the
documents' other views is its twin: 0.39 untrained, 0.67 after the 600 steps (112 s on one thread).

Measured as the router's embedder (centroids from 200 training texts per decoder task, the 200 test prompts of each):
it routes every prompt to its own task, as decoder-base does, 6-7x faster (0.6-0.7 s against 4.8-5.1 s for the 800
prompts; 2.2 ms against 10.7 ms per cached token for a batch of 32). So does the untrained encoder: each task's
prompts open with a preamble line of their own, and that alone decides.

Files: data/encoders/sentence-small.safetensors (float32 weights) + sentence-small.json (ModelConfig as in the base
checkpoints' json, recipe, wall time, loss curve, quality). `load_sentence_encoder()` loads them; no pickle runs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from minilora.models import DecoderLM, ModelConfig, get_config
from minilora.pretrain import _split_corpus
from minilora.tasks import data_dir, load_corpus
from minilora.tokenizer import load_tokenizer
from minilora.train import TrainConfig, collate, lr_at

NAME = "sentence-small"
ARCHITECTURE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)  # on decoder-tiny
RECIPE = TrainConfig(steps=600, batch_size=64, lr=3e-3, warmup_steps=30, weight_decay=0.01, seed=0, log_every=10)
TAU = 0.05  # temperature of the cosine similarities
MIN_SPAN, MAX_SPAN = 8, 64  # tokens per view (before <bos>); documents are 15-173 tokens, 70 at the median
EVAL_SEED = 1234  # the held-out views are the same for every build


def encoder_dir() -> Path:
    return data_dir() / "encoders"


def encoder_config(vocab_size: int) -> ModelConfig:
    return get_config("decoder-tiny", vocab_size=vocab_size, **ARCHITECTURE)


# ----------------------------------------------------------------------------- the pieces of the objective


def crop_views(ids: list[int], rng: random.Random, bos_id: int, min_span: int = MIN_SPAN,
               max_span: int = MAX_SPAN) -> tuple[list[int], list[int]]:
    """Two independent random contiguous spans of a document's tokens, each min_span..max_span tokens long (the
    whole document when it is shorter than min_span), each with <bos> prepended as every embedded text has."""
    views = []
    for _ in range(2):
        n = rng.randint(min(min_span, len(ids)), min(max_span, len(ids)))
        start = rng.randint(0, len(ids) - n)
        views.append([bos_id] + ids[start:start + n])
    return views[0], views[1]


def mean_pool(lm: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids with a 0/1 mask -> (B, d): the mean of the final-norm hidden states over the real tokens, the
    pooling of MeanPooledEmbedder (methods/router.py), with gradients."""
    seen = {}
    hook = lm.model.norm.register_forward_hook(lambda m, a, o: seen.update(h=o))
    try:
        lm(input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    m = attention_mask[:, :, None].to(seen["h"].dtype)  # (B, T, 1)
    return (seen["h"] * m).sum(1) / m.sum(1)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives: z1[i] and z2[i] (N, d) are the two views of document i."""
    s = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / tau  # (N, N): s_ij = cos(z1_i, z2_j) / tau
    target = torch.arange(len(s), device=s.device)
    return (F.cross_entropy(s, target) + F.cross_entropy(s.T, target)) / 2


def _pair_batch(docs: list[list[int]], rng: random.Random, bos_id: int, pad_id: int):
    """Both views of every document -> (2N, T) ids and mask: rows 0..N-1 the first views, N..2N-1 the second."""
    first, second = zip(*(crop_views(d, rng, bos_id) for d in docs))
    batch = collate([{"input_ids": v} for v in first + second], pad_id)  # right padding, as the embedder pads
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def retrieval_accuracy(lm: DecoderLM, docs: list[list[int]], bos_id: int, pad_id: int, batch_size: int = 128) -> float:
    """Share of documents whose first view's nearest second view (cosine, among all the documents') is its own."""
    rng = random.Random(EVAL_SEED)
    z1, z2 = [], []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        z = mean_pool(lm, *_pair_batch(chunk, rng, bos_id, pad_id))
        z1.append(z[:len(chunk)]), z2.append(z[len(chunk):])
    s = F.normalize(torch.cat(z1), dim=-1) @ F.normalize(torch.cat(z2), dim=-1).T  # (n, n)
    return (s.argmax(-1) == torch.arange(len(s))).float().mean().item()


# ----------------------------------------------------------------------------- build and load


def build(steps: int | None = None, progress: bool = True, directory: str | Path | None = None) -> dict:
    """Train the encoder from scratch on the corpus and write its two files; returns the metadata written.
    ``steps`` shortens the run (warmup at most a tenth of it); ``directory`` defaults to data/encoders/."""
    tokenizer = load_tokenizer()
    cfg = RECIPE if steps is None else replace(RECIPE, steps=steps, warmup_steps=min(RECIPE.warmup_steps, steps // 10))
    train_docs, val_docs = _split_corpus(load_corpus())
    train_ids = tokenizer.encode_batch(train_docs)
    val_ids = tokenizer.encode_batch(val_docs)
    bos, pad = tokenizer.bos_id, tokenizer.pad_id

    torch.manual_seed(cfg.seed)  # the initial weights
    config = encoder_config(tokenizer.vocab_size)
    lm = DecoderLM(config)
    rng = random.Random(cfg.seed)  # the batches and the crops
    untrained = retrieval_accuracy(lm.eval(), val_ids, bos, pad)

    # AdamW as train.py sets it up: weight decay on matrices only; warmup, then cosine decay
    params = list(lm.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    curve, running = {"steps": [], "loss": []}, []
    lm.train()
    started = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="contrastive")
    for step in bar:
        ids, mask = _pair_batch(rng.sample(train_ids, cfg.batch_size), rng, bos, pad)
        z = mean_pool(lm, ids, mask)  # (2N, d)
        loss = info_nce(z[:cfg.batch_size], z[cfg.batch_size:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve["steps"].append(step + 1)
            curve["loss"].append(round(sum(running) / len(running), 4))
            bar.set_postfix(loss=f"{curve['loss'][-1]:.3f}")
            running = []
    wall = time.perf_counter() - started
    lm.eval()

    meta = {
        "name": NAME,
        "config": config.to_dict(),
        "recipe": {
            "objective": "symmetric InfoNCE over cosine similarity / tau, in-batch negatives; the two views of a "
                         "document are independent random contiguous token spans of it, <bos> prepended; mean of "
                         "the final-norm hidden states over the real tokens",
            "corpus": "data/corpus/pretrain.txt",
            "train_documents": len(train_docs),
            "held_out_documents": len(val_docs),
            "tau": TAU,
            "span_tokens": [MIN_SPAN, MAX_SPAN],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
               if k not in ("progress", "log_every", "gradient_checkpointing")},
            "torch_threads": torch.get_num_threads(),
            "stored_dtype": "float32",
        },
        "wall_time_s": round(wall, 1),
        "final_train_loss": curve["loss"][-1],
        "loss_curve": curve,
        "parameters": sum(p.numel() for p in lm.parameters()),
        "quality": {"held_out_retrieval_top1": round(retrieval_accuracy(lm, val_ids, bos, pad), 4),
                    "held_out_retrieval_top1_untrained": round(untrained, 4)},
    }
    out = Path(directory) if directory is not None else encoder_dir()
    out.mkdir(parents=True, exist_ok=True)
    save_model(lm, out / f"{NAME}.safetensors")  # tied embeddings are stored once
    (out / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_sentence_encoder(directory: str | Path | None = None) -> DecoderLM:
    """The committed sentence encoder (float32, eval mode), to wrap as `MeanPooledEmbedder(encoder, tokenizer)`."""
    root = Path(directory) if directory is not None else encoder_dir()
    weights, meta = root / f"{NAME}.safetensors", root / f"{NAME}.json"
    if not weights.exists() or not meta.exists():
        raise FileNotFoundError(f"{weights if not weights.exists() else meta} is missing; build it with "
                                f"`python -m minilora.sentence_encoder`")
    lm = DecoderLM(ModelConfig.from_dict(json.loads(meta.read_text())["config"]))
    load_model(lm, weights)  # safetensors: no pickle
    return lm.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help=f"override the number of training steps (default {RECIPE.steps})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the committed encoder was built with 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = build(steps=args.steps, progress=not args.quiet)
    print(json.dumps({k: meta[k] for k in ("name", "parameters", "wall_time_s", "final_train_loss", "quality")}, indent=2))


if __name__ == "__main__":
    main()
