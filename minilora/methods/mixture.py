"""Token-level mixture of LoRA experts (LoRA-TLE, jb-01/LoRA-TLE, arXiv 2311.10847): the router.

The router compares the text so far with each task and turns the similarities into mixing weights:
1. each task's centroid c_i is the mean embedding of its formatted training examples, answers included;
2. the text's embedding e is compared with every centroid by cosine similarity, s_i = e·c_i / (|e| |c_i|);
3. the similarities become weights w = softmax(f(s)), with f one of
   - "top_scaled" (LoRA-TLE's rule): the largest similarity alone multiplied by T (T = 4 in the original), the
     others left as they are. As in the original, a negative top score multiplied by T gets smaller, not larger;
   - "temperature": every similarity divided by T;
   and optionally only the top_k most similar tasks kept (the others get weight 0, the kept ones are renormalised).
Embeddings come from any function of a list of texts; `mean_pooled_embedder` gives the base model's own: the mean of
its final hidden states (after the last norm) over the real tokens.

Still to come (issue "Token-level mixture of LoRA experts"): the activation-space mixing of the adapters with the KV
cache, the faithful mode with the original's cross terms, generation at prompt, token and every-n-th-token
granularity, and lesson 07.
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


def mean_pooled_embedder(model: nn.Module, tokenizer, batch_size: int = 32):
    """texts -> (n, d_model): the mean of a decoder's final hidden states (after its last norm) over the real tokens."""

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out, seen = [], {}
        device = next(model.parameters()).device
        hook = model.model.norm.register_forward_hook(lambda m, a, o: seen.update(h=o))
        try:
            for i in range(0, len(texts), batch_size):
                ids = [tokenizer.encode(t, add_bos=True) for t in texts[i:i + batch_size]]
                width = max(map(len, ids))
                x = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in ids], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=device)
                model(x, attention_mask=mask)  # right padding: the real tokens see what they would alone
                m = mask[..., None].to(seen["h"].dtype)
                out.append((seen["h"] * m).sum(1) / m.sum(1))
        finally:
            hook.remove()
        return torch.cat(out)

    return embed
