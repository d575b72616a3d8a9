"""Checkers for the exercise notebooks: `from minilora import checks; checks.lora_forward(fn)`.

core.py holds the machinery (and says how to write a checker); each lesson's checkers are in lessonNN.py.
"""

from .core import ExerciseError, passed
from .lesson01 import lora_param_count, lora_forward, wrapped_modules, merge_unmerge, lora_linear
from .lesson02 import nf4_storage_bytes, nf4_codes, pack_unpack, dequantize_nf4, qlora_forward

__all__ = ["ExerciseError", "passed",
           "lora_param_count", "lora_forward", "wrapped_modules", "merge_unmerge", "lora_linear",
           "nf4_storage_bytes", "nf4_codes", "pack_unpack", "dequantize_nf4", "qlora_forward"]
