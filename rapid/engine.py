"""The speculative decoding loop: draft, fuse, verify, commit, emit.

The target holds the full long context in its cache (the document, then the question); drafters read
their own cheap views (the RAG context, the token datastore, the target's own earlier predictions). Each
step the drafters propose trees rooted at the last committed token, the trees are pruned and fused into
one, the target scores every node in one forward, the accepted path's KV is kept and the rest dropped,
the drafters see the target's logits (the recycling drafter learns from them), and the accepted tokens
plus the target's bonus token are emitted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rapid.budget import BudgetPolicy, TreeBudget
from rapid.cache import KVCache
from rapid.drafters import Drafter
from rapid.metrics import SpecStats
from rapid.runner import ModelRunner
from rapid.sampling import next_token
from rapid.tree import TokenTree, fuse, prune
from rapid.verify import Acceptance, VerifyConfig, accept


@dataclass(frozen=True)
class EngineConfig:
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    tree_budget: int = 16  # drafted nodes per step, at most
    min_budget: int = 1  # the adaptive budget never goes below this
    budget_policy: BudgetPolicy = "cost"  # how the next tree is sized (rapid.budget)
    prune_threshold: float = 0.0  # RASD: drop retrieval nodes the drafter finds less likely than this

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.min_budget <= self.tree_budget:
            raise ValueError("need 1 <= min_budget <= tree_budget")

    def capacity(self, prompt_tokens: int) -> int:
        """Target cache room a request needs beyond what the cache already holds."""
        return prompt_tokens + self.max_new_tokens + self.tree_budget + 1


@contextmanager
def _timed(stats: SpecStats, bucket: str):
    start = time.perf_counter()
    yield
    name = f"{bucket}_seconds"
    setattr(stats, name, getattr(stats, name) + time.perf_counter() - start)


class SpeculativeEngine:
    def __init__(self, runner: ModelRunner, config: EngineConfig):
        self.runner = runner
        self.config = config

    def generate(self, cache: KVCache, prompt_ids: list[int], drafters: list[Drafter],
                 stats: SpecStats | None = None, cancel: threading.Event | None = None) -> Iterator[list[int]]:
        """Append `prompt_ids` to `cache` (which may already hold the document) and yield token lists.

        Model drafters should come before the retrieval drafter so RASD pruning can use their
        distributions. Stop tokens are emitted, then generation ends.
        """
        config = self.config
        stats = stats if stats is not None else SpecStats()
        if cache.length + config.capacity(len(prompt_ids)) > cache.capacity:
            raise ValueError(f"target cache holds {cache.capacity} tokens; this request needs "
                             f"{cache.length + config.capacity(len(prompt_ids))}")
        sampling = config.verify.sampling
        gen = None if sampling.greedy else sampling.generator(self.runner.device)
        with _timed(stats, "prefill"):
            logits = self.runner.prefill(cache, prompt_ids)
            for drafter in drafters:
                drafter.start(cache)
        budget = TreeBudget.for_request(config.budget_policy, config.min_budget, config.tree_budget,
                                        seeded_sampling=not sampling.greedy and sampling.seed is not None)
        start = time.perf_counter()
        new_tokens = self._emit([next_token(logits, sampling, gen)], 0)
        emitted = len(new_tokens)
        stats.num_emitted_tokens += emitted
        yield new_tokens
        while not self._finished(new_tokens, emitted) and not (cancel is not None and cancel.is_set()):
            step_start = time.perf_counter()
            tree = self._draft(drafters, new_tokens, stats, budget.next())
            logits = self._verify(cache, tree, stats)
            acceptance = accept(tree, logits, config.verify, gen)
            self._commit(cache, acceptance, stats)
            self._observe(drafters, tree, logits, acceptance, stats)
            budget.observe(tree.num_drafted(), max(tree.depths()), acceptance.num_accepted,
                           time.perf_counter() - step_start)
            new_tokens = self._emit([tree.tokens[i] for i in acceptance.path[1:]] + [acceptance.bonus], emitted)
            stats.record_step(tree.num_drafted(), acceptance.num_accepted)
            emitted += len(new_tokens)
            stats.num_emitted_tokens += len(new_tokens)
            stats.decode_seconds = time.perf_counter() - start
            yield new_tokens

    def _draft(self, drafters: list[Drafter], new_tokens: list[int], stats: SpecStats, budget: int) -> TokenTree:
        trees, distributions = [], {}
        for drafter in drafters:
            with _timed(stats, "retrieval" if drafter.kind == "retrieval" else "draft"):
                tree = drafter.propose(new_tokens, budget)
                if drafter.kind == "retrieval":
                    tree = prune(tree, distributions, self.config.prune_threshold)
                distributions.update(getattr(drafter, "distributions", {}))
            trees.append(tree)
        if not trees:
            return TokenTree.root(new_tokens[-1])
        with _timed(stats, "draft"):
            return fuse(trees, budget) if len(trees) > 1 else trees[0]

    def _verify(self, cache: KVCache, tree: TokenTree, stats: SpecStats) -> torch.Tensor:
        with _timed(stats, "verify"):
            self._tree_start = cache.length
            depths = torch.tensor(tree.depths())
            return self.runner.score_tree(cache, torch.tensor(tree.tokens), depths, tree.ancestor_mask())

    def _observe(self, drafters: list[Drafter], tree: TokenTree, logits: torch.Tensor, acceptance: Acceptance,
                 stats: SpecStats) -> None:
        for drafter in drafters:
            with _timed(stats, "retrieval" if drafter.kind == "retrieval" else "draft"):
                drafter.observe(tree, logits, acceptance.path)

    def _commit(self, cache: KVCache, acceptance: Acceptance, stats: SpecStats) -> None:
        with _timed(stats, "commit"):
            cache.commit(self._tree_start, torch.tensor(acceptance.path))

    def _emit(self, tokens: list[int], emitted: int) -> list[int]:
        """Cut `tokens` after a stop token or at max_new_tokens."""
        tokens = tokens[: self.config.max_new_tokens - emitted]
        for i, token in enumerate(tokens):
            if token in self.config.stop_token_ids:
                return tokens[: i + 1]
        return tokens

    def _finished(self, last: list[int], emitted: int) -> bool:
        return emitted >= self.config.max_new_tokens or (bool(last) and last[-1] in self.config.stop_token_ids)
