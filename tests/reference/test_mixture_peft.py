"""The mixture of the four committed task adapters against peft's add_weighted_adapter on the Hugging Face Llama
that holds decoder-base's weights, in float64:
- exact mixing with fixed weights w equals peft's "cat" combination, whose Delta W is sum_i w_i s_i B_i A_i;
- faithful mixing with equal weights equals peft's "linear" combination. Today's peft puts sqrt(w_i s_i) on
  both A_i and B_i; the old peft that LoRA-TLE ran put w_i s_i on A_i and nothing on B_i. With every w_i s_i
  equal the two are the same matrix, (sum_j B_j)(sum_i c A_i), cross terms included."""

import peft
import pytest
import torch

import minilora as ml
from minilora import task_adapters as TA
from minilora.models.hf import to_hf_llama
from minilora.tasks import DECODER_TASKS


# peft's "linear" turns the sqrt(w_i s_i) into a float32 tensor (torch.tensor of Python floats), so each factor
# carries float32 rounding, ~6e-8 relative: the logits then agree to ~2e-7 of their size, not to 1e-10.
@pytest.mark.parametrize("mode, weights, combination, tol", [
    ("exact", [0.4, 0.3, 0.2, 0.1], "cat", 1e-10), ("faithful", [0.25] * 4, "linear", 1e-6)])
def test_mixture_equals_peft_weighted_adapter(mode, weights, combination, tol):
    tok = ml.load_tokenizer()
    ids = torch.tensor([tok.encode(ml.full_text(ml.load_task(t, "test")[0]), add_bos=True) for t in ("reading",)])
    ours = TA.load_task_adapters(ml.load_base(TA.BASE).double()).eval()
    hf = to_hf_llama(ml.load_base(TA.BASE)).double().eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(TA.adapter_dir(DECODER_TASKS[0])), adapter_name=DECODER_TASKS[0])
    for task in DECODER_TASKS[1:]:
        theirs.load_adapter(str(TA.adapter_dir(task)), adapter_name=task)
    theirs = theirs.double().eval()
    theirs.add_weighted_adapter(list(DECODER_TASKS), weights, "mix", combination_type=combination)
    theirs.set_adapter("mix")
    with torch.no_grad():
        with ml.Mixture(ours, list(DECODER_TASKS), mode=mode) as mix:
            mix.set_weights(torch.tensor([weights], dtype=torch.float64))
            mine = ours(input_ids=ids).logits
        ref = theirs(input_ids=ids).logits
        with ml.disable_adapters(ours):
            plain = ours(input_ids=ids).logits
    assert (mine - ref).abs().max() <= tol * ref.abs().max()
    assert (mine - plain).abs().max() > 1e-2  # the mixture changes the logits: the comparison can fail
