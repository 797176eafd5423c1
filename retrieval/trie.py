"""`RetrievalTree`: the continuations of a matched suffix arranged as a trie with counts.

Flat arrays, one entry per node, in breadth-first order (so a parent always comes before its
children); the root is implicit (it is the matched suffix itself) and has parent index -1.
Siblings are ordered by count, highest first, ties by token id.

    tokens[i]   token of node i
    parents[i]  index of its parent node, -1 for children of the root
    depths[i]   1 for children of the root
    counts[i]   number of sampled occurrences whose continuation starts with the path to node i
    probs[i]    counts[i] / count of the parent (the root's count is `num_occurrences`), i.e. the
                estimated probability of the token given the path before it
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RetrievalTree:
    tokens: np.ndarray  # [N] int64
    parents: np.ndarray  # [N] int64, parents[i] < i
    depths: np.ndarray  # [N] int64
    counts: np.ndarray  # [N] int64
    probs: np.ndarray  # [N] float32
    match_length: int = 0  # tokens of the query suffix that matched (0: no match, empty tree)
    num_occurrences: int = 0  # occurrences the trie was built from (after sampling)
    total_occurrences: int = 0  # occurrences of the matched suffix before sampling
    sources: tuple[str, ...] = field(default=())  # where the occurrences came from: "datastore", "extra"

    def __len__(self) -> int:
        return len(self.tokens)

    def path(self, node: int) -> list[int]:
        """Tokens from the root to `node`, inclusive."""
        tokens = []
        while node >= 0:
            tokens.append(int(self.tokens[node]))
            node = int(self.parents[node])
        return tokens[::-1]


def empty_tree() -> RetrievalTree:
    none = np.zeros(0, dtype=np.int64)
    return RetrievalTree(none, none, none, none, np.zeros(0, dtype=np.float32))


def build_trie(continuations: Sequence[Sequence[int]], max_depth: int, max_branches: int) -> RetrievalTree:
    """Count the prefixes of `continuations` (one per occurrence) into a pruned trie.

    Only the first `max_depth` tokens of each continuation are used, and each node keeps its
    `max_branches` most frequent children (dropping a child drops its subtree).

    Worked example: continuations [5, 6], [5, 7], [5, 6, 8], [9] with max_branches=1:
    the root has children 5 (count 3) and 9 (count 1); only 5 is kept; under it 6 (count 2) beats
    7 (count 1); under 6 is 8 (count 1). So tokens [5, 6, 8], parents [-1, 0, 1],
    counts [3, 2, 1], probs [3/4, 2/3, 1/2].
    """
    if max_depth <= 0 or max_branches <= 0:
        raise ValueError(f"max_depth and max_branches must be positive, got {max_depth}, {max_branches}")
    children: list[dict[int, int]] = [{}]  # node id -> {token: child node id}; node 0 is the root
    node_counts = [len(continuations)]
    for continuation in continuations:
        node = 0
        for token in continuation[:max_depth]:
            child = children[node].get(token)
            if child is None:
                child = len(node_counts)
                children[node][token] = child
                children.append({})
                node_counts.append(0)
            node_counts[child] += 1
            node = child
    tokens, parents, depths, counts, probs = [], [], [], [], []
    frontier = [(0, -1, 0)]  # (trie node, output index, depth), breadth-first
    while frontier:
        next_frontier = []
        for node, out_index, depth in frontier:
            ranked = sorted(children[node].items(), key=lambda item: (-node_counts[item[1]], item[0]))
            for token, child in ranked[:max_branches]:
                next_frontier.append((child, len(tokens), depth + 1))
                tokens.append(token)
                parents.append(out_index)
                depths.append(depth + 1)
                counts.append(node_counts[child])
                probs.append(node_counts[child] / node_counts[node])
        frontier = next_frontier
    return RetrievalTree(
        tokens=np.asarray(tokens, dtype=np.int64),
        parents=np.asarray(parents, dtype=np.int64),
        depths=np.asarray(depths, dtype=np.int64),
        counts=np.asarray(counts, dtype=np.int64),
        probs=np.asarray(probs, dtype=np.float32),
        num_occurrences=len(continuations),
    )
