"""A preallocated KV cache that plugs into transformers' `Cache` API.

transformers' DynamicCache concatenates per token (a full copy of the cache each step: 5.7x slower at
100K); StaticCache attends over its whole capacity. Ours writes new keys in place and hands attention
a view of the filled prefix (rounded up to a whole block, below), so a decode step reads the tokens that
exist and fewer than KV_BLOCK more.

Layout per layer: keys / values `[B, Hkv, capacity, D]`; `length` tokens are valid.
Speculative decoding appends a tree of N nodes, then `commit` keeps the accepted nodes' KV and drops
the rest with one small gather inside the tail, never touching the prefix.

Attention sees the filled prefix padded to a multiple of KV_BLOCK rows, the padding masked out. torch's
CPU flash kernel splits the keys into blocks of 512, and a query's result depends on how wide its last
block is: without the padding, the row of a tree node and the one-token step of the same token ended in
blocks of different widths and differed in the last bit, which bf16 turned into different greedy tokens
after some steps. With it, every query of a forward reads the same full blocks, so a verified tree
node's logits equal the decode step's bit for bit (tests/rapid/test_cache.py).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

KV_BLOCK = 512  # torch's CPU flash attention key block (kvSplitSize) for fewer than 768 queries


class CacheFullError(RuntimeError):
    """More tokens were appended than the cache was allocated for."""


def padded(length: int) -> int:
    """`length` rounded up to a whole number of KV_BLOCK rows."""
    return -(-length // KV_BLOCK) * KV_BLOCK


class PreallocatedLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, padded(self.capacity), head_dim)
        self.device = key_states.device
        # zeros, not empty: masked padding rows still meet the values (0 * NaN would be NaN)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros((*shape[:3], value_states.shape[-1]), dtype=value_states.dtype,
                                  device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise CacheFullError(f"KV cache holds {self.capacity} tokens; {end} requested")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, : padded(end)], self.values[:, :, : padded(end)]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return padded(self.length + query_length), 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        # transformers' convention: a negative count removes that many, a positive one keeps that many
        self.length = self.length + tokens_to_remove if tokens_to_remove < 0 else min(self.length, tokens_to_remove)

    def reset(self) -> None:
        self.length = 0

    def keep(self, start: int, kept: torch.Tensor, in_place: bool = False) -> None:
        """Keep tail rows `start + kept` (ascending) at `start .. start+len(kept)`, drop the rest (`in_place`: kept
        is 0, 1, ..., so those rows are there already)."""
        if self.length == 0:
            return
        if in_place:
            self.length = start + len(kept)
            return
        rows = start + kept
        self.keys[:, :, start:start + len(kept)] = self.keys.index_select(2, rows)
        self.values[:, :, start:start + len(kept)] = self.values.index_select(2, rows)
        self.length = start + len(kept)


class KVCache(Cache):
    """One `PreallocatedLayer` per decoder layer.

    With `document` set (a squeezed, clustered document cache), this cache holds only what follows the
    document: its rows start at position `position_offset` = the document's length, and attention reads
    the document through the clusters.
    """

    def __init__(self, num_layers: int, capacity: int, position_offset: int = 0, document=None):
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity
        self.position_offset = position_offset
        self.document = document

    @classmethod
    def for_model(cls, model: torch.nn.Module, capacity: int) -> KVCache:
        return cls(model.config.num_hidden_layers, capacity)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def next_position(self) -> int:
        """The position of the next appended token."""
        return self.position_offset + self.length

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` tokens (for example, back to the document)."""
        if length > self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        for layer in self.layers:
            layer.length = length

    def gather(self, rows: torch.Tensor, capacity: int, num_layers: int | None = None) -> KVCache:
        """A new cache holding rows `rows` (ascending) of this one's first `num_layers` layers, room for
        `capacity` more, continuing at this cache's next position.

        A RAG drafter built on the target's weights reads the retrieved chunks' KV this way instead of
        prefilling them: the copied rows keep the positions (RoPE) and the full-context KV they were
        computed with. Example: rows [0, 1, 7, 8] of a 10-token cache -> 4 rows, next position 10.
        """
        if self.document is not None or self.position_offset:
            raise ValueError("gather reads a dense cache that starts at position 0")
        layers = self.layers[: num_layers or len(self.layers)]
        out = KVCache(len(layers), len(rows) + capacity, position_offset=self.next_position - len(rows))
        with torch.inference_mode():
            for target, source in zip(out.layers, layers, strict=True):
                target.update(source.keys.index_select(2, rows), source.values.index_select(2, rows))
        return out

    def commit(self, start: int, kept: torch.Tensor) -> None:
        """After verifying a tree appended at `start`, keep the nodes `kept` (ascending node indices).

        Example: prefix of 10 tokens, a 5-node tree appended at 10..14, accepted path = nodes [0, 2, 3]:
        rows 10, 12, 13 move to 10, 11, 12 and the cache length becomes 13.
        """
        in_place = bool(torch.equal(kept, torch.arange(len(kept))))  # the path is the first nodes: no row moves
        with torch.inference_mode():  # the buffers were allocated inside the model's inference forward
            for layer in self.layers:
                layer.keep(start, kept, in_place)
