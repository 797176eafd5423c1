"""Our attention implementation, registered with transformers under the name "rapid".

The mask function builds one boolean mask per forward (shared by every layer): `None` for a single
decode query (it sees the whole cache), a causal mask offset by the cache length for prefill chunks.
Tree verification passes its own 4D boolean mask, which transformers hands through unchanged.
The attention function calls SDPA with each KV head's query heads folded into its query rows
(`kvcache.gqa`): the stock sdpa path repeats K/V per query head when a mask is given (four copies of the
cache for a 4-way GQA group), and even `enable_gqa=True` streams each KV head once per query head.
A bf16 cache read by a few queries (decode steps, trees) goes to our kernel instead (`attend_cache`).
A squeezed document (passed by the runner as the forward kwarg `squeeze`) sends attention through
`kvcache.squeezed_attention` instead.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvcache import native
from kvcache.gqa import fold_queries, grouped_sdpa
from rapid.squeeze import QueryRecorder, SqueezedDocument

ATTENTION_NAME = "rapid"
# Up to this many queries (decode steps, trees, a prompt's last short chunk) a bf16 cache is read by our kernel
# (kvcache.native.cache_attention): its rows get bits that depend only on the keys they see, and a 16-node tree at
# 16K took 7.9 ms per layer against 12.7 for torch's bf16 flash kernel. Longer blocks (prefill chunks) go to SDPA.
NATIVE_MAX_QUERIES = 64


def rapid_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """Boolean mask [B, 1, q, kv] (True = attend), or None when one query sees every key (no padding rows
    after it, see rapid.cache.KV_BLOCK)."""
    if q_length == 1 and kv_length == q_offset + 1 and (attention_mask is None or bool(attention_mask.all())):
        return None
    kwargs["allow_is_causal_skip"] = False  # SDPA's is_causal aligns top-left: wrong with a cache
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def rapid_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    squeeze: SqueezedDocument | None = None, record_queries: QueryRecorder | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, q, D], key / value [B, Hkv, S, D], mask [B|1, 1, q, S] bool -> [B, q, H, D].

    With `squeeze`, key / value hold only the tokens after the document, and the document is read
    through its clusters (squeezed attention); `record_queries` keeps the queries of each layer.
    """
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > -1  # additive float masks: 0 keeps, -inf drops
    scaling = module.scaling if scaling is None else scaling
    if record_queries is not None:
        record_queries.record(module.layer_idx, query)
    if squeeze is not None:
        tail_mask = None if attention_mask is None else attention_mask[0, 0]  # [q, S]
        out = squeeze.attend(module.layer_idx, query, key, value, tail_mask, scaling)
    else:
        out = attend_cache(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def sdpa_only():
    """Within this block dense caches go to SDPA whatever their dtype (to measure our kernel against it)."""
    global NATIVE_MAX_QUERIES
    saved, NATIVE_MAX_QUERIES = NATIVE_MAX_QUERIES, 0
    try:
        yield
    finally:
        NATIVE_MAX_QUERIES = saved


def attend_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor:
    """query [B, H, N, D], key / value [B, Hkv, S, D], mask [B|1, 1, N, S] bool or None -> [B, H, N, D]."""
    batch, _, num_queries, _ = query.shape
    num_kv_heads = key.shape[1]
    rows = query.shape[1] // num_kv_heads * num_queries
    if (batch == 1 and key.dtype == torch.bfloat16 and num_queries <= NATIVE_MAX_QUERIES
            and (mask is None or mask.shape[1] == 1) and native.supports_cache(key[0], value[0], rows)):
        out = native.cache_attention(fold_queries(query, num_kv_heads)[0], scaling, key[0], value[0],
                                     None if mask is None else mask[0, 0], num_queries, round_probs=True)
        return out.view(query.shape).to(query.dtype)
    return grouped_sdpa(query, key, value, mask, scaling)


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, rapid_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, rapid_mask)
