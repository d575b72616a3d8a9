"""Unit specifications of minilora.models (CPU, tiny random models; comparisons with HF live in tests/reference)."""
import json

import pytest
import torch
import torch.nn.functional as F

from minilora.models import PRESETS, DecoderLM, LMOutput, ModelConfig, Seq2SeqLM, get_config
from minilora.models.blocks import attention_bias, attention_reference, relative_position_bucket
from minilora.models.decoder import select_next_token
from minilora.models.seq2seq import shift_right

from adapters import max_rel_err

V = 64


def tiny_decoder(**overrides):
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48)
    kw.update(overrides)
    return DecoderLM(ModelConfig(**kw)).eval()


def tiny_seq2seq(**overrides):
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_encoder_layers=2, n_heads=4, d_ff=64, max_seq_len=48,
              pos="relative", mlp="geglu", attn_scale=1.0, relative_num_buckets=8, relative_max_distance=16)
    kw.update(overrides)
    return Seq2SeqLM(ModelConfig(**kw)).eval()


def rand_ids(B, T, seed=0, low=3):
    return torch.randint(low, V, (B, T), generator=torch.Generator().manual_seed(seed))


# Two computations that differ only in summation order (another matmul shape, a cache): 1e-10 of the output
# scale in float64; in fp32 rounding moves each reduction by a few eps (1.2e-7), so 1e-5 leaves room for any
# thread count or CPU kernel. Token-level comparisons (generate) run in float64, where no near-tie flips an argmax.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


# ---------------------------------------------------------------------------------------------- config

def test_get_config_returns_preset_with_overrides():
    cfg = get_config("decoder-tiny", n_layers=2)
    shapes = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff)
    assert shapes == (2048, 128, 2, 4, 2, 384)
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.max_seq_len) == ("rope", "rmsnorm", "swiglu", 256)
    s2s = get_config("seq2seq-tiny")
    # T5 layout with standard 1/sqrt(head_dim) scaling (None); HF T5 itself loads with attn_scale=1.0
    assert (s2s.n_encoder_layers, s2s.n_layers, s2s.pos, s2s.mlp, s2s.attn_scale) == (3, 3, "relative", "geglu", None)
    assert set(PRESETS) >= {"decoder-tiny", "seq2seq-tiny", "decoder-small", "gpt2-124m", "llama-1b", "llama-7b",
                            "seq2seq-small"}


def test_unknown_preset_error_lists_close_names():
    with pytest.raises(ValueError, match="Did you mean 'decoder-tiny'") as err:
        get_config("decoder_tiny")
    assert "Available presets" in str(err.value)
    with pytest.raises(ValueError, match="Did you mean 'n_layers'"):
        get_config("decoder-tiny", n_layer=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=4, n_kv_heads=3), r"multiple of n_kv_heads=3.*\[1, 2, 4\]"),
    (dict(d_model=30, n_heads=4), "not divisible by n_heads=4"),
    (dict(norm="rms"), "Did you mean 'rmsnorm'"),
    (dict(mlp="swiglue"), "Did you mean 'swiglu'"),
    (dict(pos="rotary"), "choose one of"),
    (dict(d_model=36, n_heads=4, head_dim=9), "head_dim must be even"),
    (dict(eos_token_id=64, vocab_size=64), "eos_token_id=64 is outside the vocabulary"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(d_ff=0), "d_ff must be a positive int"),
])
def test_config_validation_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_dict_round_trip_is_json_safe():
    cfg = get_config("seq2seq-tiny", dropout=0.1)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**d, "hidden_size": 3})


def test_defaults_resolve_kv_heads_and_head_dim():
    cfg = ModelConfig(d_model=96, n_heads=6)
    assert cfg.n_kv_heads == 6 and cfg.head_dim == 16


def test_preset_parameter_counts_match_published_numbers():
    # GPT-2 small as counted by HF GPT2LMHeadModel (tied head counted once); Llama-2-7B; Llama-3.2-1B
    assert get_config("gpt2-124m").num_parameters() == 124_439_808
    assert get_config("llama-7b").num_parameters() == 6_738_415_616
    assert get_config("llama-1b").num_parameters() == 1_235_814_400


