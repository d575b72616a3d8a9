"""The committed task adapters (data/adapters/<task>/) are peft files: peft loads each onto the Hugging Face
Llama that holds decoder-base's weights, and its logits equal ours with the same adapter. Compared in float64,
where anything but summation order would show far above 1e-10."""

import peft
import pytest
import torch

import minilora as ml
from minilora import task_adapters as TA
from minilora.models.hf import to_hf_llama
from minilora.tasks import DECODER_TASKS


@pytest.mark.parametrize("task", DECODER_TASKS)
def test_peft_loads_the_committed_adapter_and_gives_our_logits(task):
    tok = ml.load_tokenizer()
    example = ml.load_task(task, "test")[0]
    ids = torch.tensor([tok.encode(ml.full_text(example), add_bos=True)])
    ours = TA.load_task_adapters(ml.load_base(TA.BASE).double(), [task])
    hf = to_hf_llama(ml.load_base(TA.BASE)).double().eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(TA.adapter_dir(task))).double().eval()
    with torch.no_grad():
        mine, ref = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        with ml.disable_adapters(ours):
            plain = ours(input_ids=ids).logits
    assert (mine - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert (mine - plain).abs().max() > 1e-2  # the adapter changes the logits: the comparison can fail
