import torch

from rapid.sampling import SamplingConfig, greedy_tokens, sample, warp


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0])
    assert warp(logits, SamplingConfig()).tolist() == [0.0, 1.0, 0.0]


def test_top_k_keeps_k_tokens():
    logits = torch.randn(4, 50)
    probs = warp(logits, SamplingConfig(temperature=1.0, top_k=5))
    assert ((probs > 0).sum(-1) == 5).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = warp(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.2, 0.5, 0.3])
    draws = sample(probs.expand(20000, 3), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert (freq - probs).abs().max() < 0.02


def test_greedy_tokens_take_the_first_of_tied_bf16_logits():
    """Widening bf16 to fp32 is exact, so the ids are torch's bf16 argmax ids, the first on a tie (bf16 ties often)."""
    logits = torch.randn(64, 300).bfloat16()
    logits[:, 17] = logits[:, 200] = 9.0
    assert greedy_tokens(logits).tolist() == [17] * 64
    logits = torch.randn(8, 49152).bfloat16()
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
