"""Our models against Hugging Face transformers on the same (random) weights, eval mode.

Reference models are built from small configs (no downloads). Weights are re-drawn with a larger spread
than HF's init so activations are O(1) and a wrong sign or a missing scale cannot hide below tolerance.

Each comparison runs twice on the same weights. In float64 the two implementations may differ only by
summation order, so the bound is 1e-10 of the output's scale: that proves they compute the same function.
In float32, the precision people train in, summation order moves results by a few eps (1.2e-7) per
reduction and the order changes with thread count and CPU kernels; 1e-5 of the output's scale leaves room
for that across a few layers while a wrong scale, sign or mask still fails by orders of magnitude.
Greedy decoding compares tokens, so it runs in float64, where no near-tie can flip an argmax.
"""
import pytest
import torch
import transformers

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from minilora.models import DecoderLM, ModelConfig, Seq2SeqLM
from minilora.models.hf import (
    config_from_hf_llama,
    config_from_hf_t5,
    from_hf_gpt2,
    from_hf_llama,
    from_hf_seq2seq,
    to_hf_llama,
)

from adapters import max_rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # relative to the output's scale; why: module docstring
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
VOCAB = 96


def same_weights(hf, convert, dtype):
    """Our model converted from `hf` in float32 (an exact copy), then both cast to `dtype`."""
    ours = convert(hf)
    return hf.to(dtype).eval(), ours.to(dtype).eval()


@torch.no_grad()
def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name or "ln_" in name:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g) if p.dim() == 1 and name.endswith("weight")
                    else torch.randn(p.shape, generator=g) * 0.1)
        elif "embed" in name or "shared" in name or "wte" in name or "wpe" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif "relative_attention_bias" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1] if p.dim() == 2 else 64
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


def hf_llama(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return randomize(LlamaForCausalLM(LlamaConfig(**kw))).eval()


def hf_t5(**overrides):
    kw = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.1)
    kw.update(overrides)
    return randomize(T5ForConditionalGeneration(T5Config(**kw))).eval()


def ids(B, T, seed=1, low=3):
    return torch.randint(low, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- Llama

LLAMA_VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mha": dict(num_key_value_heads=4),
    "multi_query": dict(num_key_value_heads=1),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "rope_theta_500k": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "head_dim_not_d_over_heads": dict(head_dim=32),
    "with_biases": dict(attention_bias=True, mlp_bias=True),
}


@DTYPES
@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_logits_match_hf_llama(variant, dtype):
    hf, ours = same_weights(hf_llama(**LLAMA_VARIANTS[variant]), from_hf_llama, dtype)
    x = ids(2, 20)
    with torch.no_grad():
        err = max_rel_err(ours(x).logits, hf(x).logits)
    assert err <= TOL[dtype], f"{variant}: max |Δlogits| / max |logits| = {err:.2e}"


def test_logits_match_hf_llama_with_gqa_and_tied_head_share_the_tensor():
    hf = hf_llama(num_key_value_heads=2, tie_word_embeddings=True)
    ours = from_hf_llama(hf)
    assert ours.config.n_kv_heads == 2 and ours.lm_head.weight is ours.model.embed_tokens.weight


def test_state_dict_keys_equal_hf_llama():
    hf = hf_llama()
    ours = from_hf_llama(hf)
    assert set(ours.state_dict()) == set(hf.state_dict())


@DTYPES
def test_logits_match_hf_llama_with_padding_mask(dtype):
    hf, ours = same_weights(hf_llama(), from_hf_llama, dtype)
    x = ids(3, 12)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate passes for padded rows
    with torch.no_grad():
        a = ours(x, attention_mask=mask).logits
        b = hf(x, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert max_rel_err(a[real], b[real]) <= TOL[dtype]


@DTYPES
def test_left_padded_row_gives_same_logits_as_unpadded_row(dtype):
    ours = from_hf_llama(hf_llama()).to(dtype).eval()
    x = ids(1, 8)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(x)], dim=1)
    with torch.no_grad():
        assert max_rel_err(ours(padded, attention_mask=mask).logits[:, 4:], ours(x).logits) <= TOL[dtype]


