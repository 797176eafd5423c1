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


@pytest.fixture(scope="session")
def tiny_bf16_runner():
    """The tiny preset in bf16, where any difference in summation order shows up in the logits."""
    return ModelRunner(load_model(ModelSpec("tiny", device="cpu", dtype="bfloat16")).model, prefill_chunk=256)


@pytest.fixture(scope="session")
def path_tree():
    """A greedy path of 5 tokens placed inside an 8-node tree at slots 0, 2, 3, 5, 7, with siblings of other
    tokens between them: path_tree(path) -> tokens [8], depths [8], tree mask [8, 8], slots."""
    slots, parents = [0, 2, 3, 5, 7], [-1, 0, 0, 2, 3, 3, 5, 5]

    def build(path: list[int]):
        tokens = torch.tensor([(node + 1) % 250 for node in range(8)])
        tokens[slots] = torch.tensor(path)
        depths, mask = torch.zeros(8, dtype=torch.long), torch.eye(8, dtype=torch.bool)
        for node, parent in enumerate(parents):
            while parent >= 0:
                mask[node, parent] = True
                parent = parents[parent]
            depths[node] = int(mask[node].sum()) - 1
        return tokens, depths, mask, slots

    return build


@pytest.fixture(scope="session")
def greedy_steps():
    """greedy_steps(runner, cache, token, n) -> the n tokens decoded greedily from `token` (it first), the logits
    after each, and the token after the last."""

    def decode(runner, cache, token: int, n: int):
        path, steps = [], []
        for _ in range(n):
            path.append(token)
            steps.append(runner.decode(cache, token))
            token = int(steps[-1].argmax())
        return path, steps, token

    return decode
