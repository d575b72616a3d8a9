"""DecoderLM: a decoder-only language model, Llama-style by default, GPT-2-style by config.

    ids ──► embed_tokens (+ embed_positions) ──► n_layers × Block(causal) ──► norm ──► lm_head ──► logits

Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases (logits equal HF LlamaForCausalLM).
GPT-2: LayerNorm, learned positions, GELU MLP, biases, tied head.
Module names are those of HF LlamaForCausalLM (model.layers.N.self_attn.q_proj, ...) so a Llama
state dict loads unchanged and peft target lists such as ["q_proj", "v_proj"] mean the same layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .blocks import Block, RotaryEmbedding, attention_bias, check_input_ids, make_norm
from .config import ModelConfig


@dataclass
class LMOutput:
    """logits (B, T, V); loss when labels were given; past_key_values when use_cache=True;
    encoder_hidden_states (B, T_enc, d) for seq2seq models."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: tuple | None = None
    encoder_hidden_states: torch.Tensor | None = None


def select_next_token(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) of the last position -> next ids (B,). Greedy argmax, or a sample from
    softmax(logits / temperature) restricted to the top_k ids and/or the top_p probability mass."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy.")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already cover top_p (the top token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def lm_loss(logits, labels):
    """Next-token cross-entropy: position t predicts labels[t+1]; -100 labels are ignored (HF convention)."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    V = shift_logits.shape[-1]
    return F.cross_entropy(shift_logits.reshape(-1, V), shift_labels.reshape(-1), ignore_index=-100)


class DecoderModel(nn.Module):
    """The transformer body (HF's `model.`): embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        else:
            self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Block(config, "causal") for _ in range(config.n_layers)])
        self.norm = make_norm(config)


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.is_seq2seq:
            raise ValueError("DecoderLM is decoder-only: set n_encoder_layers=0, or use Seq2SeqLM for this config.")
        if config.pos not in ("rope", "learned"):
            raise ValueError(f"DecoderLM supports pos='rope' (Llama) or 'learned' (GPT-2), got pos={config.pos!r}.")
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 · n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layers) ** 0.5)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=False, position_ids=None
    ) -> LMOutput:
        """input_ids (B, T). attention_mask (B, T_past + T): 1 = token, 0 = padding (left or right).
        Positions default to the count of real tokens before each one, so a left-padded row sees the
        same positions as the unpadded row."""
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        check_input_ids(input_ids, self.config, past_len)
        if attention_mask is not None and attention_mask.shape[1] != past_len + T:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but the cache holds {past_len} and "
                f"input_ids add {T}; pass the mask for all {past_len + T} positions."
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # (B, T)
            else:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None]  # (1, T)

        m = self.model
        x = m.embed_tokens(input_ids)  # (B, T, d)
        rope = None
        if self.config.pos == "learned":
            x = x + m.embed_positions(position_ids)  # (B or 1, T, d)
        else:
            rope = m.rotary(position_ids, x.dtype)  # cos, sin (B or 1, 1, T, hs)
        x = m.dropout(x)
        bias = attention_bias(T, past_len + T, causal=True, key_padding_mask=attention_mask, device=x.device)

        new_cache = [] if use_cache else None
        for i, layer in enumerate(m.layers):
            past = past_key_values[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute this layer's activations in the backward pass instead of storing them
                x, kv = checkpoint(layer, x, bias, rope, past, use_cache, use_reentrant=False)
            else:
                x, kv = layer(x, bias, rope, past, use_cache)
            if use_cache:
                new_cache.append(kv)
        x = m.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = lm_loss(logits, labels) if labels is not None else None
        return LMOutput(logits=logits, loss=loss, past_key_values=tuple(new_cache) if use_cache else None)

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        max_new_tokens,
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        attention_mask=None,
        use_cache=True,
        generator=None,
        **forward_kwargs,
    ) -> torch.LongTensor:
        """Continue each prompt by up to max_new_tokens -> (B, T_prompt + n_new).

        Prompts of different lengths go in left-padded with an attention_mask. eos_token_id defaults to
        config.eos_token_id (-1: never stop early); a row that has produced it is continued with
        pad_token_id, and decoding stops once every row has. With use_cache the prompt is run once and
        each step feeds one new token. Other keyword arguments go to every forward call, for hooks that
        read them (minilora.inject's mixed batches: `adapter_names`).
        """
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id
        B, T = input_ids.shape
        check_input_ids(input_ids, self.config)
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds max_seq_len={self.config.max_seq_len}; "
                f"shorten the prompt or lower max_new_tokens."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = input_ids, attention_mask
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        cache, step_ids = None, ids
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_ids, attention_mask=mask, past_key_values=cache, use_cache=True, **forward_kwargs)
                cache = out.past_key_values
            else:
                out = self(ids, attention_mask=mask, **forward_kwargs)
            next_id = select_next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)  # (B,)
            next_id = torch.where(finished, torch.full_like(next_id, pad), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)  # (B, T + 1)
            mask = torch.cat([mask, torch.ones_like(next_id)[:, None]], dim=1)
            step_ids = next_id[:, None]  # (B, 1)
            finished |= next_id == eos
            if finished.all():
                break
        return ids
