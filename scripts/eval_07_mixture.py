"""The evaluations behind lesson 07 (token-level mixture of LoRA experts), written to data/results/07_mixture.json.

    python scripts/eval_07_mixture.py                  # every configuration
    python scripts/eval_07_mixture.py --only token ... # re-run the named ones, merged into the JSON

Nothing is trained: the four committed task adapters (data/adapters/, LoRA r = 4 on the seven linear layers of
decoder-base) are mixed by the router of minilora/methods/router.py, whose centroids are the mean embeddings of
the first 200 training examples of each task (prompt and answer, as LoRA-TLE), over the embedder EMBEDDER. Every
configuration answers the 200 test prompts of each task, 24 new tokens at most, one torch thread; the score is exact
match. Greedy configurations are deterministic; the sampled ones (temperature 0.9, top-k 50, top-p 0.9, as the
original's pipeline on Llama-2) run seeds 0, 1 and 2. Routing accuracy is the share of test prompts whose largest prompt-level weight is their own task,
for both embedders, and again from the input field alone (no template).
"""

import time

import torch

import minilora as ml
import sweep_common as sweep
from minilora.sentence_encoder import load_sentence_encoder
from minilora.task_adapters import BASE, load_task_adapters
from minilora.tasks import DECODER_TASKS, format_prompt, full_text
from minilora.train import generate_answers

N_CENTROID, MAX_NEW, SEEDS = 200, 24, (0, 1, 2)
# the original samples through a transformers pipeline with temperature=0.9; the rest comes from generate's defaults:
# top_k = 50 (GenerationConfig's default) and, as far as we can tell, top_p = 0.9 (Llama-2-7b-hf's generation_config.json)
SAMPLING = {"temperature": 0.9, "top_k": 50, "top_p": 0.9}
# "base": decoder-base's own mean-pooled states; "encoder": the small contrastive encoder (minilora/sentence_encoder.py).
# Both route every test prompt to its task; the encoder costs a fraction of the base per token, so it is the one used.
EMBEDDER = "encoder"
# name -> (kind, options). kind: base, single (one adapter), fixed (constant weights), routed (the router)
CONFIGS = {"base": ("base", {}),
           **{f"single/{t}": ("single", {"adapter": t}) for t in DECODER_TASKS},
           "equal": ("fixed", {"mode": "exact"}), "equal_faithful": ("fixed", {"mode": "faithful"}),
           "prompt": ("routed", {"mode": "exact", "every": None}), "token": ("routed", {"mode": "exact", "every": 1}),
           "every2": ("routed", {"mode": "exact", "every": 2}),
           "token_top1": ("routed", {"mode": "exact", "every": 1, "top_k": 1}),  # only the top task's adapter
           "prompt_faithful": ("routed", {"mode": "faithful", "every": None}),
           "token_faithful": ("routed", {"mode": "faithful", "every": 1}),
           "every2_faithful": ("routed", {"mode": "faithful", "every": 2}),
           # the original's loop: faithful weights, the whole text re-run with the newest weights at every token
           "original": ("routed", {"mode": "faithful", "every": 1, "use_cache": False}),
           "token_sampled": ("routed", {"mode": "exact", "every": 1, "sample": True}),
           "original_sampled": ("routed", {"mode": "faithful", "every": 1, "use_cache": False, "sample": True}),
           "own_sampled": ("own", {"sample": True})}


def embedder_of(kind, tok):
    lm = ml.load_base(BASE) if kind == "base" else load_sentence_encoder()
    return ml.MeanPooledEmbedder(lm.eval(), tok)


def router_of(embedder):
    texts = {t: [full_text(e) for e in list(ml.load_task(t, "train"))[:N_CENTROID]] for t in DECODER_TASKS}
    return ml.Router.from_examples(embedder, texts)


def score(answers, examples):
    return sum(a == e["output"].strip() for a, e in zip(answers, examples)) / len(examples)


