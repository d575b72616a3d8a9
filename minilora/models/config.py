"""ModelConfig: every shape and switch of our two transformers, plus named presets.

One dataclass describes both model families:
  - decoder-only (DecoderLM): n_encoder_layers == 0, pos "rope" (Llama) or "learned" (GPT-2);
  - encoder-decoder (Seq2SeqLM): n_encoder_layers > 0, pos "relative" (T5).

    >>> cfg = get_config("decoder-tiny", n_layers=2)
    >>> cfg.num_parameters()      # counted from the shapes, nothing is allocated
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "geglu", "gelu", "relu")  # relu: original T5 (non-gated), for loading such checkpoints
POSITIONS = ("rope", "learned", "relative")


def _close(word, choices) -> str:
    """' Did you mean ...?' for a misspelt choice, or '' when nothing is close."""
    hits = difflib.get_close_matches(str(word), list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""


@dataclass
class ModelConfig:
    """Shapes and switches of a DecoderLM or Seq2SeqLM.

    d_model is the residual width, d_ff the MLP hidden width, n_heads query heads of size head_dim,
    n_kv_heads key/value heads (fewer than n_heads is grouped-query attention, GQA).
    For seq2seq models n_layers counts decoder layers and n_encoder_layers encoder layers.
    """

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_encoder_layers: int = 0
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 384
    max_seq_len: int = 256
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    pos: str = "rope"
    rope_theta: float = 10000.0
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    attn_scale: float | None = None
    bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}; pass e.g. {name}=128.")
        if not isinstance(self.n_encoder_layers, int) or self.n_encoder_layers < 0:
            raise ValueError(
                f"n_encoder_layers must be an int >= 0 (0 for decoder-only models), got {self.n_encoder_layers!r}."
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention "
                f"shares each key/value head among n_heads // n_kv_heads query heads); pick n_kv_heads from "
                f"{[k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]}."
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; change one of them "
                    f"or set head_dim explicitly."
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {self.head_dim}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not supported; choose one of {NORMS}.{_close(self.norm, NORMS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r} is not supported; choose one of {MLPS}.{_close(self.mlp, MLPS)}")
        if self.pos not in POSITIONS:
            raise ValueError(
                f"pos={self.pos!r} is not supported; choose one of {POSITIONS}.{_close(self.pos, POSITIONS)}"
            )
        if self.pos == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"RoPE rotates pairs of dimensions, so head_dim must be even (got {self.head_dim}).")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}; Llama uses 10000.0.")
        if self.pos == "relative" and (self.relative_num_buckets < 2 or self.relative_max_distance < 2):
            raise ValueError("relative_num_buckets and relative_max_distance must be >= 2; T5 uses 32 and 128.")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}; use e.g. 1e-6.")
        if self.attn_scale is not None and self.attn_scale <= 0:
            raise ValueError(
                f"attn_scale must be positive or None (None means 1/sqrt(head_dim)), got {self.attn_scale}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name}={value} is outside the vocabulary [0, {self.vocab_size}); "
                    f"set {name} to an id below vocab_size or raise vocab_size."
                )

    @property
    def is_seq2seq(self) -> bool:
        return self.n_encoder_layers > 0

    def to_dict(self) -> dict:
        """Plain json-safe dict (the config.json stored next to a checkpoint)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = "".join(_close(k, known) for k in unknown)
            raise ValueError(f"unknown ModelConfig keys {unknown}.{hints}")
        return cls(**d)

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (tied embeddings counted once), no model is built."""
        d, hs, f = self.d_model, self.head_dim, self.d_ff
        b = int(self.bias)
        q_dim, kv_dim = self.n_heads * hs, self.n_kv_heads * hs
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = d * q_dim + 2 * d * kv_dim + q_dim * d + b * (q_dim + 2 * kv_dim + d)
        if self.mlp in ("swiglu", "geglu"):
            mlp = 3 * d * f + b * (2 * f + d)
        else:
            mlp = 2 * d * f + b * (f + d)
        layer = attn + mlp + 2 * norm
        total = self.vocab_size * d + self.n_layers * layer + norm
        if not self.tie_embeddings:
            total += self.vocab_size * d
        if self.pos == "learned":
            total += self.max_seq_len * d
        if self.is_seq2seq:
            total += self.n_layers * (attn + norm)  # cross-attention in every decoder layer
            total += self.n_encoder_layers * layer + norm  # encoder layers and its final norm
        if self.pos == "relative":
            stacks = 2 if self.is_seq2seq else 1
            total += stacks * self.relative_num_buckets * self.n_heads
        return total


PRESETS: dict[str, dict] = {
    # CPU lessons: trains in minutes on two cores.
    "decoder-tiny": dict(
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
        norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=True,
    ),
    # CPU lessons that need reasoning (arithmetic, programs, reading, quizzes): a few million parameters,
    # pretrained for longer on a larger corpus (data/README.md, "decoder-base").
    "decoder-base": dict(
        vocab_size=2048, d_model=192, n_layers=6, n_heads=6, n_kv_heads=3, d_ff=512, max_seq_len=256,
        norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=True,
    ),
    # T5 v1.1 style: relative position bias, gated-GELU, untied head; unlike T5, the standard 1/sqrt(head_dim)
    # attention scaling (attn_scale=None), which pretrained far better at this size (data/README.md).
    # Weights loaded from HF T5 (models/hf.py) get T5's attn_scale=1.0.
    "seq2seq-tiny": dict(
        vocab_size=2048, d_model=128, n_encoder_layers=3, n_layers=3, n_heads=4, d_ff=384, max_seq_len=256,
        norm="rmsnorm", mlp="geglu", pos="relative", attn_scale=None, tie_embeddings=False,
    ),
    # GPU lessons: same tokenizer, wider and deeper.
    "decoder-small": dict(
        vocab_size=2048, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536, max_seq_len=512,
        norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=True,
    ),
    "seq2seq-small": dict(
        vocab_size=2048, d_model=512, n_encoder_layers=8, n_layers=8, n_heads=8, head_dim=64, d_ff=1024,
        max_seq_len=512, norm="rmsnorm", mlp="geglu", pos="relative", attn_scale=None, tie_embeddings=False,
    ),
    # Published shapes, for parameter counts and for loading real checkpoints on a GPU.
    "gpt2-124m": dict(
        vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024, norm="layernorm",
        norm_eps=1e-5, mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
    ),
    # Llama-3.2-1B without its "llama3" long-context RoPE rescaling, so max_seq_len stays at 8192.
    "llama-1b": dict(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
        max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", pos="rope", rope_theta=500000.0,
        tie_embeddings=True,
    ),
    "llama-7b": dict(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096, norm="rmsnorm",
        norm_eps=1e-5, mlp="swiglu", pos="rope", tie_embeddings=False,
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with any field overridden: get_config("decoder-tiny", n_layers=2)."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {name!r}.{_close(name, PRESETS)} Available presets: {', '.join(PRESETS)}."
        )
    valid = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        hints = "".join(_close(k, valid) for k in unknown)
        raise ValueError(f"unknown ModelConfig field(s) {unknown} in overrides.{hints}")
    return ModelConfig(**{**PRESETS[name], **overrides})
