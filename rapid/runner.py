"""Forward passes of one model over a `KVCache`: chunked prefill, single-token decode, tree scoring.

Positions are always passed explicitly, so a tree node at depth d sits at `prefix_len + d` whatever
its row in the cache is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from rapid.cache import KVCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, prefill_chunk: int = 1024):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.device = next(model.parameters()).device
        self.prefill_chunk = prefill_chunk

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache.for_model(self.model, capacity)

    def _positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device)[None]

    @torch.inference_mode()
    def prefill(self, cache: KVCache, token_ids: list[int] | torch.Tensor, show_progress: bool = False,
                on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Append `token_ids` to the cache in chunks; returns the logits [V] after the last token.

        `on_chunk(done, total)` reports progress (the service uses it for ingest jobs).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        total = ids.numel()
        bar = tqdm(total=total, unit="tok", desc="prefill", disable=not show_progress, leave=False)
        logits = None
        for begin in range(0, total, self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk][None]
            out = self.model(input_ids=chunk, cache=cache, position_ids=self._positions(cache.length, chunk.shape[1]),
                             use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
            bar.update(chunk.shape[1])
            if on_chunk is not None:
                on_chunk(begin + chunk.shape[1], total)
        bar.close()
        return logits

    @torch.inference_mode()
    def decode(self, cache: KVCache, token: int) -> torch.Tensor:
        """Append one token; returns the logits [V] after it."""
        ids = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=ids, cache=cache, position_ids=self._positions(cache.length, 1), use_cache=True)
        return out.logits[0, -1]

    @torch.inference_mode()
    def score_nodes(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, tail_mask: torch.Tensor,
                    tail_start: int) -> torch.Tensor:
        """Append n nodes in one forward; returns logits [n, V].

        tokens [n], positions [n]; every node sees the cache up to `tail_start`, and tail_mask
        [n, cache.length + n - tail_start] bool says which later rows (cached ones, then the new
        nodes themselves) each node sees.
        """
        n = tokens.shape[0]
        mask = torch.ones(1, 1, n, cache.length + n, dtype=torch.bool, device=self.device)
        mask[0, 0, :, tail_start:] = tail_mask.to(self.device)
        out = self.model(input_ids=tokens.to(self.device)[None], cache=cache,
                         position_ids=positions.to(self.device)[None], attention_mask=mask, use_cache=True)
        return out.logits[0]

    def score_tree(self, cache: KVCache, tokens: torch.Tensor, depths: torch.Tensor,
                   tree_mask: torch.Tensor) -> torch.Tensor:
        """Append N tree nodes in one forward; returns logits [N, V].

        tokens [N], depths [N] (the root has depth 0), tree_mask [N, N] bool (node sees node).
        Node i sits at position prefix_len + depths[i] and sees the whole prefix plus its ancestors.
        """
        prefix = cache.length
        return self.score_nodes(cache, tokens, prefix + depths, tree_mask, tail_start=prefix)
