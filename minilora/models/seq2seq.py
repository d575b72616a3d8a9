"""Seq2SeqLM: an encoder-decoder transformer in the style of T5 v1.1.

We match HF T5ForConditionalGeneration (T5 v1.1 settings: gated-gelu, untied head): logits, loss and
greedy generations are equal on the same weights (see tests/reference/test_hf_models.py).

    input_ids ──► shared ──► encoder: n_encoder_layers × Block(bidirectional) ──► norm ──┐
                                                                                        │ (K, V of cross_attn)
    decoder_input_ids ──► shared ──► decoder: n_layers × Block(causal + cross) ──► norm ──► lm_head ──► logits

T5 specifics (Raffel et al. 2020, §2.1): RMSNorm without mean or bias, no attention scaling (attn_scale=1.0;
the 1/sqrt(d) is folded into the initialisation), a learned relative position bias computed once per stack
and added to every layer's self-attention scores, no position information at all in cross-attention.
Our seq2seq presets differ in one place: they keep T5's initialisation but also scale attention scores by
1/sqrt(head_dim) (attn_scale=None), because unscaled attention pretrained much worse at our size
(data/README.md has the measurement). Models loaded from HF T5 use attn_scale=1.0 and match it exactly.
With tie_embeddings=True (original T5) the head reuses `shared` and the decoder output is scaled by d_model^-0.5.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block, RelativePositionBias, attention_bias, check_input_ids, make_norm
from .config import ModelConfig
from .decoder import LMOutput, select_next_token


class Stack(nn.Module):
    """Encoder or decoder: layers, the shared relative position bias, final norm."""

    def __init__(self, config: ModelConfig, n_layers: int, is_decoder: bool):
        super().__init__()
        self.relative_attention_bias = RelativePositionBias(config, bidirectional=not is_decoder)
        mode = "causal" if is_decoder else "bidirectional"
        self.layers = nn.ModuleList([Block(config, mode, cross=is_decoder) for _ in range(n_layers)])
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)


def shift_right(labels, start_id: int, pad_id: int):
    """Teacher forcing: decoder input at step t is the label at t-1, starting from decoder_start_token_id."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


