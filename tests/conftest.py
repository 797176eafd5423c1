import pytest
import torch

from rapid.models import ModelSpec, load_model
from rapid.runner import ModelRunner

torch.set_num_threads(1)  # two busy threads on a shared 2-core machine run many times slower


@pytest.fixture(scope="session")
def tiny():
    """The tiny random preset (3 layers, GQA 4/2 heads, byte tokenizer), fp32 on CPU."""
    return load_model(ModelSpec("tiny", device="cpu"))


@pytest.fixture(scope="session")
def tiny_runner(tiny):
    return ModelRunner(tiny.model, prefill_chunk=16)


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M-Instruct), pulled on first use."""
    return load_model(ModelSpec("default", device="cpu"))