@DTYPES
def test_loss_matches_hf_llama_with_ignored_labels(dtype):
    hf, ours = same_weights(hf_llama(), from_hf_llama, dtype)
    x = ids(2, 16)
    labels = x.clone()
    labels[:, :6] = -100  # prompt tokens are not scored
    with torch.no_grad():
        ours_loss, hf_loss = ours(x, labels=labels).loss, hf(x, labels=labels).loss
    assert max_rel_err(ours_loss, hf_loss) <= TOL[dtype]
    assert 1.0 < ours_loss.item() < 20.0


@DTYPES
def test_grads_match_hf_llama(dtype):
    # HF takes Llama's loss and RMSNorm in float32 even in a float64 model (so do we, to equal its forward);
    # the backward of those float32 steps sums in another order, so float64 gradients agree to float32 rounding.
    tol = 1e-6 if dtype == torch.float64 else TOL[dtype]
    hf, ours = same_weights(hf_llama(tie_word_embeddings=True), from_hf_llama, dtype)
    x = ids(2, 16)
    ours(x, labels=x).loss.backward()
    hf(x, labels=x).loss.backward()
    ours_p, hf_p = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
                 "model.embed_tokens.weight"):
        g_ours, g_hf = ours_p[name].grad, hf_p[name].grad
        assert g_hf.abs().max() > 1e-4, name  # the gradient is not trivially zero
        assert max_rel_err(g_ours, g_hf) <= tol, name


def test_greedy_generate_matches_hf_llama():
    hf, ours = same_weights(hf_llama(), from_hf_llama, torch.float64)
    x = ids(2, 6)
    expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                           pad_token_id=0, eos_token_id=2)
    got = ours.generate(x, max_new_tokens=10, eos_token_id=2)
    assert torch.equal(got, expected)


def test_greedy_generate_matches_hf_llama_with_left_padding_and_eos():
    hf, ours = same_weights(hf_llama(), from_hf_llama, torch.float64)
    x = ids(3, 7)
    x[0, :3] = 0
    mask = (x != 0).long()
    free = ours.generate(x, max_new_tokens=8, attention_mask=mask, eos_token_id=-1)  # -1: never stops
    eos = int(free[0, 7 + 2])  # row 0 stops at the latest after its third new token
    kw = dict(attention_mask=mask, max_new_tokens=8)
    expected = hf.generate(x, do_sample=False, pad_token_id=0, eos_token_id=eos, **kw)
    got = ours.generate(x, eos_token_id=eos, **kw)
    assert torch.equal(got, expected)
    first = int((got[0, 7:] == eos).nonzero()[0])
    assert first <= 2 and (got[0, 7 + first + 1:] == 0).all()  # a finished row continues with padding


@DTYPES
def test_to_hf_llama_round_trip(dtype):
    ours = randomize(DecoderLM(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                           d_ff=128, max_seq_len=64, rope_theta=50000.0))).to(dtype).eval()
    hf = to_hf_llama(ours)
    x = ids(2, 12)
    with torch.no_grad():
        assert max_rel_err(ours(x).logits, hf(x).logits) <= TOL[dtype]
    back = from_hf_llama(hf)
    assert back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # a copy, no arithmetic: bit-equal


def test_unsupported_llama_settings_raise_naming_what_is_supported():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'default'"):
        config_from_hf_llama(cfg)
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf_llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, attention_bias=True))
    neox = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="supports model_type 'llama'; got 'gpt_neox'"):
        config_from_hf_llama(neox)


# ---------------------------------------------------------------------------------------------- T5

