"""Handwritten transformers: a Llama/GPT-2-style decoder and a T5-style encoder-decoder."""
from .config import PRESETS, ModelConfig, get_config
from .decoder import DecoderLM, LMOutput
from .seq2seq import Seq2SeqLM

__all__ = ["ModelConfig", "get_config", "PRESETS", "DecoderLM", "Seq2SeqLM", "LMOutput"]
