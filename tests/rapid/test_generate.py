import pytest
import torch

from rapid.generate import GenerationConfig, GenerationStats, generate, generate_all
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig


def hf_greedy(lm, prompt, max_new_tokens):
    """transformers' own `generate`, with its stock sdpa attention, as the reference."""
    model = lm.model
    ours = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    finally:
        model.config._attn_implementation = ours
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_hf_generate_tiny(tiny, chunk, seed):
    prompt = torch.randint(0, 255, (37,), generator=torch.Generator().manual_seed(seed)).tolist()
    runner = ModelRunner(tiny.model, prefill_chunk=chunk)
    ours = generate_all(runner, prompt, GenerationConfig(max_new_tokens=24))
    assert ours == hf_greedy(tiny, prompt, 24)


def test_max_new_tokens_and_stop_tokens(tiny_runner):
    prompt = list(range(30, 60))
    free = generate_all(tiny_runner, prompt, GenerationConfig(max_new_tokens=12))
    assert len(free) == 12
    stop = free[4]
    stats = GenerationStats()
    stopped = list(generate(tiny_runner, prompt, GenerationConfig(max_new_tokens=12, stop_token_ids=(stop,)), stats))
    first = free.index(stop)
    assert stopped == free[:first + 1]
    assert stats.stop_reason == "stop" and stats.new_tokens == first + 1


def test_same_seed_same_sample(tiny_runner):
    prompt = list(range(5, 25))
    config = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=7))
    first = generate_all(tiny_runner, prompt, config)
    assert first == generate_all(tiny_runner, prompt, config)
    other = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=8))
    assert first != generate_all(tiny_runner, prompt, other)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


@pytest.mark.slow
def test_greedy_equals_hf_generate_default_model(default_lm):
    tok = default_lm.tokenizer
    messages = [{"role": "user", "content": "Name three rivers in Europe and one fact about each."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    runner = ModelRunner(default_lm.model, prefill_chunk=16)
    ours = generate_all(runner, prompt, GenerationConfig(max_new_tokens=32))
    assert ours == hf_greedy(default_lm, prompt, 32)
