"""Checkers for the exercise notebooks: `from minilora import checks; checks.lora_forward(fn)`.

core.py holds the machinery (and says how to write a checker); each lesson's checkers are in lessonNN.py.
"""

from .core import ExerciseError, passed
from .lesson01 import lora_param_count, lora_forward, wrapped_modules, merge_unmerge, lora_linear
from .lesson02 import nf4_storage_bytes, nf4_codes, pack_unpack, dequantize_nf4, qlora_forward
from .lesson03 import dora_magnitude, dora_forward, dora_norm, dora_merge, dora_linear
from .lesson05 import ia3_param_count, ia3_forward, ia3_vector_shapes, ia3_merge_unmerge, ia3_mixed_batch
from .lesson06 import alignment_param_count, generate_prefix, prefix_branch, hyperformer_param_count, task_adapter
from .lesson07 import tle_weights, mixed_lora_output, faithful_delta_weight, position_weights
from .lesson09 import adamw_state_bytes, checkpointed_bytes, largest_batch, segment_checkpointed_bytes

__all__ = ["ExerciseError", "passed",
           "lora_param_count", "lora_forward", "wrapped_modules", "merge_unmerge", "lora_linear",
           "nf4_storage_bytes", "nf4_codes", "pack_unpack", "dequantize_nf4", "qlora_forward",
           "dora_magnitude", "dora_forward", "dora_norm", "dora_merge", "dora_linear",
           "ia3_param_count", "ia3_forward", "ia3_vector_shapes", "ia3_merge_unmerge", "ia3_mixed_batch",
           "alignment_param_count", "generate_prefix", "prefix_branch", "hyperformer_param_count", "task_adapter",
           "tle_weights", "mixed_lora_output", "faithful_delta_weight", "position_weights",
           "adamw_state_bytes", "checkpointed_bytes", "largest_batch", "segment_checkpointed_bytes"]
