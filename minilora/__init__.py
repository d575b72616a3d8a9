"""minilora: parameter-efficient fine-tuning from scratch in plain PyTorch.

    import minilora as ml
    base = ml.load_base("decoder-tiny")
    ml.inject(base, ml.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
"""

from minilora.inject import (
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    inject,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_report,
    unmerge,
)
from minilora.io import adapter_state_dict, load_adapter, save_adapter
from minilora.methods.adalora import AdaLoraConfig, AdaLoraLayer, orthogonal_penalty
from minilora.methods.adalora_budget import RankAllocator, budget_at, prune
from minilora.methods.hyper import AlignmentAdapter, AlignmentConfig
from minilora.methods.hyperformer import TaskHyperAdapter, TaskHyperConfig
from minilora.methods.mixture import Mixture
from minilora.methods.router import MeanPooledEmbedder, Router, RouterConfig
from minilora.methods.ia3 import IA3Config, IA3Layer
from minilora.methods.lora import LoraConfig, LoraLayer
from minilora.methods.nf4 import NF4Tensor, dequantize, quantize
from minilora.methods.qlora import Linear4bit, LoraLinear4bit, dequantize_model, quantize_model
from minilora.models import PRESETS, DecoderLM, LMOutput, ModelConfig, Seq2SeqLM, get_config
from minilora.pretrain import load_base
from minilora.tasks import DECODER_TASKS, SEQ2SEQ_TASKS, TASKS, format_prompt, full_text, load_corpus, load_task
from minilora.tokenizer import Tokenizer, load_tokenizer
from minilora.train import TrainConfig, encode_examples, evaluate, exact_match, generate_answers, train

__all__ = [
    # models
    "ModelConfig", "get_config", "PRESETS", "DecoderLM", "Seq2SeqLM", "LMOutput", "load_base",
    # data
    "TASKS", "DECODER_TASKS", "SEQ2SEQ_TASKS", "load_task", "load_corpus", "format_prompt", "full_text",
    "Tokenizer", "load_tokenizer",
    # LoRA
    "LoraConfig", "LoraLayer", "inject", "trainable_report", "merge", "unmerge", "merge_and_unload", "set_adapter",
    "disable_adapters", "delete_adapter", "add_weighted_adapter", "save_adapter", "load_adapter", "adapter_state_dict",
    # IA3
    "IA3Config", "IA3Layer",
    # AdaLoRA
    "AdaLoraConfig", "AdaLoraLayer", "RankAllocator", "orthogonal_penalty", "budget_at", "prune",
    # hypernetwork adapters (encoder-decoder)
    "AlignmentAdapter", "AlignmentConfig", "TaskHyperAdapter", "TaskHyperConfig",
    # token-level mixture of LoRA experts: the router and the mixing
    "Router", "RouterConfig", "MeanPooledEmbedder", "Mixture",
    # QLoRA / NF4
    "NF4Tensor", "quantize", "dequantize", "Linear4bit", "LoraLinear4bit", "quantize_model", "dequantize_model",
    # training
    "TrainConfig", "train", "encode_examples", "evaluate", "exact_match", "generate_answers",
]
