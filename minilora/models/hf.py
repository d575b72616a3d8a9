"""Bridges to Hugging Face transformers: same weights in, same logits out.

    from_hf_llama(LlamaForCausalLM)                -> DecoderLM   (state dict keys are identical)
    from_hf_seq2seq(T5ForConditionalGeneration)    -> Seq2SeqLM   (keys renamed, see _t5_key_map)
    from_hf_gpt2(GPT2LMHeadModel)                  -> DecoderLM   (fused c_attn split, Conv1D weights transposed)
    to_hf_llama(DecoderLM)                         -> LlamaForCausalLM

transformers is imported inside the functions only, so the rest of minilora never needs it.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .decoder import DecoderLM
from .seq2seq import Seq2SeqLM


def _check_model_type(hf_config, supported: tuple[str, ...], function: str):
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in supported:
        raise ValueError(
            f"{function} supports model_type {', '.join(repr(s) for s in supported)}; got {model_type!r}."
        )


def config_from_hf_llama(hf_config) -> ModelConfig:
    """ModelConfig with the shapes of a transformers LlamaConfig (plain RoPE, SiLU, no/consistent biases)."""
    _check_model_type(hf_config, ("llama",), "config_from_hf_llama")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if getattr(hf_config, "rope_scaling", None) and rope_type == "default":
        rope_type = hf_config.rope_scaling.get("rope_type", hf_config.rope_scaling.get("type"))
    if rope_type not in (None, "default"):
        raise ValueError(
            f"rope_scaling / rope_type {rope_type!r} is not supported; only plain RoPE (rope_type 'default') is. "
            f"Drop the scaling from the config (and keep sequences within the original context length)."
        )
    if hf_config.hidden_act != "silu":
        raise ValueError(f"only hidden_act='silu' (SwiGLU) is supported for Llama, got {hf_config.hidden_act!r}.")
    attention_bias, mlp_bias = bool(hf_config.attention_bias), bool(getattr(hf_config, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"attention_bias={attention_bias} but mlp_bias={mlp_bias}: minilora has one `bias` switch for all "
            f"linear layers, so both must be equal."
        )
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    pad = hf_config.pad_token_id
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        d_ff=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        norm="rmsnorm",
        norm_eps=hf_config.rms_norm_eps,
        mlp="swiglu",
        pos="rope",
        rope_theta=float(theta),
        bias=attention_bias,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        pad_token_id=0 if pad is None else pad,
        bos_token_id=1 if hf_config.bos_token_id is None else hf_config.bos_token_id,
        eos_token_id=_first(hf_config.eos_token_id, 2),
    )


def _first(token_id, default):
    """HF allows a list of eos ids; we stop on the first."""
    if token_id is None:
        return default
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def from_hf_llama(hf_model) -> DecoderLM:
    """DecoderLM with the weights of a transformers LlamaForCausalLM (keys map 1:1)."""
    model = DecoderLM(config_from_hf_llama(hf_model.config))
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary_emb" not in k}
    model.load_state_dict(state, strict=True)
    return model.to(next(hf_model.parameters()).dtype)


def to_hf_llama(model: DecoderLM):
    """transformers LlamaForCausalLM with the same weights (for checks against peft and HF tooling)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if not (c.pos == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu"):
        raise ValueError(
            f"to_hf_llama needs a Llama-style config (pos='rope', norm='rmsnorm', mlp='swiglu'); "
            f"got pos={c.pos!r}, norm={c.norm!r}, mlp={c.mlp!r}."
        )
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_bias=c.bias,
        mlp_bias=c.bias,
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=c.dropout,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    hf_model = LlamaForCausalLM(hf_config)
    hf_model.load_state_dict(model.state_dict(), strict=True)
    return hf_model.to(next(model.parameters()).dtype).eval()


def config_from_hf_t5(hf_config) -> ModelConfig:
    """ModelConfig with the shapes of a transformers T5Config ('gated-gelu' = T5 v1.1, or 'relu' = T5)."""
    _check_model_type(hf_config, ("t5",), "config_from_hf_t5")
    mlp = {"gated-gelu": "geglu", "relu": "relu"}.get(hf_config.feed_forward_proj)
    if mlp is None:
        raise ValueError(
            f"feed_forward_proj={hf_config.feed_forward_proj!r} is not supported; supported are 'gated-gelu' "
            f"(T5 v1.1, flan-t5) and 'relu' (original T5)."
        )
    # transformers keeps the head tied in memory but only rescales the decoder output for checkpoints
    # saved with tie_word_embeddings=True (original T5); that flag is what decides the numerics.
    tied = bool(getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings))
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.d_model,
        n_layers=hf_config.num_decoder_layers,
        n_encoder_layers=hf_config.num_layers,
        n_heads=hf_config.num_heads,
        head_dim=hf_config.d_kv,
        d_ff=hf_config.d_ff,
        max_seq_len=getattr(hf_config, "n_positions", None) or 512,
        norm="rmsnorm",
        norm_eps=hf_config.layer_norm_epsilon,
        mlp=mlp,
        pos="relative",
        relative_num_buckets=hf_config.relative_attention_num_buckets,
        relative_max_distance=hf_config.relative_attention_max_distance,
        attn_scale=1.0,
        bias=False,
        tie_embeddings=tied,
        dropout=float(hf_config.dropout_rate),
        pad_token_id=hf_config.pad_token_id,
        eos_token_id=_first(hf_config.eos_token_id, 1),
        bos_token_id=_first(getattr(hf_config, "bos_token_id", None), 1),
        # T5 starts decoding from the pad token; configs built by hand may not say so explicitly.
        decoder_start_token_id=_first(getattr(hf_config, "decoder_start_token_id", None), hf_config.pad_token_id),
    )


