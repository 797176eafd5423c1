"""Forward passes of one model over a `KVCache`: chunked prefill, single-token decode, tree scoring.

Positions are always passed explicitly, so a tree node at depth d sits at `prefix_len + d` whatever
its row in the cache is.

For a Llama-style model (a `model` body and an `lm_head`) the runner applies the head itself, to the
rows it needs only: one row through `torch.mv` in bf16/fp16, which on this CPU ran the 49152 x 576
head in 10.8 ms against 22.2 ms for `F.linear` (fp32: linear 17.1 ms, mv 20.5 ms, so fp32 keeps linear).

In bf16/fp16 the body's linear layers take a single row as two (`pad_single_rows`): torch's one-row GEMM sums
in another order than its many-row GEMM, so a decode step and the same token's row in a tree differed in the
last bit (in 17 of 200 random rows of the 1536 -> 576 projection here; never between 2, 8 and 16 rows).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rapid.cache import KVCache, padded


def pad_single_rows(body: torch.nn.Module) -> None:
    """Make every linear layer under `body` compute a lone row as the first of two, so its bits are those it
    gets among other rows (which never change them). Idempotent. Two rows also ran faster than one here:
    17.1 against 19.9 ms for the default model's 30 layers of projections."""
    for module in body.modules():
        if isinstance(module, torch.nn.Linear) and not getattr(module, "_pads_single_rows", False):
            module.forward = functools.partial(_two_row_linear, module, module.forward)
            module._pads_single_rows = True