def padded_encoder_batch():
    x = ids(3, 24, seed=5)  # 24 > relative_max_distance=20: every bucket branch is used
    mask = torch.ones_like(x)
    mask[1, 15:] = 0  # right padding
    mask[2, :6] = 0  # left padding (T5's relative positions do not care which side)
    return x.masked_fill(mask == 0, 0), mask


@DTYPES
@pytest.mark.parametrize("ff, tied", [("gated-gelu", False), ("relu", True)], ids=["t5_v1_1", "t5_original"])
def test_logits_match_hf_t5_with_padded_encoder_inputs(ff, tied, dtype):
    hf, ours = same_weights(hf_t5(feed_forward_proj=ff, tie_word_embeddings=tied), from_hf_seq2seq, dtype)
    assert ours.config.tie_embeddings == tied
    x, mask = padded_encoder_batch()
    dec = ids(3, 22, seed=6)
    with torch.no_grad():
        a = ours(x, attention_mask=mask, decoder_input_ids=dec)
        b = hf(input_ids=x, attention_mask=mask, decoder_input_ids=dec)
    assert max_rel_err(a.encoder_hidden_states[mask.bool()], b.encoder_last_hidden_state[mask.bool()]) <= TOL[dtype]
    assert max_rel_err(a.logits, b.logits) <= TOL[dtype]


@DTYPES
def test_loss_and_grads_match_hf_t5(dtype):
    hf, ours = same_weights(hf_t5(), from_hf_seq2seq, dtype)
    x, mask = padded_encoder_batch()
    labels = ids(3, 10, seed=7)
    labels[0, 7:] = -100
    ours_loss = ours(x, attention_mask=mask, labels=labels).loss
    hf_loss = hf(input_ids=x, attention_mask=mask, labels=labels).loss
    assert max_rel_err(ours_loss, hf_loss) <= TOL[dtype]
    ours_loss.backward()
    hf_loss.backward()
    ours_p, hf_p = dict(ours.named_parameters()), dict(hf.named_parameters())
    rel_bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    pairs = {
        "encoder.layers.0.self_attn.q_proj.weight": "encoder.block.0.layer.0.SelfAttention.q.weight",
        "decoder.layers.1.cross_attn.v_proj.weight": "decoder.block.1.layer.1.EncDecAttention.v.weight",
        "decoder.layers.2.mlp.gate_proj.weight": "decoder.block.2.layer.2.DenseReluDense.wi_0.weight",
        "decoder.relative_attention_bias.weight": rel_bias,
    }
    for a, b in pairs.items():
        assert hf_p[b].grad.abs().max() > 1e-4, b
        assert max_rel_err(ours_p[a].grad, hf_p[b].grad) <= TOL[dtype], a


def test_greedy_generate_matches_hf_t5_with_padded_batch():
    # HF's T5 cache sizes itself by the encoder depth
    hf, ours = same_weights(hf_t5(num_decoder_layers=2), from_hf_seq2seq, torch.float64)
    x, mask = padded_encoder_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12)
    expected = hf.generate(x, do_sample=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, **kw)
    got = ours.generate(x, eos_token_id=2, **kw)
    assert got[:, 0].eq(0).all()
    assert torch.equal(got, expected)


def test_unsupported_t5_activation_raises():
    cfg = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                   feed_forward_proj="gated-silu")
    with pytest.raises(ValueError, match="'gated-gelu'"):
        config_from_hf_t5(cfg)


# ---------------------------------------------------------------------------------------------- GPT-2

@DTYPES
def test_logits_match_hf_gpt2(dtype):
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                    bos_token_id=1, eos_token_id=2))
    hf, ours = same_weights(randomize(hf), from_hf_gpt2, dtype)
    assert ours.config.norm == "layernorm" and ours.config.pos == "learned" and ours.config.bias
    x = ids(2, 20)
    with torch.no_grad():
        assert max_rel_err(ours(x).logits, hf(x).logits) <= TOL[dtype]
