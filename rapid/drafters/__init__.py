"""Drafters: anything that proposes a token tree from its own cheap view of the request.

A drafter is told the tokens committed since its last proposal (the last of them is the root of the
next tree) and returns a `TokenTree` rooted there. Model drafters run a model on the short RAG
context (the target itself, a smaller model, or the target's first layers); the retrieval drafter
copies continuations out of the document's token datastore.
"""

from __future__ import annotations

from typing import Literal, Protocol

from rapid.tree import TokenTree

DrafterKind = Literal["draft", "retrieval"]


class Drafter(Protocol):
    kind: DrafterKind

    def start(self) -> None:
        """Prefill whatever context the drafter reads (called once per request)."""

    def propose(self, new_tokens: list[int], budget: int) -> TokenTree:
        """A tree of at most `budget` nodes besides the root `new_tokens[-1]`."""
