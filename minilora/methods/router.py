"""The router of the token-level mixture of LoRA experts (LoRA-TLE, jb-01/LoRA-TLE, arXiv 2311.10847).

The router compares the text so far with each task and turns the similarities into mixing weights:
1. each task's centroid c_i is the mean embedding of its formatted training examples, answers included;
2. the text's embedding e is compared with every centroid by cosine similarity, s_i = e·c_i / (|e| |c_i|);
3. the similarities become weights w = softmax(f(s)), with f one of
   - "top_scaled" (LoRA-TLE's rule): the largest similarity alone multiplied by T (T = 4 in the original), the
     others left as they are. As in the original, a negative top score multiplied by T gets smaller, not larger;
   - "temperature": every similarity divided by T;
   and optionally only the top_k most similar tasks kept (the others get weight 0, the kept ones are renormalised).
Embeddings come from any function of a list of texts. `MeanPooledEmbedder` gives a causal decoder's own: the mean
of its final hidden states (after the last norm) over the real tokens, kept up to date token by token during
generation. The mixing of the adapters with these weights is in mixture.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

RULES = ("top_scaled", "temperature")


@dataclass
class RouterConfig:
    rule: str = "top_scaled"  # "top_scaled" (the largest similarity times T) or "temperature" (every one divided by T)
    temperature: float = 4.0  # T
    top_k: int | None = None  # keep only the k most similar tasks (None: all)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or a positive integer, got {self.top_k!r}.")


class Router(nn.Module):
    """Task centroids (n_tasks, dim) and the rule that turns a text's similarities to them into mixing weights."""

    def __init__(self, centroids: torch.Tensor, tasks: list[str], config: RouterConfig | None = None):
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("the router needs at least one task (an empty task set has nothing to route to).")
        if centroids.dim() != 2 or centroids.shape[0] != len(tasks):
            raise ValueError(f"centroids must be (n_tasks, dim) with one row per task ({len(tasks)}), got "
                             f"{tuple(centroids.shape)}.")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be distinct, got {tasks}.")
        self.config = config or RouterConfig()
        if self.config.top_k is not None and self.config.top_k > len(tasks):
            raise ValueError(f"top_k={self.config.top_k} is more than the {len(tasks)} tasks.")
        self.tasks = tasks
        self.register_buffer("centroids", centroids.detach().clone())

    @classmethod
    def from_examples(cls, embed, texts: dict[str, list[str]], config: RouterConfig | None = None) -> "Router":
        """Centroids from each task's texts: `embed(list of texts) -> (n, dim)`, averaged per task."""
        empty = [t for t, v in texts.items() if not v]
        if not texts or empty:
            raise ValueError(f"every task needs at least one example text; empty: {empty or 'all (no tasks)'}.")
        return cls(torch.stack([embed(list(v)).mean(0) for v in texts.values()]), list(texts), config)

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding (B, dim) with each centroid -> (B, n_tasks)."""
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.centroids.shape[-1]:
            raise ValueError(f"embeddings must be (batch, {self.centroids.shape[-1]}), the centroids' size; got "
                             f"{tuple(embeddings.shape)}. Use the embedder the router was built with.")
        c = self.centroids.to(embeddings.dtype)
        return F.normalize(embeddings, dim=-1) @ F.normalize(c, dim=-1).T

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mixing weights (B, n_tasks), each row summing to 1."""
        s = self.similarities(embeddings)
        T = self.config.temperature
        if self.config.rule == "top_scaled":
            top = F.one_hot(s.argmax(-1), s.shape[-1]).bool()
            logits = torch.where(top, s * T, s)
        else:
            logits = s / T
        if self.config.top_k is not None:
            # the k most similar tasks (by similarity: a negative top score times T is no longer the largest logit)
            kept = torch.zeros_like(s, dtype=torch.bool).scatter(-1, s.topk(self.config.top_k).indices, True)
            logits = logits.masked_fill(~kept, float("-inf"))
        return torch.softmax(logits, dim=-1)


class MeanPooledEmbedder:
    """texts -> (n, d_model): the mean of a causal decoder's final hidden states (after its last norm) over the
    real tokens. Because the decoder is causal, a token's hidden state never changes when text is appended, so
    the embedding of a growing text is kept up to date with a KV cache: `start(ids, mask)` on the prompt, then
    `extend(new_ids)` for each generated token costs one cached step, not a pass over the whole text.

    Give it a model of its own (e.g. a second `load_base(...)`), not the one being mixed: the embedding must
    not depend on the mixture it chooses."""

    def __init__(self, lm: nn.Module, tokenizer, batch_size: int = 32):
        self.lm, self.tokenizer, self.batch_size = lm, tokenizer, batch_size
        self.dim = lm.config.d_model
        self._state = None  # (KV cache, attention mask, running sum (B, d), count (B, 1))

    def _run(self, ids, mask, cache=None):
        seen = {}
        hook = self.lm.model.norm.register_forward_hook(lambda m, a, o: seen.update(h=o))
        try:
            out = self.lm(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        finally:
            hook.remove()
        m = mask[:, mask.shape[1] - ids.shape[1]:, None].to(seen["h"].dtype)
        return out.past_key_values, (seen["h"] * m).sum(1), m.sum(1)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        out, pad = [], self.tokenizer.pad_id
        device = next(self.lm.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer.encode(t, add_bos=True) for t in texts[i:i + self.batch_size]]
            width = max(map(len, ids))
            x = torch.tensor([r + [pad] * (width - len(r)) for r in ids], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=device)
            _, total, count = self._run(x, mask)  # right padding: the real tokens see what they would alone
            out.append(total / count)
        return torch.cat(out)

    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (B, d) of left- or right-padded prompts (B, T); remembers them for `extend`."""
        mask = torch.ones_like(ids) if mask is None else mask
        cache, total, count = self._run(ids, mask)
        self._state = cache, mask, total, count
        return total / count

    @torch.no_grad()
    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, d) of the texts so far after appending `ids` (B, k) to every row."""
        if self._state is None:
            raise RuntimeError("call start(prompt_ids, mask) before extend(...).")
        cache, mask, total, count = self._state
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        cache, more, n = self._run(ids, mask, cache)
        self._state = cache, mask, total + more, count + n
        return self._state[2] / self._state[3]