@pytest.mark.parametrize("build", [
    lambda: tiny_decoder(),
    lambda: tiny_decoder(tie_embeddings=True, n_kv_heads=1),
    lambda: tiny_decoder(norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=True),
    lambda: tiny_decoder(head_dim=12, bias=True),
    lambda: tiny_seq2seq(),
    lambda: tiny_seq2seq(mlp="relu", tie_embeddings=True, n_layers=3),
], ids=["llama", "tied_mqa", "gpt2", "head_dim_bias", "t5_v1_1", "t5_original"])
def test_num_parameters_equals_instantiated_count(build):
    model = build()
    assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_tiny_presets_instantiate_with_expected_sizes():
    assert DecoderLM(get_config("decoder-tiny")).config.num_parameters() == 1_049_728
    assert Seq2SeqLM(get_config("seq2seq-tiny")).config.num_parameters() == 2_001_280


# ---------------------------------------------------------------------------------------------- names

def test_decoder_state_dict_uses_hf_llama_names_and_no_rotary_buffers():
    keys = set(tiny_decoder().state_dict())
    for k in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
              "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight", "lm_head.weight"):
        assert k in keys, k
    assert not any("rotary" in k or "inv_freq" in k for k in keys)
    gpt2 = tiny_decoder(norm="layernorm", pos="learned", mlp="gelu", bias=True)
    assert "model.embed_positions.weight" in gpt2.state_dict()
    assert not any("gate_proj" in k for k in gpt2.state_dict())


def test_seq2seq_state_dict_names():
    keys = set(tiny_seq2seq().state_dict())
    for k in ("shared.weight", "encoder.layers.0.self_attn.k_proj.weight", "encoder.layers.1.mlp.gate_proj.weight",
              "decoder.layers.1.cross_attn.q_proj.weight", "decoder.layers.0.cross_attn_layernorm.weight",
              "decoder.layers.0.mlp.down_proj.weight", "encoder.norm.weight", "decoder.norm.weight",
              "encoder.relative_attention_bias.weight", "lm_head.weight"):
        assert k in keys, k


def test_tied_embeddings_share_one_tensor():
    m = tiny_decoder(tie_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    s = tiny_seq2seq(tie_embeddings=True)
    assert s.lm_head.weight is s.shared.weight


# ---------------------------------------------------------------------------------------------- blocks

def test_sdpa_attention_equals_plain_softmax_attention():
    q, k, v = torch.randn(3, 2, 4, 5, 8, dtype=torch.float64).unbind(0)  # each (B, nh, T, hs)
    bias = attention_bias(5, 5, causal=True, key_padding_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
    fast = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.double(), scale=0.3)
    assert max_rel_err(fast, attention_reference(q, k, v, bias.double(), 0.3)) < TOL[torch.float64]


def test_attention_bias_masks_future_and_padding():
    bias = attention_bias(2, 4, causal=True, key_padding_mask=torch.tensor([[0, 1, 1, 1]]))
    allowed = bias[0, 0] == 0  # queries are positions 2 and 3
    assert allowed.tolist() == [[False, True, True, False], [False, True, True, True]]


def test_relative_position_buckets_follow_t5():
    rel = torch.arange(-20, 21)
    bi = relative_position_bucket(rel, bidirectional=True, num_buckets=8, max_distance=16)
    # 4 buckets per direction: distances 0 and 1 exact, then 2-5 and >= 6 share logarithmic buckets
    assert bi[rel == 0].item() == 0 and bi[rel == -1].item() == 1 and bi[rel == 1].item() == 5
    assert bi[rel == -20].item() == bi[rel == -16].item() == 3 and bi[rel == 20].item() == 7
    causal = relative_position_bucket(rel, bidirectional=False, num_buckets=8, max_distance=16)
    assert (causal[rel >= 0] == 0).all() and causal[rel == -3].item() == 3 and causal[rel == -20].item() == 7


# ---------------------------------------------------------------------------------------------- forward / loss

def test_forward_returns_lm_output_and_loss_equals_shifted_cross_entropy():
    m = tiny_decoder()
    x = rand_ids(2, 10)
    labels = x.clone()
    labels[0, :4] = -100
    out = m(x, labels=labels)
    assert isinstance(out, LMOutput) and out.logits.shape == (2, 10, V) and out.past_key_values is None
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual)


