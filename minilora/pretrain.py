"""Build the small pretrained base checkpoints that every lesson starts from.

    python -m minilora.pretrain                        # every base, then the quality report
    python -m minilora.pretrain --only decoder-base    # one of them (resumes from its checkpoint if interrupted)

Recipe. Both bases learn from data/corpus/pretrain.txt only: plain prose about the task world (facts,
quantities, number words, dates, small programs, passages, toy-language sentences). They never see the
instruction format, so a base "knows the language" of the downstream tasks but not how to answer them;
that gap is what fine-tuning closes, and the lessons measure how well each method closes it.

- decoder-tiny: next-token prediction on the corpus packed into 128-token blocks.
- decoder-base: the same objective, a few million parameters, for longer, on the corpus plus the reasoning the
  four decoder tasks need written out in prose (``tasks.build_base_corpus``: worked totals, sums, program traces,
  passages with their questions answered, lettered quizzes). Stored in bfloat16 (half the file), loaded in float32.
- seq2seq-tiny: half the documents are denoised (the encoder reads the document with ~15% of its words
  dropped, the decoder writes it back) and half are continued (the encoder reads the document up to a
  random word, the decoder writes the rest). Denoising teaches it to read its input exactly; continuing
  teaches it to produce text from what it read, e.g. "The number 342 is written" -> "three hundred forty-two".

Each checkpoint is ``data/checkpoints/<name>.safetensors`` (weights) + ``<name>.json`` (model config,
recipe and measured quality). ``load_base(name)`` loads one in a single call; loading never unpickles.
While a base trains, ``data/checkpoints/<name>.resume.pt`` (not committed) holds its state every 500 steps; a
re-run of the same command continues from there, and the file is deleted once the checkpoint is written.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from minilora.models import DecoderLM, ModelConfig, Seq2SeqLM, get_config
from minilora.tasks import SEQ2SEQ_TASKS, TASKS, build_base_corpus, data_dir, load_corpus, load_task
from minilora.tokenizer import load_tokenizer
from minilora.train import TrainConfig, evaluate, exact_match, lm_chunks, train

BASES = {"decoder-tiny": "decoder-tiny", "seq2seq-tiny": "seq2seq-tiny", "decoder-base": "decoder-base"}  # name -> preset
RECIPE = TrainConfig(steps=2000, batch_size=16, lr=3e-3, warmup_steps=100, weight_decay=0.01, seed=0)  # the tiny bases
RECIPES = {"decoder-tiny": RECIPE, "seq2seq-tiny": RECIPE,
           "decoder-base": TrainConfig(steps=5000, batch_size=16, lr=2e-3, warmup_steps=200, weight_decay=0.01, seed=0)}
CORPORA = {"decoder-base": "data/corpus/pretrain.txt + tasks.build_base_corpus() reasoning documents"}
STORED_DTYPE = {"decoder-base": torch.bfloat16}  # file dtype where it is not float32; loaded as float32
CHECKPOINT_EVERY = 500
BLOCK_SIZE = 128  # tokens per pretraining row
HELD_OUT_FRACTION = 0.05  # last 5% of corpus documents measure validation perplexity
EVAL_EXAMPLES = 100  # test examples per task for the zero-shot exact-match check


def checkpoint_dir() -> Path:
    return data_dir() / "checkpoints"


def _check_name(name: str) -> None:
    if name not in BASES:
        close = difflib.get_close_matches(name, list(BASES), n=3, cutoff=0.3)
        raise ValueError(f"unknown base {name!r}; available: {sorted(BASES)}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def load_base(name: str = "decoder-tiny"):
    """Load a committed base checkpoint in float32 (eval mode). ``name``: one of BASES ('decoder-tiny',
    'seq2seq-tiny', 'decoder-base')."""
    _check_name(name)
    weights, meta = checkpoint_dir() / f"{name}.safetensors", checkpoint_dir() / f"{name}.json"
    if not weights.exists() or not meta.exists():
        raise FileNotFoundError(f"{weights} is missing; build it with `python -m minilora.pretrain --only {name}`")
    config = ModelConfig.from_dict(json.loads(meta.read_text())["config"])
    model = (Seq2SeqLM if config.n_encoder_layers else DecoderLM)(config)
    if name in STORED_DTYPE:
        model.to(STORED_DTYPE[name])
    load_model(model, weights)  # safetensors: no pickle; tied embeddings are stored once
    return model.float().eval()


def _split_corpus(docs: list[str]) -> tuple[list[str], list[str]]:
    n_val = max(1, int(len(docs) * HELD_OUT_FRACTION))
    return docs[:-n_val], docs[-n_val:]


def seq2seq_rows(docs: list[str], tokenizer, max_len: int, seed: int) -> list[dict]:
    """Two objectives, half the documents each, so the encoder-decoder learns to read its input exactly:

    denoise:   encoder reads the whole document with ~15% of its words dropped, decoder writes it back;
    continue:  encoder reads the document up to a random word, decoder writes the rest.
    """
    rng = random.Random(seed)
    rows = []
    for doc in docs:
        words = doc.split(" ")
        if rng.random() < 0.5 or len(words) < 2:
            source_words, target = [w for w in words if rng.random() > 0.15] or words[:1], doc
        else:
            cut = rng.randint(1, len(words) - 1)
            source_words, target = words[:cut], " " + " ".join(words[cut:])
        source = tokenizer.encode(" ".join(source_words), add_eos=True)[:max_len]
        rows.append({"input_ids": source, "labels": tokenizer.encode(target, add_eos=True)[:max_len]})
    return rows


def quality(model, tokenizer, val_rows: list[dict], tasks: list[str]) -> dict:
    """Validation perplexity on held-out corpus text and zero-shot exact match per task."""
    report = {"val_perplexity": round(evaluate(model, val_rows, pad_id=tokenizer.pad_id)["perplexity"], 3)}
    for task in tasks:
        examples = list(load_task(task, "test"))[:EVAL_EXAMPLES]
        report[f"exact_match/{task}"] = round(exact_match(model, tokenizer, examples), 3)
    return report


def build(name: str, steps: int | None = None, progress: bool = True) -> dict:
    """Pretrain one base from scratch and write its checkpoint; returns the metadata written."""
    _check_name(name)
    tokenizer = load_tokenizer()
    config = get_config(BASES[name], vocab_size=tokenizer.vocab_size)
    train_docs, val_docs = _split_corpus(build_base_corpus() if name in CORPORA else load_corpus())
    cfg = replace(RECIPES[name], progress=progress)
    if steps is not None:
        # quick runs keep the schedule's shape: warmup at most a tenth of the steps
        cfg = replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 10))

    torch.manual_seed(cfg.seed)
    if config.n_encoder_layers:
        model = Seq2SeqLM(config)
        train_rows = seq2seq_rows(train_docs, tokenizer, BLOCK_SIZE, cfg.seed)
        val_rows = seq2seq_rows(val_docs, tokenizer, BLOCK_SIZE, cfg.seed + 1)
        tasks = SEQ2SEQ_TASKS
    else:
        model = DecoderLM(config)
        train_rows = lm_chunks(train_docs, tokenizer, BLOCK_SIZE)
        val_rows = lm_chunks(val_docs, tokenizer, BLOCK_SIZE)
        tasks = list(TASKS)

    resume = checkpoint_dir() / f"{name}.resume.pt"
    history = train(model, train_rows, cfg, pad_id=tokenizer.pad_id, checkpoint=resume, checkpoint_every=CHECKPOINT_EVERY)
    wall = history.wall_time_s

    meta = {
        "name": name,
        "config": config.to_dict(),
        "recipe": {
            "objective": "seq2seq: half denoising (document with dropped words -> document), half continuation (prefix -> rest)" if config.n_encoder_layers else "next-token prediction",
            "corpus": CORPORA.get(name, "data/corpus/pretrain.txt"),
            "train_documents": len(train_docs),
            "train_rows": len(train_rows),
            "block_size": BLOCK_SIZE,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
            "torch_threads": torch.get_num_threads(),
            "stored_dtype": str(STORED_DTYPE.get(name, torch.float32)).replace("torch.", ""),
        },
        "wall_time_s": round(wall, 1),
        "final_train_loss": round(history.final_loss, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "quality": quality(model, tokenizer, val_rows, tasks),
    }
    out = checkpoint_dir()
    out.mkdir(parents=True, exist_ok=True)
    save_model(model.to(STORED_DTYPE.get(name, torch.float32)), out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    resume.unlink(missing_ok=True)
    return meta


def report_markdown() -> str:
    """The '## Base checkpoints' section of data/README.md, rendered from the checkpoint json files."""
    lines = ["## Base checkpoints", "", "Built by `python -m minilora.pretrain` (or `make data`) from data/corpus/pretrain.txt;",
             "the numbers below are read from `data/checkpoints/<name>.json`, written by that run.", ""]
    for name in BASES:
        path = checkpoint_dir() / f"{name}.json"
        if not path.exists():
            continue
        meta = json.loads(path.read_text())
        r, q = meta["recipe"], meta["quality"]
        lines += [
            f"### {name}", "",
            f"- {meta['parameters']:,} parameters, preset `{BASES[name]}`; objective: {r['objective']}.",
            f"- {r['steps']} steps x batch {r['batch_size']} (blocks of {r['block_size']} tokens), AdamW lr {r['lr']}, "
            f"warmup {r['warmup_steps']}, cosine, weight decay {r['weight_decay']}, seed {r['seed']}.",
            f"- wall time {meta['wall_time_s']} s on a 2-core CPU ({r['torch_threads']} torch threads); final train loss {meta['final_train_loss']}.",
            f"- validation perplexity (held-out corpus documents): {q['val_perplexity']}",
            "- zero-shot exact match on 100 test examples per task (before any fine-tuning):", "",
            "| task | exact match |", "|---|---|",
        ]
        lines += [f"| {k.split('/', 1)[1]} | {v:.2f} |" for k, v in q.items() if k.startswith("exact_match/")]
        lines.append("")
    return "\n".join(lines)


def update_data_readme() -> None:
    """Rewrite the '## Base checkpoints' section of data/README.md in place (appended if missing); the sections
    before and after it stay as they are."""
    readme = data_dir() / "README.md"
    text = readme.read_text() if readme.exists() else "# data\n\n"
    head, _, rest = text.partition("## Base checkpoints")
    tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
    readme.write_text(head.rstrip() + "\n\n" + report_markdown() + ("\n" + tail if tail else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(BASES), help="build one base instead of all")
    parser.add_argument("--steps", type=int, help="override the number of training steps (quick experiments)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the committed checkpoints were built with 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in BASES if args.only is None or n == args.only]
    for name in names:
        meta = build(name, steps=args.steps, progress=not args.quiet)
        print(json.dumps({k: meta[k] for k in ("name", "wall_time_s", "final_train_loss", "quality")}, indent=2))
    update_data_readme()


if __name__ == "__main__":
    main()
