"""The four committed task adapters: one LoRA adapter per decoder task family, on the decoder-base checkpoint.

    python -m minilora.task_adapters                 # train all four, score each on all four tasks, update data/
    python -m minilora.task_adapters --only reading  # one adapter (the score table is redone for all four)
    python -m minilora.task_adapters --scores        # only re-score the committed adapters

Each adapter is written in peft's format to ``data/adapters/<task>/`` (adapter_config.json,
adapter_model.safetensors) with ``training.json`` beside it (recipe, wall time, loss curve). Every adapter shares
one recipe, ``CONFIG`` and ``RECIPE``: the same rank, targets and schedule for all four, so that lessons comparing
or mixing them (07, 08) compare like with like. ``data/adapters/scores.json`` holds the exact match of every
adapter (and of the base alone) on the 200 test examples of every task.

    model = ml.load_base("decoder-base")
    load_task_adapters(model)            # adapters named "arithmetic", "facts", "expressions", "reading"
    ml.set_adapter(model, "reading")
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import torch

from minilora.inject import disable_adapters, inject, set_adapter
from minilora.io import load_adapter, save_adapter
from minilora.methods.lora import LoraConfig
from minilora.pretrain import load_base
from minilora.tasks import DECODER_TASKS, data_dir, load_task
from minilora.tokenizer import load_tokenizer
from minilora.train import TrainConfig, encode_examples, exact_match, train

BASE = "decoder-base"
CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
RECIPE = TrainConfig(steps=1500, batch_size=16, lr=3e-3, warmup_steps=30, seed=0)


def adapter_dir(task: str):
    if task not in DECODER_TASKS:
        raise ValueError(f"no committed adapter for {task!r}; the task adapters are {', '.join(DECODER_TASKS)}")
    return data_dir() / "adapters" / task


def load_task_adapters(model, tasks=DECODER_TASKS):
    """Load the committed adapters of ``tasks`` into ``model`` (a decoder-base), each under its task's name."""
    for task in tasks:
        path = adapter_dir(task)
        if not (path / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"{path} holds no adapter; build it with `python -m minilora.task_adapters --only {task}`")
        load_adapter(model, str(path), adapter_name=task)
    return model