def test_seq2seq_decoder_inputs_are_labels_shifted_right():
    labels = torch.tensor([[5, 6, 7, -100]])
    assert shift_right(labels, start_id=0, pad_id=0).tolist() == [[0, 5, 6, 7]]
    m = tiny_seq2seq()
    x = rand_ids(2, 9)
    y = rand_ids(2, 5, seed=1)
    a = m(x, labels=y)
    b = m(x, decoder_input_ids=shift_right(y, 0, 0))
    assert torch.equal(a.logits, b.logits)  # the same operations on the same inputs: the same bits
    assert a.encoder_hidden_states.shape == (2, 9, 32)
    assert torch.allclose(a.loss, F.cross_entropy(a.logits.reshape(-1, V), y.reshape(-1)))


def test_too_long_input_raises_naming_the_limit():
    m = tiny_decoder()
    with pytest.raises(ValueError, match="exceeds max_seq_len=48"):
        m(rand_ids(1, 49))
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(rand_ids(1, 40), max_new_tokens=9)
    with pytest.raises(ValueError, match="exceeds max_seq_len=48"):
        tiny_seq2seq().encode(rand_ids(1, 49))


def test_ids_outside_vocab_raise():
    x = rand_ids(1, 5)
    x[0, 2] = V
    with pytest.raises(ValueError, match=f"outside \\[0, vocab_size={V}\\)"):
        tiny_decoder()(x)
    with pytest.raises(ValueError, match="decoder_input_ids contain ids outside"):
        tiny_seq2seq()(rand_ids(1, 5), decoder_input_ids=x)


def test_models_refuse_the_other_family_config():
    with pytest.raises(ValueError, match="use Seq2SeqLM"):
        DecoderLM(get_config("seq2seq-tiny"))
    with pytest.raises(ValueError, match="n_encoder_layers > 0"):
        Seq2SeqLM(get_config("decoder-tiny"))


def test_dropout_only_in_training():
    m = tiny_decoder(dropout=0.5)
    x = rand_ids(1, 8)
    assert torch.equal(m(x).logits, m(x).logits)  # eval: the same operations twice give the same bits
    m.train()
    assert not torch.equal(m(x).logits, m(x).logits)


# ---------------------------------------------------------------------------------------------- KV cache

@DTYPES
def test_cached_logits_equal_full_forward_logits(dtype):
    m = tiny_decoder().to(dtype)
    x = rand_ids(2, 12)
    full = m(x).logits
    out = m(x[:, :8], use_cache=True)
    step = m(x[:, 8:], past_key_values=out.past_key_values, use_cache=True)
    assert len(step.past_key_values) == 2 and step.past_key_values[0][0].shape == (2, 2, 12, 8)  # (B, n_kv, T, hs)
    assert max_rel_err(step.logits, full[:, 8:]) < TOL[dtype]


@pytest.mark.parametrize("variant", [dict(), dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)],
                         ids=["llama", "gpt2"])
def test_cached_and_uncached_decoding_give_identical_tokens_decoder(variant):
    m = tiny_decoder(**variant).double()
    x = rand_ids(2, 6)
    a = m.generate(x, max_new_tokens=12, use_cache=True, eos_token_id=-1)
    b = m.generate(x, max_new_tokens=12, use_cache=False, eos_token_id=-1)
    assert a.shape == (2, 18) and torch.equal(a, b)


