"""Transformer building blocks shared by DecoderLM and Seq2SeqLM.

    x ──► norm ──► Attention (causal | bidirectional | cross) ──► + ──► norm ──► MLP ──► + ──►
    └──────────────────────────────────────────────────────────────┘ └───────────────────┘

Pre-norm residual blocks as in Llama and T5. Every attention layer takes one additive bias tensor
`attn_bias` (B or 1, 1 or nh, T_q, T_k) that already holds the causal/padding mask and, for T5, the
relative position bias: both are the same in every layer, so each model builds it once per stack.

Numerics follow the Hugging Face implementations so that weights map 1:1:
  - RMSNorm normalises in fp32 (LlamaRMSNorm / T5LayerNorm);
  - RoPE uses the "rotate_half" layout (first half / second half of each head, not interleaved pairs);
  - GELU in gelu/geglu MLPs is the tanh approximation (GPT-2's and T5 v1.1's "gelu_new").
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g   (Zhang & Sennrich 2019; no mean subtraction, no bias).

    The mean square is taken in fp32 so that bf16/fp16 activations do not lose the small variances. Llama
    (LlamaRMSNorm) also scales x in fp32; T5 (T5LayerNorm, `scale_in_input_dtype=True`) scales x in its own
    dtype. The two give the same bits for fp32, bf16 and fp16 inputs and differ only for float64 ones, where
    each follows its reference (the float64 reference tests see the difference)."""

    def __init__(self, dim: int, eps: float = 1e-6, scale_in_input_dtype: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.scale_in_input_dtype = scale_in_input_dtype

    def forward(self, x):
        dtype = x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        if not self.scale_in_input_dtype:
            x = x.float()
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps, scale_in_input_dtype=config.is_seq2seq)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# ---------------------------------------------------------------------------------------------
# Positions


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate each (x_i, x_{i+hs/2}) pair of q and k by angle pos · θ^(-2i/hs).

    The frequencies are recomputed in fp32 on every call (a handful of numbers) rather than stored,
    so casting the model to bf16 cannot round them and nothing rotary appears in the state dict.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (B, T) -> cos, sin each (B, 1, T, hs)."""
        hs = self.head_dim
        steps = torch.arange(0, hs, 2, device=position_ids.device, dtype=torch.int64).float()
        inv_freq = 1.0 / (self.theta ** (steps / hs))  # (hs/2,)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, T, hs)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs) rotated by the angles in cos/sin (B, 1, T, hs)."""
    return x * cos + rotate_half(x) * sin


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of key_pos - query_pos into num_buckets ids.

    Half of the buckets (per direction) are exact offsets 0..max_exact-1, the rest grow logarithmically
    up to max_distance; everything further shares the last bucket. A causal decoder only sees the past,
    so it spends all buckets on one direction.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp keeps log() finite for the small distances that torch.where discards anyway
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative attention bias: a learned scalar per (bucket, head), added to the attention scores.

    Computed once per stack (encoder or decoder) and shared by all its layers.
    """

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.relative_num_buckets, config.n_heads))
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_num_buckets
        self.max_distance = config.relative_max_distance

    def forward(self, q_len: int, k_len: int, offset: int = 0):
        """-> (1, nh, q_len, k_len). offset: how many keys came before the first query (KV cache)."""
        device = self.weight.device
        q_pos = torch.arange(q_len, device=device)[:, None] + offset  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        bucket = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        bias = F.embedding(bucket, self.weight)  # (Tq, Tk, nh)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nh, Tq, Tk)


# ---------------------------------------------------------------------------------------------
# Masks


def attention_bias(
    q_len: int,
    k_len: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
):
    """Additive mask: 0 where a query may attend, the dtype's most negative number where it may not.

    key_padding_mask: (B, T_k) with 1 for real tokens, 0 for padding. Returns (B or 1, 1, T_q, T_k).
    Queries are the last q_len of the k_len positions (the KV cache holds the first k_len - q_len).
    A finite minimum instead of -inf keeps fully masked rows (queries on left padding) free of NaN.
    """
    allowed = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        allowed = allowed & (k_pos <= q_pos)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------
# Attention and MLP


class Attention(nn.Module):
    """Multi-head attention: softmax(q kᵀ · scale + bias) v, with grouped-query heads.

    mode: "causal" (decoder self-attention), "bidirectional" (encoder self-attention),
          "cross" (decoder queries over encoder states; keys/values computed once and cached).
    Names q_proj, k_proj, v_proj, o_proj as in Hugging Face Llama.
    """

    def __init__(self, config: ModelConfig, mode: str):
        super().__init__()
        if mode not in ("causal", "bidirectional", "cross"):
            raise ValueError(f"mode must be 'causal', 'bidirectional' or 'cross', got {mode!r}")
        self.mode = mode
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attn_scale if config.attn_scale is not None else config.head_dim**-0.5
        self.dropout = config.dropout
        d, hs = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hs, bias=config.bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hs, bias=config.bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hs, bias=config.bias)
        self.o_proj = nn.Linear(self.n_heads * hs, d, bias=config.bias)

    def _heads(self, x, n):
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, hs)

    def forward(self, x, attn_bias=None, rope=None, past_kv=None, context=None, use_cache=False):
        """x (B, T, d) -> (out (B, T, d), kv for the cache or None).

        attn_bias: additive (B or 1, 1 or nh, T, T_k). rope: (cos, sin) for the new positions.
        past_kv: (k, v) each (B, n_kv, T_past, hs); for cross attention the encoder's k, v.
        context: encoder states (B, T_enc, d) for cross attention.
        """
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, nh, T, hs)
        if self.mode == "cross" and past_kv is not None:
            k, v = past_kv  # the encoder does not change while decoding
        else:
            source = context if self.mode == "cross" else x
            k = self._heads(self.k_proj(source), self.n_kv_heads)  # (B, n_kv, T_src, hs)
            v = self._heads(self.v_proj(source), self.n_kv_heads)  # (B, n_kv, T_src, hs)
            if rope is not None:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if past_kv is not None:
                k = torch.cat([past_kv[0], k], dim=2)  # (B, n_kv, T_past + T, hs)
                v = torch.cat([past_kv[1], v], dim=2)
        new_kv = (k, v) if use_cache else None
        # GQA: query head h reads key/value head h // (nh / n_kv)
        groups = self.n_heads // self.n_kv_heads
        k_all = k.repeat_interleave(groups, dim=1)  # (B, nh, T_k, hs)
        v_all = v.repeat_interleave(groups, dim=1)  # (B, nh, T_k, hs)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hs)
        return self.o_proj(y), new_kv


def attention_reference(q, k, v, attn_bias, scale):
    """The plain version of F.scaled_dot_product_attention above (same result, for reading and tests)."""
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T_k)
    if attn_bias is not None:
        scores = scores + attn_bias
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # at least fp32
    return probs.to(q.dtype) @ v  # (B, nh, T, hs)


def gelu_tanh(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

    Written out rather than F.gelu(x, approximate="tanh"): this exact expression is what GPT-2 and T5
    were trained with ("gelu_new"), and the fused kernel differs by ~1e-7, which deep nets amplify.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MLP(nn.Module):
    """Position-wise feed-forward.

    swiglu: down(silu(gate(x)) ⊙ up(x))   (Shazeer 2020; Llama)
    geglu:  down(gelu(gate(x)) ⊙ up(x))   (T5 v1.1 "gated-gelu", tanh-approximate GELU)
    gelu:   down(gelu(up(x)))             (GPT-2, tanh-approximate GELU)
    relu:   down(relu(up(x)))             (original T5)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        d, f = config.d_model, config.d_ff
        if self.kind in ("swiglu", "geglu"):
            self.gate_proj = nn.Linear(d, f, bias=config.bias)
        self.up_proj = nn.Linear(d, f, bias=config.bias)
        self.down_proj = nn.Linear(f, d, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def act(self, x):
        if self.kind == "swiglu":
            return F.silu(x)
        if self.kind == "relu":
            return F.relu(x)
        return gelu_tanh(x)

    def forward(self, x):
        if self.kind in ("swiglu", "geglu"):
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(self.dropout(h))


class Block(nn.Module):
    """One pre-norm layer: self-attention, optional cross-attention, MLP, each with a residual.

    Norm names follow Hugging Face Llama (input_layernorm before attention, post_attention_layernorm
    before the MLP); a decoder layer of a seq2seq model adds cross_attn_layernorm + cross_attn.
    """

    def __init__(self, config: ModelConfig, mode: str, cross: bool = False):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, mode)
        if cross:
            self.cross_attn_layernorm = make_norm(config)
            self.cross_attn = Attention(config, "cross")
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x, attn_bias=None, rope=None, past_kv=None, use_cache=False, context=None, cross_bias=None
    ):
        """-> (x, cache) where cache is (k, v) or, with cross attention, (k, v, cross_k, cross_v)."""
        self_past = past_kv[:2] if past_kv is not None else None
        h, self_kv = self.self_attn(self.input_layernorm(x), attn_bias, rope, self_past, use_cache=use_cache)
        x = x + self.dropout(h)
        cache = self_kv
        if hasattr(self, "cross_attn"):
            cross_past = past_kv[2:] if past_kv is not None else None
            h, cross_kv = self.cross_attn(
                self.cross_attn_layernorm(x), cross_bias, past_kv=cross_past, context=context, use_cache=use_cache
            )
            x = x + self.dropout(h)
            cache = self_kv + cross_kv if use_cache else None
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, cache


def check_input_ids(input_ids: torch.Tensor, config: ModelConfig, past_len: int = 0, what: str = "input_ids"):
    """Clear errors instead of an index error deep inside an embedding or a silent RoPE extrapolation."""
    if input_ids.dim() != 2:
        raise ValueError(
            f"{what} must be (batch, seq_len), got shape {tuple(input_ids.shape)}; use ids[None] for one row."
        )
    total = past_len + input_ids.shape[1]
    if total > config.max_seq_len:
        raise ValueError(
            f"sequence length {total} exceeds max_seq_len={config.max_seq_len}; truncate the input "
            f"(or generate fewer tokens), or build the model with a larger max_seq_len."
        )
    # meta tensors (memory estimates) have shapes but no values to check
    if input_ids.numel() and not input_ids.is_meta and (int(input_ids.max()) >= config.vocab_size or int(input_ids.min()) < 0):
        raise ValueError(
            f"{what} contain ids outside [0, vocab_size={config.vocab_size}) (max id {int(input_ids.max())}, "
            f"min id {int(input_ids.min())}); check that the tokenizer matches the model or raise vocab_size."
        )
