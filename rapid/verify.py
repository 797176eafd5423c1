"""Accepting a token tree against the target's logits at every node.

- Greedy: follow the child whose token is the target's argmax; the argmax after the last accepted node
  is the bonus token. The output is token for token the target's greedy output.
- Sampling (recursive rejection sampling, as in SpecInfer / multi-draft speculative decoding): at a
  node, try its children in order; accept child c with probability min(1, r[c] / q_c[c]) where r is
  the current residual target (initially `target_probs`) and q_c the distribution c was drawn from
  (one-hot for deterministic nodes); after a rejection r <- normalize(max(r - q_c, 0)). If no child is
  accepted, the bonus token is drawn from r. This preserves the target distribution exactly.
- RAPID (eta > 0, opt-in): at a sampled child, the target is shifted toward the drafter,
  target_hat = normalize(target_probs * exp(eta * (draft_probs - target_probs) * plausible)), accepted
  with min(1, target_hat / draft_probs), residual normalize(max(target_probs - target_hat,
  target_probs - draft_probs)^+). `plausible` limits the shift to tokens whose target probability is
  within a factor `plausibility` of the most likely one. This changes the output distribution toward
  the RAG drafter on purpose; eta = 0 is standard speculative sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rapid.sampling import SamplingConfig, greedy_tokens, sample, warp
from rapid.tree import TokenTree


@dataclass(frozen=True)
class VerifyConfig:
    sampling: SamplingConfig = SamplingConfig()
    eta: float = 0.0  # RAPID retrieval-augmented target; 0 = exact target distribution
    plausibility: float = 0.1

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not 0 <= self.plausibility <= 1:
            raise ValueError(f"plausibility must be in [0, 1], got {self.plausibility}")


@dataclass
class Acceptance:
    path: list[int]  # accepted node indices, root first (the root is always "accepted")
    bonus: int  # the token the target contributes after the last accepted node

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


def _normalize(x: torch.Tensor) -> torch.Tensor | None:
    total = x.sum()
    return x / total if total > 0 else None


def rapid_target(target_probs: torch.Tensor, draft_probs: torch.Tensor, eta: float,
                 plausibility: float) -> torch.Tensor:
    """target_hat [V]: the target shifted toward the drafter on plausible tokens (eta = 0: unchanged)."""
    if eta == 0:
        return target_probs
    plausible = target_probs >= plausibility * target_probs.max()
    shift = eta * (draft_probs - target_probs) * plausible
    return _normalize(target_probs * torch.exp(shift))


def accept_greedy(tree: TokenTree, target_logits: torch.Tensor) -> Acceptance:
    """target_logits [N, V] -> the longest path of argmax matches and the bonus token."""
    best = greedy_tokens(target_logits).tolist()
    children = tree.children()
    node, path = 0, [0]
    while True:
        nxt = next((c for c in children[node] if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return Acceptance(path, best[node])
        node = nxt
        path.append(node)


def accept_sampling(tree: TokenTree, target_logits: torch.Tensor, config: VerifyConfig,
                    generator: torch.Generator | None) -> Acceptance:
    """Recursive rejection sampling down the tree (see the module docstring)."""
    target = warp(target_logits, config.sampling)  # [N, V]
    children = tree.children()
    uniform = torch.rand(len(tree), max(1, max(len(c) for c in children)), generator=generator,
                         device=target.device)
    node, path = 0, [0]
    while True:
        residual = target[node]
        accepted = None
        for rank, child in enumerate(sorted(children[node], key=lambda c: tree.draft_probs[c] is None)):
            token = tree.tokens[child]
            draft = tree.draft_probs[child]
            if draft is None:  # deterministic proposal: one-hot draft distribution
                if uniform[node, rank] < residual[token]:
                    accepted = child
                    break
                residual = residual.clone()
                residual[token] = 0
            else:
                shifted = rapid_target(residual, draft, config.eta, config.plausibility)
                if uniform[node, rank] * draft[token] < shifted[token]:
                    accepted = child
                    break
                residual = torch.clamp(torch.maximum(residual - shifted, residual - draft), min=0)
            residual = _normalize(residual)
            if residual is None:  # cannot happen with exact arithmetic; fall back to the target
                residual = target[node]
        if accepted is None:
            return Acceptance(path, int(sample(residual, generator)))
        node = accepted
        path.append(node)


def accept(tree: TokenTree, target_logits: torch.Tensor, config: VerifyConfig,
           generator: torch.Generator | None = None) -> Acceptance:
    if config.sampling.greedy:
        return accept_greedy(tree, target_logits)
    return accept_sampling(tree, target_logits, config, generator)