def test_cached_and_uncached_decoding_give_identical_tokens_seq2seq():
    m = tiny_seq2seq().double()
    x = rand_ids(2, 20)
    a = m.generate(x, max_new_tokens=20, use_cache=True, eos_token_id=-1)
    b = m.generate(x, max_new_tokens=20, use_cache=False, eos_token_id=-1)
    assert a.shape == (2, 21) and a[:, 0].eq(0).all() and torch.equal(a, b)


@DTYPES
def test_seq2seq_cached_step_logits_equal_full_decode(dtype):
    m = tiny_seq2seq().to(dtype)
    x, y = rand_ids(2, 11), rand_ids(2, 20, seed=3)
    enc = m.encode(x)
    full = m(encoder_outputs=enc, decoder_input_ids=y).logits
    out = m(encoder_outputs=enc, decoder_input_ids=y[:, :15], use_cache=True)
    self_k, self_v, cross_k, cross_v = out.past_key_values[0]
    assert self_k.shape == (2, 4, 15, 8) and cross_k.shape == (2, 4, 11, 8)  # (B, nh, T, hs)
    step = m(encoder_outputs=enc, decoder_input_ids=y[:, 15:], past_key_values=out.past_key_values, use_cache=True)
    assert max_rel_err(step.logits, full[:, 15:]) < TOL[dtype]
    assert step.past_key_values[0][2] is cross_k  # cross-attention K/V computed once, then reused


# ---------------------------------------------------------------------------------------------- generate

def test_left_padded_batch_generate_equals_per_row_generate():
    m = tiny_decoder().double()
    prompts = [rand_ids(1, n, seed=n)[0] for n in (3, 7, 5)]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, 1
    together = m.generate(batch, max_new_tokens=10, attention_mask=mask, eos_token_id=-1)
    for i, p in enumerate(prompts):
        alone = m.generate(p[None], max_new_tokens=10, eos_token_id=-1)
        assert torch.equal(together[i, T:], alone[0, len(p):]), i


def test_padded_encoder_batch_generate_equals_per_row_generate_seq2seq():
    m = tiny_seq2seq().double()
    rows = [rand_ids(1, n, seed=n)[0] for n in (4, 9)]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)], mask[i, :len(r)] = r, 1
    together = m.generate(batch, max_new_tokens=8, attention_mask=mask, eos_token_id=-1)
    for i, r in enumerate(rows):
        assert torch.equal(together[i], m.generate(r[None], max_new_tokens=8, eos_token_id=-1)[0]), i


def test_generate_stops_when_every_row_has_eos_and_pads_finished_rows():
    m = tiny_decoder().double()
    x = rand_ids(2, 4)
    free = m.generate(x, max_new_tokens=6, eos_token_id=-1)
    eos = int(free[0, 4])  # row 0's first new token
    out = m.generate(x, max_new_tokens=6, eos_token_id=eos)
    assert out[0, 4] == eos and (out[0, 5:] == m.config.pad_token_id).all()
    if (out[1, 4:] == eos).any():
        assert out.shape[1] <= 10
    else:
        assert out.shape == (2, 10)


def test_sampling_is_reproducible_with_a_generator_and_top_k_1_is_greedy():
    m = tiny_decoder().double()
    x = rand_ids(2, 5)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=-1)
    a = m.generate(x, generator=torch.Generator().manual_seed(1), **kw)
    b = m.generate(x, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    greedy = m.generate(x, max_new_tokens=8, eos_token_id=-1)
    assert torch.equal(m.generate(x, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=-1), greedy)


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([select_next_token(logits, True, top_p=0.75, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.75, so tokens 2 and 3 are dropped


# ---------------------------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("build", [tiny_decoder, tiny_seq2seq], ids=["decoder", "seq2seq"])
def test_gradient_checkpointing_gives_the_same_grads(build):
    model = build(dropout=0.1).train()
    x, y = rand_ids(2, 10), rand_ids(2, 10, seed=2)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(0)  # same dropout masks in both runs
        out = model(x, labels=y) if isinstance(model, Seq2SeqLM) else model(x, labels=x)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():  # the recomputed forward runs the same operations: equal up to fp32 rounding
        assert max_rel_err(grads[1][name], g) < TOL[torch.float32], name
