"""The retrieval drafter: continuations copied from the document (REST / prompt lookup, RASD).

No model: the token datastore finds the longest suffix of the recent tokens (question + answer so far)
that occurs in the document or in those recent tokens themselves, and its continuations become
deterministic tree nodes scored by their counts. Searching the question as well as the answer lets an
answer that restates the question ("The first line of the play is ...") copy it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rapid.tree import SOURCE_RETRIEVAL, TokenTree, trim
from retrieval.datastore import TokenDatastore


@dataclass(frozen=True)
class RetrievalDraftConfig:
    """How much a retrieval tree's scores count when fused with another drafter's: its path probabilities are
    multiplied by `weight(match_length)`, `score_weight` after a one-token match and `weight_per_match_token` more
    for each further matched token, up to `max_weight`. Example: (0.2, 0.1, 0.95) weighs a 3-token match by 0.4."""

    score_weight: float = 1.0
    weight_per_match_token: float = 0.0
    max_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.score_weight <= self.max_weight <= 1:
            raise ValueError(f"need 0 < score_weight <= max_weight <= 1, got {self.score_weight}, {self.max_weight}")
        if self.weight_per_match_token < 0:
            raise ValueError(f"weight_per_match_token must be >= 0, got {self.weight_per_match_token}")

    def weight(self, match_length: int) -> float:
        return min(self.max_weight, self.score_weight + self.weight_per_match_token * max(match_length - 1, 0))


class RetrievalDrafter:
    kind = "retrieval"

    def __init__(self, datastore: TokenDatastore, query_ids: list[int],
                 config: RetrievalDraftConfig = RetrievalDraftConfig()):
        self.datastore = datastore
        self.config = config
        self.recent = list(query_ids)  # what follows the document, then the answer so far

    def start(self, target_cache=None) -> None:
        pass

    def observe(self, tree: TokenTree, logits: torch.Tensor, path: list[int]) -> None:
        pass

    def propose(self, new_tokens: list[int], budget: int) -> TokenTree:
        self.recent += new_tokens
        found = self.datastore.lookup(self.recent, extra=self.recent)
        weight = self.config.weight(found.match_length)
        tree = TokenTree.root(new_tokens[-1])
        index = {-1: 0}
        for i in range(len(found)):
            parent = index[int(found.parents[i])]
            score = tree.scores[parent] * float(found.probs[i]) * (weight if parent == 0 else 1)
            index[i] = tree.add(parent, int(found.tokens[i]), score, SOURCE_RETRIEVAL)
        return trim(tree, budget)
