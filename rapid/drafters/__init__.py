"""Drafters: anything that proposes a token tree from its own cheap view of the request.

A drafter is told the tokens committed since its last proposal (the last of them is the root of the
next tree) and returns a `TokenTree` rooted there. Model drafters run a model on the short RAG
context (the target itself, a smaller model, or the target's first layers); the retrieval drafter
copies continuations out of the document's token datastore.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from rapid.tree import TokenTree

DrafterKind = Literal["draft", "retrieval", "recycle"]


class Drafter(Protocol):
    kind: DrafterKind

    def start(self, target_cache=None) -> None:
        """Set up the context the drafter reads, once per request, after the target took the prompt
        (`target_cache`: the target's cache, which a drafter on the target's weights may copy rows from)."""

    def propose(self, new_tokens: list[int], budget: int) -> TokenTree:
        """A tree of at most `budget` nodes besides the root `new_tokens[-1]`."""

    def observe(self, tree: TokenTree, logits: torch.Tensor, path: list[int]) -> None:
        """What the target made of the last proposal: its logits [N, V] at every node of the fused `tree` and
        the accepted `path` (node indices from the root). The recycling drafter learns from them."""


def build_drafters(runner, draft_ids: list[int], datastore, query_ids: list[int], use_retrieval: bool, config,
                   max_new_tokens: int, tree_budget: int, sampling, shared=None, recycle: bool = False,
                   next_tokens=None) -> list[Drafter]:
    """The drafters of one request, model drafter first (RASD prunes retrieval trees by its distribution).

    runner: the drafter model's `ModelRunner` (the target's own for self-speculation, a layer-skip view,
    a smaller model), or None for no model drafter; draft_ids: its context (RAG context + question);
    datastore / query_ids: the retrieval drafter's index and the tokens its lookups start from.
    shared: `SharedRows` when the drafter runs on the target's weights (self, layer-skip): it copies its
    context's KV out of the target's cache instead of prefilling `draft_ids`.
    recycle: add the recycling drafter, seeded with `next_tokens` (the document's `NextTokenTable`, or None to
    start empty); the retrieval tree's scores are then weighted as `RECYCLE_RETRIEVAL` says.
    A sampling drafter gets its own random stream (seed + 1): drawing drafts from the verifier's stream
    would correlate proposals with acceptance tests and break exactness.
    """
    from dataclasses import replace

    from rapid.drafters.model import ModelDrafter, model_capacity
    from rapid.drafters.recycle import RECYCLE_RETRIEVAL, RecycleDrafter
    from rapid.drafters.retrieval import RetrievalDraftConfig, RetrievalDrafter

    drafters: list[Drafter] = []
    if runner is not None:
        generator = None
        if not sampling.greedy:
            seed = None if sampling.seed is None else sampling.seed + 1
            generator = replace(sampling, seed=seed).generator(runner.device)
        capacity = model_capacity(max_new_tokens, tree_budget)
        drafters.append(ModelDrafter(runner, draft_ids, capacity, config, sampling, generator, shared))
    if use_retrieval and datastore is not None:
        retrieval = RECYCLE_RETRIEVAL if recycle else RetrievalDraftConfig()
        drafters.append(RetrievalDrafter(datastore, query_ids, retrieval))
    if recycle:
        drafters.append(RecycleDrafter(query_ids, next_tokens))
    return drafters