def _t5_key_map(config: ModelConfig) -> dict[str, str]:
    """HF T5 parameter name -> our name."""
    mlp = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"} if config.mlp == "geglu" else {
        "wi": "up_proj", "wo": "down_proj"}
    attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    keys = {"shared.weight": "shared.weight", "lm_head.weight": "lm_head.weight"}
    for stack, n_layers in (("encoder", config.n_encoder_layers), ("decoder", config.n_layers)):
        keys[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            f"{stack}.relative_attention_bias.weight")
        keys[f"{stack}.final_layer_norm.weight"] = f"{stack}.norm.weight"
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            for a, b in attn.items():
                keys[f"{hf}.0.SelfAttention.{a}.weight"] = f"{ours}.self_attn.{b}.weight"
            keys[f"{hf}.0.layer_norm.weight"] = f"{ours}.input_layernorm.weight"
            ff = 1
            if stack == "decoder":
                for a, b in attn.items():
                    keys[f"{hf}.1.EncDecAttention.{a}.weight"] = f"{ours}.cross_attn.{b}.weight"
                keys[f"{hf}.1.layer_norm.weight"] = f"{ours}.cross_attn_layernorm.weight"
                ff = 2
            for a, b in mlp.items():
                keys[f"{hf}.{ff}.DenseReluDense.{a}.weight"] = f"{ours}.mlp.{b}.weight"
            keys[f"{hf}.{ff}.layer_norm.weight"] = f"{ours}.post_attention_layernorm.weight"
    return keys


def from_hf_seq2seq(hf_model) -> Seq2SeqLM:
    """Seq2SeqLM with the weights of a transformers T5ForConditionalGeneration."""
    _check_model_type(hf_model.config, ("t5",), "from_hf_seq2seq")
    config = config_from_hf_t5(hf_model.config)
    model = Seq2SeqLM(config)
    hf_state = hf_model.state_dict()
    keys = _t5_key_map(config)
    state = {ours: hf_state[hf] for hf, ours in keys.items()}
    model.load_state_dict(state, strict=True)
    return model.to(next(hf_model.parameters()).dtype)


def config_from_hf_gpt2(hf_config) -> ModelConfig:
    """ModelConfig with the shapes of a transformers GPT2Config."""
    _check_model_type(hf_config, ("gpt2",), "config_from_hf_gpt2")
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"activation_function={hf_config.activation_function!r} is not supported; GPT-2's 'gelu_new' is."
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf_config, flag, False):
            raise ValueError(f"{flag}=True is not supported; GPT-2's default (False) is.")
    d = hf_config.n_embd
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=d,
        n_layers=hf_config.n_layer,
        n_heads=hf_config.n_head,
        d_ff=hf_config.n_inner or 4 * d,
        max_seq_len=hf_config.n_positions,
        norm="layernorm",
        norm_eps=hf_config.layer_norm_epsilon,
        mlp="gelu",
        pos="learned",
        attn_scale=None if hf_config.scale_attn_weights else 1.0,
        bias=True,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        pad_token_id=0,
        bos_token_id=_first(hf_config.bos_token_id, 1),
        eos_token_id=_first(hf_config.eos_token_id, 2),
    )


def from_hf_gpt2(hf_model) -> DecoderLM:
    """DecoderLM with the weights of a transformers GPT2LMHeadModel.

    GPT-2 stores linear layers as Conv1D with weight (in, out), the transpose of nn.Linear's (out, in),
    and fuses q, k, v into one c_attn; both are undone here.
    """
    config = config_from_hf_gpt2(hf_model.config)
    model = DecoderLM(config)
    hf = hf_model.state_dict()
    d = config.d_model
    state = {
        "model.embed_tokens.weight": hf["transformer.wte.weight"],
        "model.embed_positions.weight": hf["transformer.wpe.weight"],
        "model.norm.weight": hf["transformer.ln_f.weight"],
        "model.norm.bias": hf["transformer.ln_f.bias"],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(config.n_layers):
        h, ours = f"transformer.h.{i}", f"model.layers.{i}"
        q, k, v = hf[f"{h}.attn.c_attn.weight"].t().split(d, dim=0)  # (3d, d) -> 3 × (d, d)
        qb, kb, vb = hf[f"{h}.attn.c_attn.bias"].split(d)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            state[f"{ours}.self_attn.{name}.weight"], state[f"{ours}.self_attn.{name}.bias"] = w, b
        pairs = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        for a, b in pairs.items():
            state[f"{ours}.{b}.weight"] = hf[f"{h}.{a}.weight"].t()  # Conv1D (in, out) -> Linear (out, in)
            state[f"{ours}.{b}.bias"] = hf[f"{h}.{a}.bias"]
        for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            state[f"{ours}.{b}.weight"], state[f"{ours}.{b}.bias"] = hf[f"{h}.{a}.weight"], hf[f"{h}.{a}.bias"]
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model.to(next(hf_model.parameters()).dtype)
