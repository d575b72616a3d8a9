"""Token-level mixture of LoRA experts (LoRA-TLE, jb-01/LoRA-TLE, arXiv 2311.10847): mixing and generation.

The router (router.py) gives every row of a batch weights w_1..w_n over n LoRA adapters. Two ways to apply them:

- "exact", in activation space: every LoRA layer computes

      y = W x + sum_i w_i s_i B_i (A_i x),

  the weighted sum of the adapters' own updates. All adapters' A_i are stacked into one (sum r_i, in) matrix and
  all B_i into one (out, sum r_i) matrix, so the whole mixture is two GEMMs for the batch, like one adapter of
  rank sum r_i, with the weights applied to the r_i columns of adapter i in between. No weight matrix is built
  per token, adapters of different ranks simply take different widths, and a layer only stacks the adapters
  it holds (one that a task adapter skips gets no update there).
- "faithful", what the original does with peft's old `add_weighted_adapter(combination_type="linear")`:
  A = sum_i w_i s_i A_i, B = sum_j B_j, scale 1, so

      y = W x + (sum_j B_j)(sum_i w_i s_i A_i x),

  which holds the cross terms B_j A_i (j != i) and is not sum_i w_i Delta W_i. As in peft, all ranks must match.

Weights are (B, n), one set for every position of a row, or (B, T, n), one per position.

Generation with the KV cache: each position's keys and values are computed once, by the forward that feeds it,
with the weights routed at that step. Later steps only append, so the cache stays valid as the weights change;
an uncached pass over the finished text with the same per-position weights (`position_weights()`) gives the
same logits (tested). The original instead re-runs the whole text with the newest weights at every token;
`generate(..., use_cache=False)` does that, at O(T^2) cost.

    mix = Mixture(model, router.tasks)           # the adapters, in the router's order
    with mix:                                    # the adapters' own forward is off inside the block
        ids = mix.generate(router, embedder, prompt_ids, 16, attention_mask=mask, every=1)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .lora import LoraConfig, LoraLayer

MODES = ("exact", "faithful")


class Mixture:
    """Adapters `names` of `model` mixed with per-row (or per-position) weights in every LoRA layer holding them."""

    def __init__(self, model: nn.Module, names: list[str], mode: str = "exact"):
        names, configs = list(names), getattr(model, "adapter_configs", {})
        if not names:
            raise ValueError("a mixture needs at least one adapter (an empty task set has nothing to mix).")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs)}. Load them first "
                             "(load_adapter(model, path, adapter_name=...)).")
        bad = [n for n in names if not isinstance(configs[n], LoraConfig) or configs[n].use_dora
               or configs[n].lora_bias or configs[n].modules_to_save]
        if bad:
            raise ValueError(f"adapters {bad} are not plain LoRA (DoRA, lora_bias or modules_to_save); the mixture "
                             "adds weighted B A updates only.")
        if mode == "faithful" and len({configs[n].r for n in names}) > 1:  # peft's "linear" refuses too
            raise ValueError(f"faithful mode sums the A and B matrices, which needs one rank; got "
                             f"{ {n: configs[n].r for n in names} }. Use mode='exact', which mixes any ranks.")
        self.model, self.names, self.mode = model, names, mode
        self.layers = {k: m for k, m in model.named_modules() if isinstance(m, LoraLayer) and set(names) & set(m.lora_A)}
        self.weights: torch.Tensor | None = None  # (B, n) or (B, T, n)
        self.history: torch.Tensor | None = None  # after generate: (B, steps, n), the weights of each step
        self._handles, self._active, self._packed, self._columns, self._gathered = [], {}, {}, {}, {}
        self._route = None  # set by generate: how the next forward chooses its weights

    # ------------------------------------------------------------------ entering and leaving
    def __enter__(self) -> "Mixture":
        if any(m.merged for m in self.layers.values()):
            raise ValueError("a mixture cannot run over merged adapters; call unmerge(model) first.")
        for key, layer in self.layers.items():
            self._active[key] = layer.active_adapters
            layer.active_adapters = []  # the layer computes W x alone; the hook adds the mixture
            self._packed[layer] = self._pack(layer)
            self._handles.append(layer.register_forward_hook(self._hook))
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for key, layer in self.layers.items():
            layer.active_adapters = self._active[key]
        self._handles, self._active, self._packed, self._columns = [], {}, {}, {}

    def _pack(self, layer: LoraLayer):
        """(s_i A_i stacked (R, in), B (out, R) or sum_j B_j (out, r), which weight column each row of A takes)."""
        present = [(i, n) for i, n in enumerate(self.names) if n in layer.lora_A]
        A = torch.cat([layer.lora_A[n].weight * layer.scaling[n] for _, n in present])
        Bs = [layer.lora_B[n].weight for _, n in present]
        column = torch.cat([torch.full((layer.r[n],), i) for i, n in present]).to(A.device)
        column = self._columns.setdefault((tuple(column.tolist()), column.device), column)  # one per pattern
        return A, torch.cat(Bs, dim=1) if self.mode == "exact" else sum(Bs), column

    def set_weights(self, weights: torch.Tensor) -> None:
        """Fix the weights, (B, n) or (B, T, n) in the order of `names`, for the forwards that follow."""
        if weights.dim() not in (2, 3) or weights.shape[-1] != len(self.names):
            raise ValueError(f"weights must be (batch, {len(self.names)}) or (batch, seq_len, {len(self.names)}), one "
                             f"column per adapter in {self.names}; got {tuple(weights.shape)}.")
        self._use(weights)
        self._route = None

    def _use(self, weights: torch.Tensor) -> None:
        self.weights, self._gathered = weights, {}  # each layer pattern's gathered weights, made once per forward

    def _hook(self, layer, args, out):
        if layer.disabled:
            return out
        if self.weights is None:
            raise RuntimeError("the mixture has no weights; call set_weights(...) or generate(...).")
        x, w = args[0], self.weights
        w = w[:, None] if w.dim() == 2 else w  # (B, 1 or T, n)
        if w.shape[1] not in (1, x.shape[-2]) or w.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"per-position weights {tuple(w.shape)} do not match the input {tuple(x.shape[:-1])}; "
                             "give one row per example and one set per position (or one for all positions).")
        A, B, column = self._packed[layer]
        key = (id(column), A.dtype)
        if key not in self._gathered:  # layers holding the same adapters share one gather per forward
            self._gathered[key] = (w[..., column] if self.mode == "exact" else w[..., column[:: B.shape[1]], None]).to(A.dtype)
        h = x.to(A.dtype) @ A.T  # (B, T, R): every adapter's A_i x at once
        if self.mode == "exact":
            h = h * self._gathered[key]  # adapter i's r_i columns times w_i
        else:  # sum_i w_i s_i A_i x, then through sum_j B_j
            h = (h.unflatten(-1, (-1, B.shape[1])) * self._gathered[key]).sum(-2)
        return (out.to(A.dtype) + h @ B.T).to(out.dtype)  # a half-precision base: the sum rounded once, as LoRA does

    # ------------------------------------------------------------------ generation
    def _pre_forward(self, model, args, kwargs):
        self._gathered = {}  # weights changed in place between two forwards are seen
        if self._route is None:
            return None
        ids = args[0]  # generate passes the ids positionally
        mask = kwargs.get("attention_mask")
        r = self._route
        if r["seen"] == 0:  # the prompt: route once from it
            emb = r["embedder"].start(ids, mask)
            new = ids
        else:
            new = ids if kwargs.get("past_key_values") is not None else ids[:, r["seen"]:]  # uncached: all again
            emb = r["embedder"].extend(new)
        step = len(r["history"])
        if step == 0 or (r["every"] is not None and step % r["every"] == 0):
            r["current"] = r["router"](emb)
        r["history"].append(r["current"])
        r["positions"].append(r["current"][:, None].expand(-1, new.shape[1], -1))
        r["seen"] += new.shape[1]
        self._use(r["current"])  # every position this forward feeds gets the newest weights
        return None

    @torch.no_grad()
    def generate(self, router, embedder, input_ids: torch.Tensor, max_new_tokens: int, every: int | None = 1,
                 use_cache: bool = True, **generate_kwargs) -> torch.Tensor:
        """model.generate with weights routed from the text so far: once from the prompt (every=None), at every
        generated token (every=1) or at every n-th (every=n; in between the last weights stay)."""
        if list(router.tasks) != self.names:
            raise ValueError(f"the router's tasks {router.tasks} must be the mixture's adapters {self.names}, in order.")
        if getattr(embedder, "dim", router.centroids.shape[1]) != router.centroids.shape[1]:
            raise ValueError(f"the embedder gives {embedder.dim}-d embeddings but the router's centroids are "
                             f"{router.centroids.shape[1]}-d; build the router with this embedder.")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be None (prompt-level) or a positive integer, got {every!r}.")
        if not self._handles:
            raise RuntimeError("use the mixture inside `with mixture:`.")
        limit = self.model.config.max_seq_len
        if input_ids.shape[1] + max_new_tokens > limit:
            raise ValueError(f"the prompt ({input_ids.shape[1]} tokens) plus max_new_tokens={max_new_tokens} exceeds "
                             f"the model's context of {limit}; shorten the prompt or generate fewer tokens.")
        self._route = {"router": router, "embedder": embedder, "every": every, "seen": 0, "history": [],
                       "positions": [], "current": None}
        try:
            return self.model.generate(input_ids, max_new_tokens, use_cache=use_cache, **generate_kwargs)
        finally:
            self.history = torch.stack(self._route["history"], dim=1)  # (B, steps, n): the weights of each step
            self._positions = torch.cat(self._route["positions"], dim=1)  # (B, T, n)
            self._route = None

    def position_weights(self) -> torch.Tensor:
        """(B, T, n): the weights each position of the last generation was computed with (with the KV cache)."""
        return self._positions