def run_config(kind, opts, model, tok, router, embedder, tests, seed=None):
    """{task: exact match} for one configuration (and one seed where it samples)."""
    sample = {"do_sample": True, **SAMPLING, "generator": torch.Generator().manual_seed(seed)} if opts.get("sample") else {}
    if opts.get("top_k"):
        router = ml.Router(router.centroids, router.tasks, ml.RouterConfig(top_k=opts["top_k"]))
    out = {}
    for task, examples in tests.items():
        if kind == "base":
            with ml.disable_adapters(model):
                answers = generate_answers(model, tok, examples, MAX_NEW)
        elif kind in ("single", "own"):
            ml.set_adapter(model, opts.get("adapter", task))
            answers = generate_answers(model, tok, examples, MAX_NEW,
                                       generate=lambda ids, n, **kw: model.generate(ids, n, **kw, **sample))
        else:
            with ml.Mixture(model, router.tasks, mode=opts["mode"]) as mix:
                if kind == "fixed":
                    mix.set_weights(torch.full((1, len(router.tasks)), 1 / len(router.tasks)))
                    gen = None
                else:
                    gen = lambda ids, n, **kw: mix.generate(router, embedder, ids, n, every=opts["every"],
                                                            use_cache=opts.get("use_cache", True), **kw, **sample)
                answers = generate_answers(model, tok, examples, MAX_NEW, generate=gen)
        out[task] = score(answers, examples)
    out["average"] = sum(out[t] for t in DECODER_TASKS) / len(DECODER_TASKS)
    return out


@torch.no_grad()
def routing_accuracy(router, embedder, tests):
    """Per task: the share of test prompts routed to their own task, the same from the input field alone (no
    template: a harder test of the embedder), and the mean largest weight."""
    out = {}
    for i, (task, examples) in enumerate(tests.items()):
        w = router(embedder([format_prompt(e) for e in examples]))
        bare = router(embedder([e["input"] for e in examples]))
        out[task] = {"accuracy": (w.argmax(-1) == i).float().mean().item(),
                     "accuracy_input_only": (bare.argmax(-1) == i).float().mean().item(),
                     "mean_top_weight": w.max(-1).values.mean().item()}
    return out


def main():
    args, old, todo = sweep.parse_args(__doc__, "07_mixture.json", CONFIGS)
    torch.set_num_threads(1)
    start = time.perf_counter()
    tok = ml.load_tokenizer()
    tests = {t: list(ml.load_task(t, "test")) for t in DECODER_TASKS}
    model = load_task_adapters(ml.load_base(BASE)).eval()
    embedders = {k: embedder_of(k, tok) for k in ("base", "encoder")}
    routers = {}
    routing = {}
    for k, emb in embedders.items():
        t0 = time.perf_counter()
        routers[k] = router_of(emb)
        routing[k] = {"tasks": routing_accuracy(routers[k], emb, tests), "seconds": time.perf_counter() - t0}
        print(k, routing[k])
    router, embedder = routers[EMBEDDER], embedders[EMBEDDER]
    configs = dict(old.get("configs", {}))
    for name in CONFIGS:
        if name not in todo:
            continue
        kind, opts = CONFIGS[name]
        t0 = time.perf_counter()
        if opts.get("sample"):
            runs = {str(s): run_config(kind, opts, model, tok, router, embedder, tests, s) for s in SEEDS}
            mean = {k: sum(r[k] for r in runs.values()) / len(runs) for k in [*DECODER_TASKS, "average"]}
            configs[name] = {"kind": kind, **opts, "scores": mean, "seeds": runs}
        else:
            configs[name] = {"kind": kind, **opts, "scores": run_config(kind, opts, model, tok, router, embedder, tests)}
        configs[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, {k: round(v, 3) for k, v in configs[name]["scores"].items()}, f"{configs[name]['seconds']} s", flush=True)
    out = {"base": BASE, "adapters": "data/adapters/<task> (LoRA r=4, alpha=8, seven linear layers)",
           "tasks": list(DECODER_TASKS), "test_examples": {t: len(v) for t, v in tests.items()},
           "centroid_examples": N_CENTROID, "max_new_tokens": MAX_NEW, "router": vars(router.config),
           "embedder": EMBEDDER, "sampling": {**SAMPLING, "seeds": list(SEEDS)}, "torch_threads": 1,
           "torch": torch.__version__, "metric": "exact match on the 200 test examples of each task",
           "routing": routing, "configs": {n: configs[n] for n in CONFIGS if n in configs}}
    sweep.write(args.out, out, todo, start)


if __name__ == "__main__":
    main()
