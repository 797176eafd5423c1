"""Token trees: what drafters propose and the target verifies in one forward.

Node 0 is the root: the last committed token, whose KV is not in the target cache yet. Every other
node is a proposed continuation of its parent. Parents always come before their children, so a node's
depth and ancestors can be computed in one pass.

A node is either *sampled* (drawn from a drafter distribution, kept in `draft_probs`) or
*deterministic* (chosen without sampling: a drafter's top-k, or a retrieval continuation); the
verifier treats a deterministic node's draft distribution as one-hot. Fusion merges only
deterministic nodes, because merging a sampled node with a deterministic one would make which
proposals exist depend on the sample, and the rejection sampler would no longer be exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SOURCE_ROOT, SOURCE_DRAFT, SOURCE_RETRIEVAL = 0, 1, 2


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int]  # parents[0] == -1
    scores: list[float]  # path probability under its proposer; 1.0 at the root
    sources: list[int]  # SOURCE_* per node
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)  # [V] for sampled nodes, else None

    def __post_init__(self) -> None:
        if not self.draft_probs:
            self.draft_probs = [None] * len(self.tokens)
        n = len(self.tokens)
        if not (len(self.parents) == len(self.scores) == len(self.sources) == len(self.draft_probs) == n):
            raise ValueError("token tree fields must all have one entry per node")
        if n == 0 or self.parents[0] != -1:
            raise ValueError("a token tree starts with its root (parent -1)")
        if any(not 0 <= p < i for i, p in enumerate(self.parents[1:], start=1)):
            raise ValueError("every parent must come before its child")

    @classmethod
    def root(cls, token: int) -> TokenTree:
        return cls([token], [-1], [1.0], [SOURCE_ROOT])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float, source: int, draft_probs: torch.Tensor | None = None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.sources.append(source)
        self.draft_probs.append(draft_probs)
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        depths = [0] * len(self)
        for i in range(1, len(self)):
            depths[i] = depths[self.parents[i]] + 1
        return depths

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i in range(1, len(self)):
            kids[self.parents[i]].append(i)
        return kids

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: row i is True at i and at each ancestor of i.

        Example: parents [-1, 0, 0, 1] gives rows
        0: [1 0 0 0], 1: [1 1 0 0], 2: [1 0 1 0], 3: [1 1 0 1].
        """
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask

    def num_drafted(self) -> int:
        return len(self) - 1


def fuse(trees: list[TokenTree], budget: int) -> TokenTree:
    """Merge trees with the same root by longest-prefix matching, keep the best `budget` nodes.

    Deterministic nodes with the same parent and token become one node that keeps the higher score
    (and the draft source if either was drafted). Sampled nodes are never merged. The result is
    trimmed to `budget` nodes besides the root by score; scores never grow down a path, so the kept
    set is closed under ancestors.

    Example: A = root->5->6 and B = root->5->7 fuse into root->5->{6, 7}: 4 nodes, not 5.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    root_token = trees[0].tokens[0]
    if any(t.tokens[0] != root_token for t in trees):
        raise ValueError("fused trees must share their root")
    merged = TokenTree.root(root_token)
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged deterministic node
    for tree in trees:
        mapping = {0: 0}
        for i in range(1, len(tree)):
            parent = mapping[tree.parents[i]]
            token, score, source, probs = tree.tokens[i], tree.scores[i], tree.sources[i], tree.draft_probs[i]
            key = (parent, token)
            if probs is None and key in index:
                j = index[key]
                merged.scores[j] = max(merged.scores[j], score)
                if source == SOURCE_DRAFT:
                    merged.sources[j] = SOURCE_DRAFT
            else:
                j = merged.add(parent, token, score, source, probs)
                if probs is None:
                    index[key] = j
            mapping[i] = j
    return trim(merged, budget)


def trim(tree: TokenTree, budget: int) -> TokenTree:
    """Keep the root and the `budget` best-scoring other nodes (ties: shallower, then earlier)."""
    if len(tree) - 1 <= budget:
        return tree
    depths = tree.depths()
    ranked = sorted(range(1, len(tree)), key=lambda i: (-tree.scores[i], depths[i], i))
    keep = set(ranked[:budget])
    # scores can tie along a path (a probability of 1.0); close the set under ancestors to be safe
    for i in list(keep):
        keep.update(tree.path_to(i)[1:])
    ordered = sorted(keep)
    while len(ordered) > budget:  # closing added ancestors: drop the worst leaves again
        leaves = [i for i in ordered if not any(tree.parents[j] == i for j in ordered)]
        worst = min(leaves, key=lambda i: (tree.scores[i], -depths[i], -i))
        ordered.remove(worst)
    out = TokenTree.root(tree.tokens[0])
    new_index = {0: 0}
    for i in ordered:
        new_index[i] = out.add(new_index[tree.parents[i]], tree.tokens[i], tree.scores[i], tree.sources[i],
                               tree.draft_probs[i])
    return out


def prune(tree: TokenTree, distributions: dict[tuple[int, ...], torch.Tensor], threshold: float) -> TokenTree:
    """RASD pruning: drop a retrieval node (and its subtree) where the drafter saw its parent and gave
    the node's token less than `threshold` probability.

    `distributions` maps a path of tokens below the root to the drafter's probabilities [V] there.
    Example: with distributions {(): p} and p[7] = 0.01, threshold 0.05 drops the root's child 7.
    """
    if threshold <= 0:
        return tree
    out = TokenTree.root(tree.tokens[0])
    index = {0: 0}
    paths: dict[int, tuple[int, ...]] = {0: ()}
    for i in range(1, len(tree)):
        parent = tree.parents[i]
        if parent not in index:
            continue
        parent_path = paths[parent]
        probs = distributions.get(parent_path)
        if tree.sources[i] == SOURCE_RETRIEVAL and probs is not None and float(probs[tree.tokens[i]]) < threshold:
            continue
        index[i] = out.add(index[parent], tree.tokens[i], tree.scores[i], tree.sources[i], tree.draft_probs[i])
        paths[i] = parent_path + (tree.tokens[i],)
    return out