class Seq2SeqLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.is_seq2seq:
            raise ValueError("Seq2SeqLM needs an encoder: set n_encoder_layers > 0 (e.g. get_config('seq2seq-tiny')).")
        if config.pos != "relative":
            raise ValueError(f"Seq2SeqLM is T5-style and uses pos='relative', got pos={config.pos!r}.")
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, config.n_encoder_layers, is_decoder=False)
        self.decoder = Stack(config, config.n_layers, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def _init_weights(self):
        """T5's initialisation (Mesh TensorFlow): unit-variance activations without attention scaling."""
        c = self.config
        d, hs, nh = c.d_model, c.head_dim, c.n_heads
        nn.init.normal_(self.shared.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=d**-0.5)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.relative_attention_bias.weight, std=d**-0.5)
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear) or module is self.lm_head:
                continue
            leaf = name.rsplit(".", 1)[-1]
            std = {
                "q_proj": (d * hs) ** -0.5, "k_proj": d**-0.5, "v_proj": d**-0.5, "o_proj": (nh * hs) ** -0.5,
                "gate_proj": d**-0.5, "up_proj": d**-0.5, "down_proj": c.d_ff**-0.5,
            }[leaf]
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _run_layers(self, stack, x, use_cache, past_key_values, **kwargs):
        cache = [] if use_cache else None
        for i, layer in enumerate(stack.layers):
            past = past_key_values[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute activations in the backward pass instead of storing them
                x, kv = checkpoint(layer, x, past_kv=past, use_cache=use_cache, use_reentrant=False, **kwargs)
            else:
                x, kv = layer(x, past_kv=past, use_cache=use_cache, **kwargs)
            if use_cache:
                cache.append(kv)
        return x, cache

    def encode(self, input_ids, attention_mask=None):
        """input_ids (B, T) -> encoder hidden states (B, T, d). Padding may be on either side."""
        check_input_ids(input_ids, self.config)
        T = input_ids.shape[1]
        x = self.encoder.dropout(self.shared(input_ids))  # (B, T, d)
        # relative position bias (1, nh, T, T) + padding mask (B, 1, 1, T), shared by every layer
        bias = self.encoder.relative_attention_bias(T, T) + attention_bias(
            T, T, causal=False, key_padding_mask=attention_mask, device=x.device
        )
        x, _ = self._run_layers(self.encoder, x, False, None, attn_bias=bias)
        return self.encoder.dropout(self.encoder.norm(x))

    def decode(
        self, decoder_input_ids, encoder_hidden_states, attention_mask=None, past_key_values=None, use_cache=False
    ):
        """-> (logits (B, T, V), cache). attention_mask is the encoder's padding mask."""
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        check_input_ids(decoder_input_ids, self.config, past_len, what="decoder_input_ids")
        T = decoder_input_ids.shape[1]
        x = self.decoder.dropout(self.shared(decoder_input_ids))  # (B, T, d)
        self_bias = self.decoder.relative_attention_bias(T, past_len + T, offset=past_len) + attention_bias(
            T, past_len + T, causal=True, device=x.device
        )  # (1, nh, T, T_past + T)
        cross_bias = None
        if attention_mask is not None:
            cross_bias = attention_bias(T, attention_mask.shape[1], causal=False, key_padding_mask=attention_mask,
                                        device=x.device)  # (B, 1, 1, T_enc)
        x, cache = self._run_layers(
            self.decoder, x, use_cache, past_key_values,
            attn_bias=self_bias, context=encoder_hidden_states, cross_bias=cross_bias,
        )
        x = self.decoder.dropout(self.decoder.norm(x))
        if self.config.tie_embeddings:
            x = x * self.config.d_model**-0.5  # original T5 rescales before reusing the input embedding
        logits = self.lm_head(x)  # (B, T, V)
        return logits, tuple(cache) if use_cache else None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        labels=None,
        encoder_outputs=None,
        past_key_values=None,
        use_cache=False,
    ) -> LMOutput:
        """Labels (B, T_dec) are the target ids themselves (not shifted); decoder_input_ids default to
        labels shifted right behind decoder_start_token_id, as in HF T5. -100 labels are ignored."""
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or precomputed encoder_outputs from model.encode).")
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels (decoder inputs are built from labels).")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        logits, cache = self.decode(decoder_input_ids, encoder_outputs, attention_mask, past_key_values, use_cache)
        loss = None
        if labels is not None:
            # at least fp32, as T5ForConditionalGeneration (which keeps float64 logits in float64)
            logits_for_loss = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = nn.functional.cross_entropy(
                logits_for_loss.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
        return LMOutput(logits=logits, loss=loss, past_key_values=cache, encoder_hidden_states=encoder_outputs)

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        max_new_tokens,
        attention_mask=None,
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        use_cache=True,
        generator=None,
        **forward_kwargs,
    ) -> torch.LongTensor:
        """Encode once, then decode up to max_new_tokens -> (B, 1 + n_new) starting with decoder_start_token_id.

        The self-attention cache grows by one position per step; the cross-attention keys and values are
        computed from the encoder states on the first step and reused. Finished rows continue with
        pad_token_id; decoding stops when every row has produced eos_token_id (default config.eos_token_id,
        -1: never stop early). Every step, the first one encoding too, is a forward call, which gets the
        other keyword arguments (for hooks that read them, such as minilora.inject's `adapter_names`).
        """
        c = self.config
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        if 1 + max_new_tokens > c.max_seq_len:
            raise ValueError(
                f"1 + max_new_tokens={max_new_tokens} exceeds max_seq_len={c.max_seq_len}; lower max_new_tokens."
            )
        B = input_ids.shape[0]
        ids = torch.full((B, 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        enc, cache, step_ids = None, None, ids
        for _ in range(max_new_tokens):
            out = self(input_ids=input_ids if enc is None else None, attention_mask=attention_mask, encoder_outputs=enc,
                       decoder_input_ids=step_ids if use_cache else ids, past_key_values=cache, use_cache=use_cache,
                       **forward_kwargs)
            enc, cache = out.encoder_hidden_states, out.past_key_values  # enc: (B, T_enc, d), encoded once
            next_id = select_next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)  # (B,)
            next_id = torch.where(finished, torch.full_like(next_id, c.pad_token_id), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)  # (B, T + 1)
            step_ids = next_id[:, None]  # (B, 1)
            finished |= next_id == eos
            if finished.all():
                break
        return ids
