"""A model drafter: a causal LM on its own short context (RAPID's RAG drafter).

With the target's weights this is RAPID's self-speculation (the target reading only the RAG context);
with a smaller model sharing the tokenizer it is classic draft-model speculation; with
`layer_skip_view(target, L)` it is the target's first L layers plus its head.

Tree growth, one drafter forward per level: the root's distribution comes from feeding the newly
committed tokens; each level expands the `width` most probable open nodes into their `branch` most
probable children (greedy and deterministic) or into one sampled child (sampling, so the verifier can
use the true draft distribution). Growth stops at `max_depth`, at the node budget (the last level
is not run through the drafter), or when the best open path's probability falls below
`min_path_prob` (SpecDec++: stop once a rejection is likely).
The draft nodes' KV is dropped after proposing; the next call re-feeds what the target accepted.

A drafter on the target's own weights (self-speculation, layer-skip) need not prefill its context at
all: with `SharedRows` it copies the context's rows out of the target's dense cache when the request
starts (the template head, the retrieved chunks, the question; for layer-skip, of its first L layers,
which are the target's). Those rows keep their document positions and the KV the target computed with
the whole document in view, so the drafter is the target reading a sparse subset of its cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rapid.cache import KVCache
from rapid.runner import ModelRunner
from rapid.sampling import SamplingConfig, sample, warp
from rapid.tree import SOURCE_DRAFT, TokenTree


@dataclass(frozen=True)
class DraftConfig:
    max_depth: int = 6
    branch: int = 2  # children per expanded node (deterministic trees)
    width: int = 2  # open nodes expanded per level
    min_path_prob: float = 0.05

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.branch < 1 or self.width < 1:
            raise ValueError("max_depth, branch and width must be >= 1")
        if not 0 <= self.min_path_prob < 1:
            raise ValueError(f"min_path_prob must be in [0, 1), got {self.min_path_prob}")


# How a drafter on the target's weights gets its context's KV: "copy" = the rows out of the target's
# cache (`SharedRows`), "prefill" = it prefills the RAG context itself (RAPID's original drafter).
DrafterKV = Literal["copy", "prefill"]


@dataclass(frozen=True)
class SharedRows:
    """The target-cache rows a drafter on the target's weights reads: `document_rows` (ascending, all
    below `prefix_len`) plus every row the target appended after the document prefix (the question)."""

    document_rows: torch.Tensor  # [R] int64
    prefix_len: int

    @classmethod
    def from_spans(cls, head_len: int, spans: list[tuple[int, int]], prefix_len: int) -> SharedRows:
        """The template head [0, head_len) and document token spans [start, end) shifted past the head.

        Example: head_len 3, spans [(0, 2), (1, 4)], prefix_len 20 -> rows [0, 1, 2, 3, 4, 5, 6].
        """
        rows = [torch.arange(head_len)] + [torch.arange(head_len + a, head_len + b) for a, b in spans]
        return cls(torch.unique(torch.cat(rows)), prefix_len)


class ModelDrafter:
    kind = "draft"

    def __init__(self, runner: ModelRunner, context_ids: list[int], capacity: int, config: DraftConfig,
                 sampling: SamplingConfig, generator: torch.Generator | None = None,
                 shared: SharedRows | None = None):
        if not context_ids:
            raise ValueError("a model drafter needs a non-empty context")
        self.runner = runner
        self.context_ids = context_ids
        self.capacity = capacity
        self.config = config
        self.sampling = sampling
        self.generator = generator
        self.shared = shared
        self.cache = None
        self.copied_rows = 0  # context rows taken from the target's cache instead of prefilled
        self.distributions: dict[tuple[int, ...], torch.Tensor] = {}  # path below root -> probs [V]

    def start(self, target_cache: KVCache | None = None) -> None:
        """Copy the shared rows out of `target_cache` (dense, holding the prompt) or prefill the context."""
        if self.shared is not None and target_cache is not None and target_cache.document is None:
            tail = torch.arange(self.shared.prefix_len, target_cache.length)
            rows = torch.cat([self.shared.document_rows, tail]).to(target_cache.layers[0].keys.device)
            layers = self.runner.model.config.num_hidden_layers
            self.cache = target_cache.gather(rows, self.capacity, num_layers=layers)
            self.copied_rows = len(rows)
            return
        self.cache = self.runner.new_cache(len(self.context_ids) + self.capacity)
        self.runner.prefill(self.cache, self.context_ids)

    def observe(self, tree: TokenTree, logits: torch.Tensor, path: list[int]) -> None:
        pass

    def propose(self, new_tokens: list[int], budget: int) -> TokenTree:
        root_logits = self.runner.prefill(self.cache, new_tokens)
        base = self.cache.length
        tree = TokenTree.root(new_tokens[-1])
        self.distributions = {(): self._probs(root_logits)}
        paths = {0: ()}
        frontier = [0]  # nodes whose distribution is known and may get children
        in_cache: list[int] = []  # tree nodes whose KV sits after `base`, in order
        depth = 0
        while frontier and len(tree) - 1 < budget:
            depth += 1
            children = self._grow(tree, frontier, paths, budget)
            if not children or depth >= self.config.max_depth or len(tree) - 1 >= budget:
                break  # a full tree's leaves are not run: their distributions would only prune retrieval nodes
            best = sorted(children, key=lambda i: -tree.scores[i])[: self.config.width]
            best = [i for i in best if tree.scores[i] >= self.config.min_path_prob]
            if not best:
                break
            logits = self._forward_nodes(tree, best, in_cache, base)
            for node, row in zip(best, logits, strict=True):
                self.distributions[paths[node]] = self._probs(row)
            in_cache += best
            frontier = best
        self.cache.truncate(base)
        return tree

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling.greedy:
            return logits.float().softmax(-1)
        return warp(logits, self.sampling)

    def _grow(self, tree: TokenTree, frontier: list[int], paths: dict[int, tuple[int, ...]],
              budget: int) -> list[int]:
        added = []
        for node in frontier:
            probs = self.distributions[paths[node]]
            if self.sampling.greedy:
                top = torch.topk(probs, self.config.branch)
                picks = [(int(t), float(p), None) for p, t in zip(top.values, top.indices, strict=True)]
            else:
                token = int(sample(probs, self.generator))
                picks = [(token, float(probs[token]), probs)]
            for token, prob, draft_probs in picks:
                if len(tree) - 1 >= budget:
                    return added
                child = tree.add(node, token, tree.scores[node] * prob, SOURCE_DRAFT, draft_probs)
                paths[child] = paths[node] + (token,)
                added.append(child)
        return added

    def _forward_nodes(self, tree: TokenTree, nodes: list[int], in_cache: list[int], base: int) -> torch.Tensor:
        """Run `nodes` through the drafter; each sees the context, its in-cache ancestors and itself."""
        depths = tree.depths()
        row_of = {node: r for r, node in enumerate(in_cache)}
        mask = torch.zeros(len(nodes), len(in_cache) + len(nodes), dtype=torch.bool)  # over the tail
        for r, node in enumerate(nodes):
            mask[r, len(in_cache) + r] = True
            for ancestor in tree.path_to(node)[1:-1]:
                mask[r, row_of[ancestor]] = True
        tokens = torch.tensor([tree.tokens[n] for n in nodes])
        positions = torch.tensor([base - 1 + depths[n] for n in nodes])
        return self.runner.score_nodes(self.cache, tokens, positions, mask, tail_start=base)


def layer_skip_view(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """The target's first `num_layers` decoder layers plus its final norm and head, sharing weights."""
    import copy

    total = model.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"layer-skip drafter needs 1 <= layers < {total}, got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    base = copy.copy(model.model)
    base._modules = dict(base._modules)
    base.layers = torch.nn.ModuleList(list(model.model.layers[:num_layers]))
    base.config = config
    view = copy.copy(model)
    view._modules = dict(view._modules)
    view.model = base
    view.config = config
    return view


def model_capacity(max_new_tokens: int, budget: int) -> int:
    """Drafter cache room beyond its context: every committed token plus one tree of draft nodes."""
    return max_new_tokens + budget + 2

