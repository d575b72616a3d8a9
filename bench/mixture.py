"""Generation speed of the token-level mixture of LoRA experts, in one run: tokens per second at batch 1 and 8.

On decoder-base with the four committed task adapters (data/adapters/), the same test prompts and the same number
of new tokens for every variant (no early stop):
  single adapter    set_adapter(model, "arithmetic") and model.generate with the KV cache: what one expert costs
  token-level       ml.Mixture (exact, activation space) routing at every token, with the KV cache; the router's
                    embedding of the growing text is updated by one cached step of the embedder per token
  naive re-merge    the original's loop, one example at a time: at every token, embed the whole text from scratch,
                    build the combined adapter with add_weighted_adapter (here its exact "cat" form), activate it,
                    re-run the whole text without a cache, delete the adapter
  dense re-merge    the cheapest re-merge loop: the same, but every adapted weight is overwritten in place,
                    W' = W + sum_i w_i s_i B_i A_i, instead of building an adapter (shown, not in the goal)
The variants give the same first tokens (checked before timing, greedy; later a float32 near-tie can flip a choice
between summation orders, which changes no lengths: no variant stops early). Each round runs every variant once,
rotating the order; a ratio is the median over rounds of the ratio within a round (bench/lora_step.py's helpers).

    python bench/mixture.py            # 32 new tokens, 7 rounds
    python bench/mixture.py --quick    # 12 new tokens, 3 rounds, under a minute on 2 cores
    python bench/mixture.py --embedder base

The last lines print `token-level/single-adapter tok/s ratio: X` (goal >= 0.8) and
`token-level speedup over naive re-merge: Y` (goal >= 10), each at batch 1 and batch 8, and the speedup over the
dense re-merge.
"""

import argparse
import copy
import statistics

import torch

import minilora as ml
from lora_step import ratio, timed_rounds
from minilora.inject import adapter_layers
from minilora.task_adapters import BASE, load_task_adapters
from minilora.tasks import DECODER_TASKS, format_prompt, full_text
from minilora.train import collate


def prompts(tok, batch):
    """`batch` test prompts, taken in turn from the four tasks, left-padded."""
    tests = [list(ml.load_task(t, "test")) for t in DECODER_TASKS]
    rows = [tok.encode(format_prompt(tests[i % 4][i // 4]), add_bos=True) for i in range(batch)]
    b = collate([{"input_ids": r} for r in rows], tok.pad_id, left_pad=True)
    return b["input_ids"], b["attention_mask"]


@torch.no_grad()
def remerge_generate(next_token, router, embed_lm, ids, mask, n_new):
    """The original's loop, one example at a time: route from the whole text embedded from scratch, then
    next_token(seq, w) re-merges for the weights w and re-runs the whole text."""
    out = []
    for row, m in zip(ids, mask):
        seq = row[m.bool()].tolist()
        for _ in range(n_new):
            w = router(ml.MeanPooledEmbedder(embed_lm, None).start(torch.tensor([seq])))[0]
            seq.append(next_token(seq, w))
        out.append(seq[-n_new:])
    return torch.tensor(out)


def adapter_step(model):
    """As the original: build the combined adapter, activate it, run the text, delete it."""
    def step(seq, w):
        ml.add_weighted_adapter(model, list(DECODER_TASKS), w.tolist(), "step", combination_type="cat")
        ml.set_adapter(model, "step")
        token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        ml.delete_adapter(model, "step")
        return token
    return step


def dense_step(plain, layers, deltas):
    """Every adapted weight overwritten in place, W' = W + sum_i w_i Delta W_i, instead of an adapter built."""
    def step(seq, w):
        for name, layer in layers.items():
            layer.weight.copy_(deltas[name][0] + sum(w[i] * d for i, d in deltas[name][1]))
        return int(plain(torch.tensor([seq])).logits[0, -1].argmax())
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--embedder", choices=("encoder", "base"), default="encoder")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = args.new_tokens or (12 if args.quick else 32)
    rounds = args.rounds or (3 if args.quick else 7)
    tok = ml.load_tokenizer()
    model = load_task_adapters(ml.load_base(BASE)).eval()
    if args.embedder == "encoder":
        from minilora.sentence_encoder import load_sentence_encoder
        embed_lm = load_sentence_encoder().eval()
    else:
        embed_lm = ml.load_base(BASE).eval()
    embedder = ml.MeanPooledEmbedder(embed_lm, tok)
    texts = {t: [full_text(e) for e in list(ml.load_task(t, "train"))[:200]] for t in DECODER_TASKS}
    router = ml.Router.from_examples(embedder, texts)

    # the dense loop's plain base, whose adapted weights it overwrites; the adapters' dense updates precomputed
    plain = copy.deepcopy(model)
    for layer in adapter_layers(plain).values():
        layer.active_adapters = []
    layers = {k: v.base_layer for k, v in adapter_layers(plain).items()}
    deltas = {k: (layers[k].weight.clone(), [(i, v.delta_weight(t)) for i, t in enumerate(DECODER_TASKS) if t in v.lora_A])
              for k, v in adapter_layers(plain).items()}

    naive_model = load_task_adapters(ml.load_base(BASE)).eval()
    mix = ml.Mixture(model, list(DECODER_TASKS))
    print(f"model: {BASE} + 4 task adapters (LoRA r=4, seven linear layers); embedder: {args.embedder} "
          f"(d={embedder.dim}); {n_new} new tokens; torch threads {torch.get_num_threads()}; {rounds} rounds")
    results = {}
    for batch in (1, 8):
        ids, mask = prompts(tok, batch)
        kw = {"attention_mask": mask, "eos_token_id": -1}

        def single():
            ml.set_adapter(model, "arithmetic")
            return model.generate(ids, n_new, **kw)[:, ids.shape[1]:]

        def token_level():
            with mix:
                return mix.generate(router, embedder, ids, n_new, every=1, **kw)[:, ids.shape[1]:]

        def naive():
            return remerge_generate(adapter_step(naive_model), router, embed_lm, ids, mask, n_new)

        def dense():
            return remerge_generate(dense_step(plain, layers, deltas), router, embed_lm, ids, mask, n_new)

        # the same first tokens (further on, a float32 near-tie can flip a greedy choice between summation orders)
        want = token_level()[:, :4]
        assert torch.equal(want, naive()[:, :4]) and torch.equal(want, dense()[:, :4]), "the loops disagree"
        times = timed_rounds({"single adapter": single, "token-level": token_level, "naive re-merge": naive,
                              "dense re-merge": dense}, rounds)
        tokens = batch * n_new
        print(f"\nbatch {batch}: {'variant':<16} {'median s':>9} {'tok/s':>8}")
        for name, t in times.items():
            print(f"         {name:<16} {statistics.median(t):9.3f} {tokens / statistics.median(t):8.1f}")
        results[batch] = (1 / ratio(times, "token-level", "single adapter"), ratio(times, "naive re-merge", "token-level"),
                          ratio(times, "dense re-merge", "token-level"))
    print()
    print("token-level speedup over dense re-merge: " + ", ".join(f"{z:.1f} (batch {b})" for b, (_, _, z) in results.items()))
    print("token-level/single-adapter tok/s ratio: " + ", ".join(f"{x:.3f} (batch {b})" for b, (x, _, _) in results.items()))
    print("token-level speedup over naive re-merge: " + ", ".join(f"{y:.1f} (batch {b})" for b, (_, y, _) in results.items()))


if __name__ == "__main__":
    main()