def _two_row_linear(module: torch.nn.Linear, plain: Callable, x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2 or x.shape[:-1].numel() != 1:
        return plain(x)
    return plain(x.expand(*x.shape[:-2], 2, x.shape[-1]).contiguous())[..., :1, :]


@dataclass(frozen=True)
class TopTokens:
    """A model's k most probable next tokens after each of T prompt tokens."""

    tokens: torch.Tensor  # [T, k] int32, most probable first
    probs: torch.Tensor  # [T, k] float32, their probabilities


class ModelRunner:
    def __init__(self, model: torch.nn.Module, prefill_chunk: int = 1024):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.device = next(model.parameters()).device
        if next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
            pad_single_rows(getattr(model, "model", model))
        self.prefill_chunk = prefill_chunk
        head = getattr(model, "lm_head", None)
        plain = getattr(model.config, "final_logit_softcapping", None) is None
        self._head = head.weight if isinstance(head, torch.nn.Linear) and head.bias is None and plain else None

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache.for_model(self.model, capacity)

    def new_tail_cache(self, document, capacity: int) -> KVCache:
        """A cache for what follows a squeezed document (`rapid.squeeze.SqueezedDocument`)."""
        return KVCache(self.model.config.num_hidden_layers, capacity, position_offset=document.num_tokens,
                       document=document)

    def _positions(self, start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=self.device)[None]

    def _forward(self, cache: KVCache, input_ids: torch.Tensor, position_ids: torch.Tensor, last_only: bool = False,
                 **kwargs) -> torch.Tensor:
        """One model forward on `cache` -> logits [q, V] (the last row only with `last_only`).

        A squeezed document cache routes attention through its clusters.
        """
        if cache.document is not None:
            kwargs["squeeze"] = cache.document
        if self._head is None:
            out = self.model(input_ids=input_ids, cache=cache, position_ids=position_ids, use_cache=True,
                             logits_to_keep=1 if last_only else 0, **kwargs)
            return out.logits[0]
        out = self.model.model(input_ids=input_ids, cache=cache, position_ids=position_ids, use_cache=True, **kwargs)
        hidden = out.last_hidden_state[0, -1:] if last_only else out.last_hidden_state[0]  # [q, hidden]
        if hidden.shape[0] == 1 and hidden.dtype in (torch.bfloat16, torch.float16):
            return torch.mv(self._head, hidden[0])[None]
        return torch.nn.functional.linear(hidden, self._head)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, token_ids: list[int] | torch.Tensor, show_progress: bool = False,
                on_chunk: Callable[[int, int], None] | None = None, **kwargs) -> torch.Tensor:
        """Append `token_ids` to the cache in chunks; returns the logits [V] after the last token.

        `on_chunk(done, total)` reports progress (the service uses it for ingest jobs); `kwargs` go to
        the attention function (for example a query recorder).
        """
        chunks = self._prefill_chunks(cache, token_ids, show_progress, on_chunk, last_only=True, **kwargs)
        return deque(chunks, maxlen=1)[0][-1]  # the last chunk's last row

    @torch.inference_mode()
    def prefill_top(self, cache: KVCache, token_ids: list[int] | torch.Tensor, k: int, show_progress: bool = False,
                    on_chunk: Callable[[int, int], None] | None = None) -> TopTokens:
        """`prefill` (the same cache), returning the model's k most probable next tokens after every prompt token
        instead of the last logits. The head runs on every row: about 60 GFLOP per 1024 tokens for the default
        model."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        tokens, probs = [], []
        for logits in self._prefill_chunks(cache, token_ids, show_progress, on_chunk, last_only=False):
            top = logits.topk(k, dim=-1)
            tokens.append(top.indices.to(torch.int32))
            probs.append((top.values.float() - torch.logsumexp(logits.float(), -1, keepdim=True)).exp())
        return TopTokens(torch.cat(tokens).cpu(), torch.cat(probs).cpu())

    def _prefill_chunks(self, cache: KVCache, token_ids: list[int] | torch.Tensor, show_progress: bool,
                        on_chunk: Callable[[int, int], None] | None, last_only: bool,
                        **kwargs) -> Iterator[torch.Tensor]:
        """Forward `token_ids` chunk by chunk; yields each chunk's logits (its last row only with `last_only`)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        total = ids.numel()
        bar = tqdm(total=total, unit="tok", desc="prefill", disable=not show_progress, leave=False)
        for begin in range(0, total, self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk][None]
            yield self._forward(cache, chunk, self._positions(cache.next_position, chunk.shape[1]), last_only=last_only,
                                **kwargs)
            bar.update(chunk.shape[1])
            if on_chunk is not None:
                on_chunk(begin + chunk.shape[1], total)
        bar.close()

    @torch.inference_mode()
    def decode(self, cache: KVCache, token: int) -> torch.Tensor:
        """Append one token; returns the logits [V] after it."""
        ids = torch.tensor([[token]], device=self.device)
        return self._forward(cache, ids, self._positions(cache.next_position, 1))[-1]

    @torch.inference_mode()
    def score_nodes(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, tail_mask: torch.Tensor,
                    tail_start: int) -> torch.Tensor:
        """Append n nodes in one forward; returns logits [n, V].

        tokens [n], positions [n]; every node sees the cache up to `tail_start`, and tail_mask
        [n, cache.length + n - tail_start] bool says which later rows (cached ones, then the new
        nodes themselves) each node sees.
        """
        n = tokens.shape[0]
        end = cache.length + n
        mask = torch.zeros(1, 1, n, padded(end), dtype=torch.bool, device=self.device)  # padding rows masked
        mask[0, 0, :, :tail_start] = True
        mask[0, 0, :, tail_start:end] = tail_mask.to(self.device)
        return self._forward(cache, tokens.to(self.device)[None], positions.to(self.device)[None], attention_mask=mask)

    def score_tree(self, cache: KVCache, tokens: torch.Tensor, depths: torch.Tensor,
                   tree_mask: torch.Tensor) -> torch.Tensor:
        """Append N tree nodes in one forward; returns logits [N, V].

        tokens [N], depths [N] (the root has depth 0), tree_mask [N, N] bool (node sees node).
        Node i sits at position prefix_len + depths[i] and sees the whole prefix plus its ancestors.
        """
        return self.score_nodes(cache, tokens, cache.next_position + depths, tree_mask, tail_start=cache.length)
