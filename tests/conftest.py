import os

import pytest
import torch

# The test models are tiny: one thread is fastest and cannot oversubscribe a 2-core machine. The suite must
# pass with any thread count (other summation orders): MINILORA_THREADS=2 runs it with two.
torch.set_num_threads(int(os.environ.get("MINILORA_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
