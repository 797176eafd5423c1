"""Squeezed attention: exact attention over the selected document clusters plus the dense tail.

One function serves decode (N=1) and tree verification (N>1). The document part reads only the
keys of the clusters the queries selected (gathered contiguous slices of the cluster-ordered cache);
the tail (question, generated tokens, tree nodes) is attended densely under its mask; the two
parts are merged with their log-sum-exp. Everything accumulates in fp32.

Shapes: B batch (1), H query heads, Hkv kv heads, G = H / Hkv, N queries, T document tokens,
S tail tokens, M gathered document keys per kv head, C clusters, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvcache.clustering import ClusteredLayer
from kvcache.selection import SelectionRule, padded_ranges, select_clusters


@dataclass
class SqueezeStats:
    """Running count of document keys read, summed over calls (and layers, if shared).

    keys_read: keys gathered (per kv head, the union over the N queries).
    keys_selected: keys each query attended to, summed over queries.
    """

    doc_keys: int = 0  # Hkv * T per call
    queries: int = 0  # N per call
    keys_read: int = 0
    keys_selected: int = 0

    @property
    def read_fraction(self) -> float:
        """Fraction of the document keys actually read."""
        return self.keys_read / max(self.doc_keys, 1)

    @property
    def selected_fraction(self) -> float:
        """Fraction of the document keys one query attends to, on average."""
        return self.keys_selected / max(self.doc_keys * self.queries, 1)


def squeezed_attention(
    query: Tensor,  # [B, H, N, D]
    doc: ClusteredLayer,
    rule: SelectionRule,
    tail_keys: Tensor,  # [B, Hkv, S, D]
    tail_values: Tensor,  # [B, Hkv, S, D]
    tail_mask: Tensor | None,  # [N, S] bool, True = visible; None = every query sees the whole tail
    scaling: float,
    stats: SqueezeStats | None = None,
    always_read: Tensor | None = None,  # [Hkv, C] bool: clusters every query reads (e.g. attention sinks)
) -> Tensor:  # [B, H, N, D], dtype of query
    """Attention of N queries over the selected document clusters and the masked tail.

    For N > 1 the union of the queries' clusters is gathered once per kv head and each query is
    masked to its own clusters, so every query gets exactly what it would get alone.
    """
    batch, num_heads, num_queries, head_dim = query.shape
    assert batch == 1, f"squeezed attention serves one document at a time, got batch {batch}"
    num_kv_heads = doc.keys.shape[0]
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads for {num_kv_heads} kv heads"
    q = query[0].float().view(num_kv_heads, num_heads // num_kv_heads, num_queries, head_dim)

    selected = select_clusters(q, doc, rule, scaling)  # [Hkv, N, C]
    if always_read is not None:
        selected = selected | always_read[:, None, :]
    indices, valid = padded_ranges(doc.offsets, selected.any(dim=1))  # [Hkv, M]
    if num_queries == 1:
        doc_mask = valid[:, None, :]  # the union is the query's own selection
    else:
        cluster = torch.searchsorted(doc.offsets[:, 1:].contiguous(), indices, right=True)  # [Hkv, M]
        doc_mask = selected.gather(2, cluster[:, None, :].expand(-1, num_queries, -1)) & valid[:, None, :]
    # One index_select over the flattened heads: 1.6-2x faster here than gather or advanced indexing.
    rows = (indices + torch.arange(num_kv_heads, device=indices.device)[:, None] * doc.num_tokens).flatten()
    doc_keys = doc.keys.view(-1, head_dim).index_select(0, rows).view(num_kv_heads, -1, head_dim).float()
    doc_values = doc.values.view(-1, head_dim).index_select(0, rows).view(num_kv_heads, -1, head_dim).float()
    doc_out, doc_lse = _attend(q, doc_keys, doc_values, doc_mask, scaling)
    tail_mask = None if tail_mask is None else tail_mask[None].expand(num_kv_heads, -1, -1)
    tail_out, tail_lse = _attend(q, tail_keys[0].float(), tail_values[0].float(), tail_mask, scaling)

    lse = torch.logaddexp(doc_lse, tail_lse)
    lse = lse.masked_fill(lse == -math.inf, 0.0)  # a query that sees nothing gets zeros, not NaN
    out = torch.exp(doc_lse - lse)[..., None] * doc_out + torch.exp(tail_lse - lse)[..., None] * tail_out

    if stats is not None:
        stats.doc_keys += num_kv_heads * doc.num_tokens
        stats.queries += num_queries
        stats.keys_read += int(valid.sum())
        stats.keys_selected += int((selected * doc.sizes[:, None, :]).sum())
    return out.reshape(1, num_heads, num_queries, head_dim).to(query.dtype)


def dense_attention(
    query: Tensor,  # [B, H, N, D]
    doc_keys: Tensor,  # [Hkv, T, D], any token order
    doc_values: Tensor,  # [Hkv, T, D]
    tail_keys: Tensor,  # [B, Hkv, S, D]
    tail_values: Tensor,  # [B, Hkv, S, D]
    tail_mask: Tensor | None,  # [N, S] bool or None
    scaling: float,
) -> Tensor:  # [B, H, N, D], dtype of query
    """Reference: one fp32 softmax over every document key and the masked tail.

    Attention does not depend on key order, so the cluster-ordered ClusteredLayer.keys/values
    give the same result as the document-order ones.
    """
    batch, num_heads, num_queries, head_dim = query.shape
    assert batch == 1, f"one document at a time, got batch {batch}"
    num_kv_heads, num_doc, _ = doc_keys.shape
    keys = torch.cat([doc_keys, tail_keys[0].to(doc_keys.dtype)], dim=1).float()  # [Hkv, T+S, D]
    values = torch.cat([doc_values, tail_values[0].to(doc_values.dtype)], dim=1).float()
    q = query[0].float().view(num_kv_heads, num_heads // num_kv_heads * num_queries, head_dim)
    logits = (q @ keys.transpose(1, 2) * scaling).view(num_kv_heads, -1, num_queries, keys.shape[1])
    if tail_mask is not None:
        doc_visible = torch.ones(num_queries, num_doc, dtype=torch.bool, device=tail_mask.device)
        logits = logits.masked_fill(~torch.cat([doc_visible, tail_mask], dim=1), -math.inf)
    probs = torch.softmax(logits, dim=-1).view(num_kv_heads, -1, keys.shape[1])
    return (probs @ values).reshape(1, num_heads, num_queries, head_dim).to(query.dtype)


def _attend(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scaling: float) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns its log-sum-exp.

    query [Hkv, G, N, D], keys/values [Hkv, M, D] fp32, mask [Hkv, N, M] bool or None
    -> out [Hkv, G, N, D], lse [Hkv, G, N]. A row with no visible key gives out 0 and lse -inf.
    """
    num_kv_heads, group, num_queries, head_dim = query.shape
    if keys.shape[1] == 0:
        return torch.zeros_like(query), query.new_full((num_kv_heads, group, num_queries), -math.inf)
    logits = torch.bmm(query.reshape(num_kv_heads, group * num_queries, head_dim), keys.transpose(1, 2))
    logits = logits.mul_(scaling).view(num_kv_heads, group, num_queries, keys.shape[1])
    if mask is not None:
        logits.masked_fill_(~mask[:, None], -math.inf)
    peak = logits.amax(dim=-1, keepdim=True)  # [Hkv, G, N, 1]
    peak = peak.masked_fill_(peak == -math.inf, 0.0)  # a fully masked row: exp(-inf) = 0 below
    probs = logits.sub_(peak).exp_()  # in place: one pass, every value <= 1
    total = probs.sum(dim=-1)  # [Hkv, G, N], 0 only where nothing is visible
    out = torch.bmm(probs.view(num_kv_heads, group * num_queries, -1), values)
    out = out.view(num_kv_heads, group, num_queries, head_dim) / total.masked_fill(total == 0, 1.0)[..., None]
    return out, peak.squeeze(-1) + torch.log(total)
