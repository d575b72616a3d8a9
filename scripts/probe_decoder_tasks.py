"""Learning curves of one base on the four decoder task families: why a base does or does not learn them.

    python scripts/probe_decoder_tasks.py --base decoder-tiny --method full --steps 3000 --lr 1e-3
    python scripts/probe_decoder_tasks.py --base decoder-base --method lora --steps 1500 --lr 3e-3 --tasks reading
    python scripts/probe_decoder_tasks.py --base decoder-tiny --prose      # does pretraining teach the reasoning?

Fine-tunes the base on each task's train split (batch 16, warmup 10, cosine to 0.1x, seed 0) and measures greedy
exact match on the first --eval validation examples at every --every steps, with the wall time so far (evaluations
included), and at the end on all 200 test examples, with the training time alone. LoRA is
r = --r, alpha = 2r on --targets. Each curve is one run of --steps steps: the cosine schedule is that of the full
run, so a point at step s is not a run of s steps. One JSON line per task goes to stdout and to --out (appended).

--pretrain PRESET first pretrains that preset on decoder-base's corpus (tasks.build_base_corpus) by the tiny bases'
recipe (2000 steps, pretrain.RECIPE) and probes it instead of --base: decoder-tiny's shape on the larger corpus
separates what the corpus gives from what the parameters give. The weights go to --save (not committed).

--prose asks the pretrained base, with no fine-tuning, to finish the corpus's own prose for held-out problems
("... In the end Lily had" -> "7"): if it cannot, pretraining did not teach the reasoning the task needs.
"""

import argparse
import json
import random
import time
from dataclasses import replace

import torch

import minilora as ml
from minilora import tasks as T

# which version of the task generators a record measured (data/README.md, "Tasks", tells the story)
GENERATORS = "one-step arithmetic and expressions, facts answered with the option, passages of one or two sentences"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prose_probes(n: int = 100) -> dict[str, list[tuple[str, str]]]:
    """(prefix, expected continuation) pairs written the corpus's way, from validation problems."""
    out = {"arithmetic": [], "expressions": [], "facts": [], "reading": []}
    splits = {name: T.generate_splits(name) for name in out}
    # arithmetic: replay the splits' random stream (sample, then render, as generate_splits does) to get the
    # records behind the validation problems
    task_rng = random.Random(f"{T.SEED}/arithmetic")
    held = {e["input"] for e in splits["arithmetic"]["validation"]}
    while len(out["arithmetic"]) < n:
        record = T.TASKS["arithmetic"].sample(task_rng)
        example = T.TASKS["arithmetic"].render(record, task_rng)
        if example["input"] in held:
            kind, a, b, obj, *_ = record
            text, _ = T._story(record, past=True)
            tail = {"together": " Together they had", "compare": f" So {a} had"}.get(kind, f" In the end {a} had")
            out["arithmetic"].append((text + tail, f" {record[-1]}"))
    for e in splits["expressions"]["validation"][:n]:
        out["expressions"].append((f"The program {e['input']} prints", f" {e['output']}"))
    for e in splits["reading"]["validation"][:n]:
        passage, question = e["input"].split("\nQuestion: ")
        out["reading"].append((f"{passage} {question}", f" {e['output']}"))
    for creature in T.CREATURES:
        f = T.BESTIARY[creature]
        out["facts"] += [(f"The {creature} lives in the", f" {f['home']}"), (f"The {creature} eats", f" {f['food']}")]
    return out


@torch.no_grad()
def prose_score(model, tok, pairs) -> float:
    hits = 0
    for prefix, expected in pairs:
        ids = torch.tensor([tok.encode(prefix, add_bos=True)])
        want = tok.encode(expected)
        out = model.generate(ids, max_new_tokens=len(want))
        hits += out[0, ids.shape[1]:].tolist() == want
    return hits / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="decoder-tiny")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--tasks", nargs="+", default=T.DECODER_TASKS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=ALL)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prose", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--pretrain", metavar="PRESET", default=None)
    parser.add_argument("--save", default="/tmp/probe_base.safetensors")
    parser.add_argument("--train-size", type=int, default=None,
                        help="generate this many training examples instead of the committed split (test and "
                             "validation are drawn first, so they stay the same)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = ml.load_tokenizer()
    load = lambda: ml.load_base(args.base)  # noqa: E731
    if args.pretrain:
        from safetensors.torch import load_model, save_model

        from minilora.pretrain import BLOCK_SIZE, RECIPE, _split_corpus
        from minilora.train import lm_chunks

        torch.manual_seed(RECIPE.seed)
        config = ml.get_config(args.pretrain)
        model = ml.DecoderLM(config)
        train_docs, _ = _split_corpus(T.build_base_corpus())
        history = ml.train(model, lm_chunks(train_docs, tok, BLOCK_SIZE), replace(RECIPE, progress=False), pad_id=tok.pad_id, checkpoint=args.save + ".resume.pt")
        save_model(model, args.save)
        print(json.dumps({"pretrained": args.pretrain, "steps": RECIPE.steps, "wall_s": round(history.wall_time_s, 1),
                          "final_loss": round(history.final_loss, 4)}), flush=True)
        args.base = f"{args.pretrain} on the decoder-base corpus"

        def load():
            m = ml.DecoderLM(config)
            load_model(m, args.save)
            return m.eval()
    if args.prose:
        model = load()
        record = {"base": args.base, "prose": {k: prose_score(model, tok, v) for k, v in prose_probes().items()}}
        print(json.dumps(record))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
        return
    for task in args.tasks:
        if args.train_size:
            sizes = {**T.SPLIT_SIZES, "train": args.train_size}
            rows = ml.encode_examples(T.generate_splits(task, sizes=sizes)["train"], tok)
        else:
            rows = ml.encode_examples(ml.load_task(task, "train"), tok)
        val = list(ml.load_task(task, "validation"))[: args.eval]
        torch.manual_seed(0)
        model = load()
        if args.method == "lora":
            ml.inject(model, ml.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=args.targets))
        curve, start, eval_s = [], time.perf_counter(), [0.0]

        def on_step(m, step):
            if step % args.every == 0 or step == args.steps:
                t = time.perf_counter()
                curve.append((step, round(ml.exact_match(m, tok, val), 3), round(t - start, 1)))
                eval_s[0] += time.perf_counter() - t

        cfg = ml.TrainConfig(steps=args.steps, batch_size=16, lr=args.lr, warmup_steps=10, seed=0, progress=False)
        history = ml.train(model, rows, cfg, pad_id=tok.pad_id, on_step=on_step)
        test = round(ml.exact_match(model, tok, ml.load_task(task, "test")), 3)
        record = {"base": args.base, "task": task, "method": args.method, "lr": args.lr, "steps": args.steps,
                  "test_exact_match": test, "train_wall_s": round(history.wall_time_s - eval_s[0], 1),
                  "r": args.r if args.method == "lora" else None, "targets": args.targets if args.method == "lora" else None,
                  "curve": curve, "final_loss": round(history.final_loss, 4), "threads": args.threads,
                  "train_examples": len(rows), "generators": GENERATORS}
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
