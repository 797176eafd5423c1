"""Verification invariants on a toy bigram target and drafter over a 4-token vocabulary.

A multi-step loop (draft a tree, accept, emit, repeat) generates the first few tokens many times;
their empirical joint distribution must converge to the target's.
"""

import itertools

import pytest
import torch

from rapid.sampling import SamplingConfig
from rapid.tree import SOURCE_DRAFT, SOURCE_RETRIEVAL, TokenTree
from rapid.verify import VerifyConfig, accept, accept_greedy, rapid_target

V = 4
TARGET = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.3, 0.1, 0.5, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
DRAFT = torch.tensor([[0.2, 0.4, 0.3, 0.1], [0.1, 0.1, 0.7, 0.1], [0.4, 0.2, 0.2, 0.2], [0.5, 0.3, 0.1, 0.1]])
SAMPLING = SamplingConfig(temperature=1.0)


def build_tree(root: int, shape: str, gen: torch.Generator) -> TokenTree:
    """'chain': two sampled nodes; 'tree': a sampled chain plus deterministic retrieval children."""
    tree = TokenTree.root(root)
    node = 0
    for _ in range(2):
        probs = DRAFT[tree.tokens[node]]
        token = int(torch.multinomial(probs, 1, generator=gen))
        if shape == "tree":
            tree.add(node, (token + 1) % V, 0.5, SOURCE_RETRIEVAL)
            tree.add(node, (token + 2) % V, 0.4, SOURCE_RETRIEVAL)
        node = tree.add(node, token, 0.5, SOURCE_DRAFT, probs)
    return tree


def target_logits(tree: TokenTree) -> torch.Tensor:
    return torch.log(TARGET[torch.tensor(tree.tokens)])


def generate(shape: str, n_tokens: int, gen: torch.Generator, config: VerifyConfig) -> tuple[int, ...]:
    out, root = [], 0
    while len(out) < n_tokens:
        tree = build_tree(root, shape, gen)
        acceptance = accept(tree, target_logits(tree), config, gen)
        out += [tree.tokens[i] for i in acceptance.path[1:]] + [acceptance.bonus]
        root = out[-1]
    return tuple(out[:n_tokens])


def total_variation(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> float:
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    return 0.5 * sum(abs(counts.get(k, 0) / len(samples) - p) for k, p in expected.items())


def target_joint(n_tokens: int) -> dict[tuple[int, ...], float]:
    joint = {}
    for seq in itertools.product(range(V), repeat=n_tokens):
        p, prev = 1.0, 0
        for token in seq:
            p *= float(TARGET[prev, token])
            prev = token
        joint[seq] = p
    return joint


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_sampling_preserves_the_target_distribution(shape):
    gen = torch.Generator().manual_seed(0)
    config = VerifyConfig(sampling=SAMPLING)
    expected = target_joint(2)
    samples = [generate(shape, 2, gen, config) for _ in range(6000)]
    small, large = total_variation(samples[:500], expected), total_variation(samples, expected)
    assert large < 0.035  # sampling noise alone is about 0.02 here
    assert large < small


def test_eta_zero_is_standard_speculative_sampling():
    draft, target = DRAFT[0], TARGET[0]
    assert torch.equal(rapid_target(target, draft, eta=0.0, plausibility=0.1), target)
    # one sampled child: accept w.p. min(1, p/q), else draw from normalize(max(p - q, 0))
    tree = TokenTree.root(0)
    tree.add(0, 1, 0.4, SOURCE_DRAFT, draft)
    logits = torch.log(TARGET[torch.tensor(tree.tokens)])
    gen = torch.Generator().manual_seed(1)
    firsts = []
    for _ in range(8000):
        acceptance = accept(tree, logits, VerifyConfig(sampling=SAMPLING), gen)
        firsts.append(tree.tokens[acceptance.path[1]] if acceptance.num_accepted else acceptance.bonus)
    accept_prob = min(1.0, float(target[1] / draft[1]))
    residual = torch.clamp(target - draft, min=0)
    residual /= residual.sum()
    # the proposal was fixed at token 1 here, so this checks the acceptance rule and residual
    expected = (1 - accept_prob) * residual
    expected[1] += accept_prob
    freq = torch.bincount(torch.tensor(firsts), minlength=V).float() / len(firsts)
    assert (freq - expected).abs().max() < 0.025


def test_eta_positive_follows_the_rapid_formulas():
    eta, plaus = 2.0, 0.1
    draft, target = DRAFT[0], TARGET[0]
    shifted = rapid_target(target, draft, eta, plaus)
    assert not torch.allclose(shifted, target)
    accept_probs = torch.clamp(shifted / draft, max=1.0)
    residual = torch.clamp(torch.maximum(target - shifted, target - draft), min=0)
    residual /= residual.sum()
    expected = draft * accept_probs + (1 - (draft * accept_probs).sum()) * residual
    gen = torch.Generator().manual_seed(2)
    config = VerifyConfig(sampling=SAMPLING, eta=eta, plausibility=plaus)
    firsts = []
    for _ in range(8000):
        tree = TokenTree.root(0)
        token = int(torch.multinomial(draft, 1, generator=gen))
        tree.add(0, token, 0.5, SOURCE_DRAFT, draft)
        acceptance = accept(tree, torch.log(TARGET[torch.tensor(tree.tokens)]), config, gen)
        firsts.append(token if acceptance.num_accepted else acceptance.bonus)
    freq = torch.bincount(torch.tensor(firsts), minlength=V).float() / len(firsts)
    assert (freq - expected).abs().max() < 0.025
    assert (freq - target).abs().max() > 0.03  # it really moved away from the target


def test_greedy_follows_argmax_and_adds_the_bonus():
    tree = TokenTree.root(0)
    a = tree.add(0, 1, 0.5, SOURCE_DRAFT)
    tree.add(0, 2, 0.4, SOURCE_DRAFT)
    tree.add(a, 3, 0.3, SOURCE_DRAFT)
    logits = torch.zeros(4, V)
    logits[0, 1] = logits[1, 2] = 5  # root wants 1 (accepted), node 1 wants 2 (not drafted: bonus)
    acceptance = accept_greedy(tree, logits)
    assert acceptance.path == [0, 1] and acceptance.bonus == 2


def test_bad_verify_config():
    with pytest.raises(ValueError):
        VerifyConfig(eta=-1)