def build(task: str, progress: bool = True) -> dict:
    """Train the adapter of one task from the committed base and write it; returns its training record."""
    tok = load_tokenizer()
    rows = encode_examples(load_task(task, "train"), tok)
    torch.manual_seed(RECIPE.seed)
    model = inject(load_base(BASE), CONFIG)
    cfg = replace(RECIPE, progress=progress)
    history = train(model, rows, cfg, pad_id=tok.pad_id)
    out = adapter_dir(task)
    save_adapter(model, str(out))
    record = {
        "task": task, "base": BASE, "lora": {"r": CONFIG.r, "alpha": CONFIG.alpha, "target_modules": list(CONFIG.target_modules)},
        "recipe": {k: v for k, v in asdict(RECIPE).items() if k not in ("progress", "log_every")},
        "torch_threads": torch.get_num_threads(), "wall_time_s": round(history.wall_time_s, 1),
        "final_train_loss": round(history.final_loss, 4), "loss_every_10_steps": [round(x, 4) for x in history.loss],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    write_folder_readme(task)
    return record


def write_folder_readme(task: str) -> None:
    """The README.md of data/adapters/<task>/, listing its files (peft ignores it)."""
    (adapter_dir(task) / "README.md").write_text(
        f"# data/adapters/{task}\n\n"
        f"The LoRA adapter for `{task}` on `{BASE}`, written by `python -m minilora.task_adapters --only {task}`; "
        "do not edit by hand. See ../README.md.\n\n"
        "| file | what it holds |\n|---|---|\n"
        "| adapter_config.json | the adapter's config in peft's format |\n"
        "| adapter_model.safetensors | its weights under peft's keys |\n"
        "| training.json | recipe, torch threads, wall time and loss curve of the run that trained it |\n")


def score_matrix(tasks=DECODER_TASKS) -> dict:
    """Exact match on the 200 test examples of every task: the base alone ("base") and each adapter."""
    tok = load_tokenizer()
    model = load_task_adapters(load_base(BASE), tasks)
    tests = {t: load_task(t, "test") for t in DECODER_TASKS}
    scores = {}
    with disable_adapters(model):
        scores["base"] = {t: round(exact_match(model, tok, tests[t]), 3) for t in DECODER_TASKS}
    for adapter in tasks:
        set_adapter(model, adapter)
        scores[adapter] = {t: round(exact_match(model, tok, tests[t]), 3) for t in DECODER_TASKS}
    return scores


def report_markdown() -> str:
    """The '## Task adapters' section of data/README.md, from training.json and scores.json."""
    root = data_dir() / "adapters"
    records = {t: json.loads((root / t / "training.json").read_text()) for t in DECODER_TASKS if (root / t / "training.json").exists()}
    if not records:
        return ""
    first = next(iter(records.values()))
    lora, r = first["lora"], first["recipe"]
    lines = [
        "## Task adapters", "",
        "Built by `python -m minilora.task_adapters` (or `make adapters`, a step of `make data`); the numbers below are",
        "read from `data/adapters/<task>/training.json` and `data/adapters/scores.json`, written by that run.", "",
        f"- One LoRA adapter per decoder task on `{first['base']}`, in peft's format: r = {lora['r']}, alpha = "
        f"{lora['alpha']} on `{', '.join(lora['target_modules'])}`.",
        f"- {r['steps']} steps x batch {r['batch_size']}, AdamW lr {r['lr']}, warmup {r['warmup_steps']}, cosine to "
        f"{r['min_lr_ratio']}x, weight decay {r['weight_decay']}, seed {r['seed']}; the loss is on the answer only.",
        "- Wall time per adapter as recorded in its training.json (the 2-core VM; the last build trained all four at once, about half a core each): " + ", ".join(
            f"{t} {rec['wall_time_s']} s ({rec['torch_threads']} threads)" for t, rec in records.items()) + ".",
        "- Retraining gives the same weights on one machine and thread count; another machine's kernels may sum in",
        "  another order and move the weights (and a greedy answer or two), so the files are not bitwise reproducible",
        "  across machines.",
    ]
    path = root / "scores.json"
    if path.exists():
        scores = json.loads(path.read_text())
        lines += ["", "Exact match on the 200 test examples of each task (rows: the adapter; `base`: no adapter):", "",
                  "| adapter | " + " | ".join(DECODER_TASKS) + " |", "|---|" + "---|" * len(DECODER_TASKS)]
        lines += [f"| {name} | " + " | ".join(f"{row[t]:.3f}" for t in DECODER_TASKS) + " |" for name, row in scores.items()]
    return "\n".join(lines) + "\n"


def update_data_readme() -> None:
    """Write the '## Task adapters' section of data/README.md, just before '## Base checkpoints' (which
    ``python -m minilora.pretrain`` rewrites to the end of the file)."""
    readme = data_dir() / "README.md"
    text = readme.read_text()
    if "## Task adapters" in text:
        head, rest = text.split("## Task adapters", 1)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
    else:
        head, tail = text.split("## Base checkpoints", 1)
        tail = "## Base checkpoints" + tail
    readme.write_text(head + report_markdown() + "\n" + tail)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=DECODER_TASKS, nargs="+", help="train these adapters only")
    parser.add_argument("--scores", action="store_true", help="only re-score the committed adapters")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.scores:
        for task in args.only or DECODER_TASKS:
            start = time.perf_counter()
            record = build(task, progress=not args.quiet)
            print(f"{task}: trained in {record['wall_time_s']} s ({time.perf_counter() - start:.0f} s with loading)", flush=True)
    scores = score_matrix()
    (data_dir() / "adapters" / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps(scores, indent=2))
    update_data_readme()


if __name__ == "__main__":
    main()
