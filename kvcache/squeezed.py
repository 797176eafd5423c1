"""Squeezed attention: exact attention over the selected document clusters plus the dense tail.

One function serves decode (N=1) and tree verification (N>1). The document part reads only the
keys of the clusters the queries selected (contiguous slices of the cluster-ordered cache), each query
only its own clusters. Two paths compute it exactly:
  - native (CPU, bf16 or fp32 caches, kvcache.native): a C kernel reads the selected slices in place
    with an fp32 online softmax; SDPA attends over the tail (question, generated tokens, tree nodes,
    under the tree mask); the two parts merge by their log-sum-exp. For the default threshold rule C
    also scores the centroids and turns the scores into key ranges (about 10% of a 128K decode's
    attention time went to the dozen torch ops that did it);
  - gathered (anywhere else, or without a C compiler): the selected rows are copied into one buffer
    followed by the tail, and one SDPA call attends over it under one mask.
Scoring the centroids is fp32. With keep_fraction the selected clusters are only candidates: each query keeps
its best candidate keys by q.k (two stages, csrc refined_attention or a torch gather), reading the values of
those alone.

Shapes: B batch (1), H query heads, Hkv kv heads, G = H / Hkv, N queries, T document tokens,
S tail tokens, M gathered document keys per kv head, C clusters, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvcache import native
from kvcache.clustering import ClusteredLayer
from kvcache.gqa import fold_mask, fold_queries, grouped_sdpa
from kvcache.selection import SelectionRule, ThresholdRule, centroid_logits, padded_ranges, score_clusters


@dataclass
class SqueezeStats:
    """Running count of document keys read, summed over calls (and layers, if shared).

    keys_read: keys whose K was read (per kv head, the union over the N queries).
    values_read: keys whose V was read; the same as keys_read unless the keys are refined (keep_fraction).
    keys_selected: keys each query attended to, summed over queries.
    """

    doc_keys: int = 0  # Hkv * T per call
    queries: int = 0  # N per call
    keys_read: int = 0
    keys_selected: int = 0
    values_read: int = 0
    query_keys: int = 0  # Hkv * T * N per call: what keys_selected would be if every query attended to every key

    def add(self, doc_keys: int, queries: int, keys_read: int, keys_selected: int, values_read: int | None = None):
        self.doc_keys += doc_keys
        self.queries += queries
        self.query_keys += doc_keys * queries
        self.keys_read += keys_read
        self.keys_selected += keys_selected
        self.values_read += keys_read if values_read is None else values_read

    @property
    def read_fraction(self) -> float:
        """Fraction of the document's KV bytes actually read (K and V weigh the same)."""
        return (self.keys_read + self.values_read) / max(2 * self.doc_keys, 1)

    @property
    def selected_fraction(self) -> float:
        """Fraction of the document keys one query attends to, on average."""
        return self.keys_selected / max(self.query_keys, 1)


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
    estimate_rest: bool = False,
    keep_fraction: float | None = None,
) -> Tensor:  # [B, H, N, D], dtype of query
    """Attention of N queries over the selected document clusters and the masked tail.

    For N > 1 each query reads only its own clusters, so every query gets exactly what it would get alone.
    keep_fraction: refine the keys (two stages). The selected clusters are candidates; each query scores their
    keys by q.k (the max over its group's heads) and attends exactly to the keep_fraction * T best, plus every key
    of an `always_read` cluster; the candidates it drops count at their exact logit holding their cluster's mean
    value. Single keys hold more attention mass than whole clusters for the same values read; the candidates'
    keys are read, but only the kept keys' values.
    estimate_rest: also count the clusters a query does not read, each as its N_j keys at the centroid's
    logit holding the cluster's mean value (one more softmax part over the centroids already scored).
    That is exact for clusters whose keys and values are all equal, and it keeps the attention mass of
    broad layers that no budget covers; without it the unread clusters weigh nothing.
    """
    rest, parts, out = _squeezed_parts(query, doc, rule, tail_keys, tail_values, tail_mask, scaling, stats,
                                       always_read, estimate_rest, keep_fraction)
    if parts:
        out = _merge(([rest] if rest is not None else []) + parts).reshape(query.shape).to(query.dtype)
    return out


def squeezed_with_and_without_rest(
    query: Tensor, doc: ClusteredLayer, rule: SelectionRule, tail_keys: Tensor, tail_values: Tensor,
    tail_mask: Tensor | None, scaling: float, always_read: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """squeezed_attention with the unread clusters ignored and with them estimated ([B, H, N, D] each, dtype of
    query), from one selection and one read of the selected clusters: the estimate is one more softmax part."""
    rest, parts, _ = _squeezed_parts(query, doc, rule, tail_keys, tail_values, tail_mask, scaling, None,
                                     always_read, True, None)
    return tuple(_merge(merged).reshape(query.shape).to(query.dtype) for merged in (parts, [rest] + parts))


def _squeezed_parts(
    query: Tensor, doc: ClusteredLayer, rule: SelectionRule, tail_keys: Tensor, tail_values: Tensor,
    tail_mask: Tensor | None, scaling: float, stats: SqueezeStats | None, always_read: Tensor | None,
    estimate_rest: bool, keep_fraction: float | None,
) -> tuple[tuple[Tensor, Tensor] | None, list[tuple[Tensor, Tensor]], Tensor | None]:  # fmt: skip
    """squeezed_attention's work before the merge: (the estimated rest's softmax part or None, the parts of the
    read keys and the tail, or [] when the torch path attended in one call, returning `out` instead of parts)."""
    batch, num_heads, num_queries, head_dim = query.shape
    assert batch == 1, f"squeezed attention serves one document at a time, got batch {batch}"
    num_kv_heads = doc.keys.shape[0]
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads for {num_kv_heads} kv heads"
    group = num_heads // num_kv_heads
    q = query[0].float().view(num_kv_heads, group, num_queries, head_dim)
    native_path = native.supports(doc.keys, group * num_queries)
    keep = None if keep_fraction is None else max(1, round(keep_fraction * doc.num_tokens))
    values_read = None
    parts: list[tuple[Tensor, Tensor]] = []
    rest, out = None, None

    if native_path and _flat_threshold(rule, doc):  # scoring, selection and the rest estimate in C as well
        logits = centroid_logits(q, doc, scaling).view(num_kv_heads, group * num_queries, -1)
        *ranges, keys_read, keys_selected = native.select_ranges(
            logits, rule.log_thresholds, doc.float_sizes, doc.offsets, always_read, num_queries
        )
        ranges = KeyRanges(*ranges)
        if estimate_rest:
            rest_out, rest_lse = native.rest_estimate(
                logits, rule.log_thresholds, doc.float_sizes, always_read, doc.compact_value_means, num_queries
            )
            rest = (rest_out[None], rest_lse[None])
    else:
        selected, logits = score_clusters(q, doc, rule, scaling)  # [Hkv, N, C], [Hkv, G, N, C]
        if always_read is not None:
            selected = selected | always_read[:, None, :]
        union = selected.any(dim=1)  # [Hkv, C], the clusters read
        if stats is not None:
            keys_read, keys_selected = int((union * doc.sizes).sum()), int((selected * doc.sizes[:, None, :]).sum())
        ranges = KeyRanges.of(doc, selected, union, group, always_read) if native_path else None
        if estimate_rest:
            rest = _estimated_rest(logits, selected, doc)

    if keep is not None:
        if ranges is not None:
            doc_part, (keys_read, values_read, keys_selected) = _refined_native(query, doc, ranges, keep, scaling)
        else:
            doc_part, (keys_read, values_read, keys_selected) = _refined_gathered(
                query, doc, selected, union, always_read, keep, scaling
            )
        rows = fold_queries(query.to(doc.keys.dtype), num_kv_heads)
        parts += [doc_part, _tail_part(rows, tail_keys, tail_values, tail_mask, group, scaling)]
    elif ranges is not None:
        parts += _ranges_parts(query, doc, ranges, tail_keys, tail_values, tail_mask, scaling)
    elif estimate_rest:
        parts.append(_gathered_part(query, doc, selected, union, tail_keys, tail_values, tail_mask, scaling))
    else:
        out = _gathered_attention(query, doc, selected, union, tail_keys, tail_values, tail_mask, scaling)
    if stats is not None:
        stats.add(num_kv_heads * doc.num_tokens, num_queries, keys_read, keys_selected, values_read)
    return rest, parts, out


def _flat_threshold(rule: SelectionRule, doc: ClusteredLayer) -> bool:
    """Whether `rule` is a threshold on the centroid scores with no coarse level in the way (native selection)."""
    return isinstance(rule, ThresholdRule) and (rule.expand_fraction is None or doc.coarse is None)


@dataclass(frozen=True)
class KeyRanges:
    """The document clusters some query reads, as key ranges in head-major order (kv head h owns ranges
    range_offsets[h]:range_offsets[h+1]) and, for N > 1 queries, which query rows read each range."""

    starts: Tensor  # [Q] int64
    ends: Tensor  # [Q] int64
    range_offsets: Tensor  # [Hkv+1] int64
    row_mask: Tensor | None  # [Q, G*N] bool (rows g*N + n); None: every row reads every range
    pinned: Tensor | None = None  # [Q] bool: the range is an always-read cluster (its keys survive refinement)
    clusters: Tensor | None = None  # [Q] int64: the range's cluster

    @classmethod
    def of(
        cls, doc: ClusteredLayer, selected: Tensor, union: Tensor, group: int, always_read: Tensor | None = None
    ) -> KeyRanges:
        """From the selection [Hkv, N, C], its union over queries [Hkv, C] and the pinned clusters [Hkv, C]."""
        num_kv_heads, num_queries, _ = selected.shape
        heads, clusters = union.nonzero(as_tuple=True)  # head-major, so each head's ranges are consecutive
        range_offsets = torch.zeros(num_kv_heads + 1, dtype=torch.int64)
        range_offsets[1:] = torch.bincount(heads, minlength=num_kv_heads).cumsum(0)
        row_mask = None if num_queries == 1 else selected[heads, :, clusters].repeat(1, group)  # [Q, G*N]
        pinned = None if always_read is None else always_read[heads, clusters]
        starts, ends = doc.offsets[heads, clusters], doc.offsets[heads, clusters + 1]
        return cls(starts, ends, range_offsets, row_mask, pinned, clusters)


def _ranges_parts(
    query: Tensor, doc: ClusteredLayer, ranges: KeyRanges, tail_keys: Tensor, tail_values: Tensor,
    tail_mask: Tensor | None, scaling: float,
) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
    """The native path: the kernel reads the ranges in place, SDPA the tail; each part as
    (out [1, Hkv, G*N, D], lse [1, Hkv, G*N])."""
    _, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = doc.keys.shape[0]
    group = num_heads // num_kv_heads
    folded = query[0].float().reshape(num_kv_heads, group * num_queries, head_dim) * scaling
    doc_out, doc_lse = native.range_attention(
        folded, doc.keys, doc.values, ranges.starts, ranges.ends, ranges.range_offsets, ranges.row_mask,
        round_probs=doc.keys.dtype == torch.bfloat16,  # the rounding the dense bf16 path has
    )  # fmt: skip
    rows = fold_queries(query.to(doc.keys.dtype), num_kv_heads)  # [1, Hkv, G*N, D]
    return [(doc_out[None], doc_lse[None]), _tail_part(rows, tail_keys, tail_values, tail_mask, group, scaling)]


def _refined_native(
    query: Tensor, doc: ClusteredLayer, ranges: KeyRanges, keep: int, scaling: float
) -> tuple[tuple[Tensor, Tensor], tuple[int, int, int]]:
    """The native two-stage document part (out [1, Hkv, G*N, D], lse [1, Hkv, G*N]) and its counts: keys whose K
    was read, keys whose V was read, keys kept summed over queries."""
    _, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = doc.keys.shape[0]
    folded = query[0].float().reshape(num_kv_heads, -1, head_dim) * scaling
    out, lse, counts = native.refined_attention(
        folded, doc.keys, doc.values, ranges.starts, ranges.ends, ranges.range_offsets, ranges.row_mask,
        ranges.pinned, num_queries, keep, round_probs=doc.keys.dtype == torch.bfloat16,  # as the dense bf16 path
        means=doc.compact_value_means, clusters=ranges.clusters,
    )  # fmt: skip
    return (out[None], lse[None]), counts


def _refined_gathered(
    query: Tensor, doc: ClusteredLayer, selected: Tensor, union: Tensor, always_read: Tensor | None, keep: int,
    scaling: float,
) -> tuple[tuple[Tensor, Tensor], tuple[int, int, int]]:  # fmt: skip
    """The torch two-stage path (see squeezed_attention's keep_fraction): the document part (out [1, Hkv, G*N, D],
    lse [1, Hkv, G*N]) over each query's candidate keys, and the counts as _refined_native returns them."""
    _, num_heads, num_queries, head_dim = query.shape
    num_kv_heads = doc.keys.shape[0]
    group = num_heads // num_kv_heads
    indices, valid = padded_ranges(doc.offsets, union)  # [Hkv, M]
    cluster = torch.searchsorted(doc.offsets[:, 1:].contiguous(), indices, right=True)  # [Hkv, M]
    reads = selected.gather(2, cluster[:, None, :].expand(-1, num_queries, -1)) & valid[:, None, :]  # [Hkv, N, M]
    keys = torch.stack([doc.keys[h, indices[h]] for h in range(num_kv_heads)]).float()
    values = torch.stack([doc.values[h, indices[h]] for h in range(num_kv_heads)]).float()
    q = query[0].float().reshape(num_kv_heads, group * num_queries, head_dim)
    logits = (q @ keys.transpose(1, 2) * scaling).view(num_kv_heads, group, num_queries, -1)
    logits = logits.masked_fill(~reads[:, None], -math.inf)
    score = logits.amax(dim=1)  # [Hkv, N, M]
    if always_read is not None:
        score = score.masked_fill(always_read.gather(1, cluster)[:, None, :] & reads, math.inf)
    kept = reads
    if 0 < keep < score.shape[-1]:
        kept = reads & (score >= score.topk(keep, dim=-1).values[..., -1:])
    logits = logits.view(num_kv_heads, group * num_queries, -1)
    lse = torch.logsumexp(logits, dim=-1)  # over every candidate read; -inf for a row that read nothing
    probs = torch.exp(logits - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    kept_rows = kept[:, None].expand(-1, group, -1, -1).reshape(probs.shape)
    kept_probs, dropped_probs = probs * kept_rows, probs * ~kept_rows
    if doc.keys.dtype == torch.bfloat16:  # the rounding the dense bf16 path has
        kept_probs = kept_probs.bfloat16().float()
    means = doc.value_means.gather(1, cluster[..., None].expand(-1, -1, head_dim))  # [Hkv, M, D]
    out = kept_probs @ values + dropped_probs @ means
    counts = (int(valid.sum()), int(kept.any(dim=1).sum()), int(kept.sum()))
    return (out[None], lse[None]), counts


def _gathered_rows(
    query: Tensor, doc: ClusteredLayer, selected: Tensor, union: Tensor, tail_keys: Tensor, tail_values: Tensor,
    tail_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """The selected clusters' rows copied into one buffer with the tail: keys, values [Hkv, M+S, D] and the
    mask [1, Hkv, N, M+S] bool (None when every query sees every gathered key)."""
    num_queries = query.shape[2]
    num_kv_heads = doc.keys.shape[0]
    indices, valid = padded_ranges(doc.offsets, union)  # [Hkv, M]
    keys, values = _gather_with_tail(doc, indices, tail_keys[0], tail_values[0])  # [Hkv, M+S, D]
    if num_queries > 1:
        cluster = torch.searchsorted(doc.offsets[:, 1:].contiguous(), indices, right=True)  # [Hkv, M]
        doc_mask = selected.gather(2, cluster[:, None, :].expand(-1, num_queries, -1)) & valid[:, None, :]
    else:
        doc_mask = valid[:, None, :]  # the union is the query's own selection
    if num_queries == 1 and tail_mask is None and bool(valid.all()):
        return keys, values, None
    num_tail = tail_keys.shape[2]
    tail_part = (
        doc_mask.new_ones(num_kv_heads, num_queries, num_tail)
        if tail_mask is None
        else tail_mask[None].expand(num_kv_heads, -1, -1)
    )
    return keys, values, torch.cat([doc_mask, tail_part], dim=2)[None]


def _gathered_attention(
    query: Tensor, doc: ClusteredLayer, selected: Tensor, union: Tensor, tail_keys: Tensor, tail_values: Tensor,
    tail_mask: Tensor | None, scaling: float,
) -> Tensor:  # fmt: skip
    """The torch path: one SDPA call over the gathered rows -> [1, H, N, D]."""
    num_kv_heads, head_dim = doc.keys.shape[0], query.shape[3]
    group, num_queries = query.shape[1] // num_kv_heads, query.shape[2]
    keys, values, mask = _gathered_rows(query, doc, selected, union, tail_keys, tail_values, tail_mask)
    if not keys.shape[1]:
        return torch.zeros_like(query)
    out = grouped_sdpa(query.to(keys.dtype), keys[None], values[None], mask, scaling).to(query.dtype)
    if mask is not None:
        seen = mask.any(dim=-1, keepdim=True)  # a query that sees nothing gets zeros, not NaN
        if not bool(seen.all()):
            out = out.view(1, num_kv_heads, group, num_queries, head_dim).masked_fill(~seen[:, :, None], 0.0)
            out = out.view(query.shape)
    return out


def _gathered_part(
    query: Tensor, doc: ClusteredLayer, selected: Tensor, union: Tensor, tail_keys: Tensor, tail_values: Tensor,
    tail_mask: Tensor | None, scaling: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The torch path as one softmax part with its log-sum-exp: out [1, Hkv, G*N, D], lse [1, Hkv, G*N]."""
    num_kv_heads = doc.keys.shape[0]
    keys, values, mask = _gathered_rows(query, doc, selected, union, tail_keys, tail_values, tail_mask)
    rows = fold_queries(query.to(keys.dtype), num_kv_heads)
    mask = None if mask is None else fold_mask(mask, query.shape[1] // num_kv_heads)
    return _attention_with_lse(rows, keys[None], values[None], mask, scaling)


def _estimated_rest(logits: Tensor, selected: Tensor, doc: ClusteredLayer) -> tuple[Tensor, Tensor]:
    """The clusters a query does not read, each as N_j keys at its centroid logit holding its mean value.

    logits [Hkv, G, N, C] (-inf = not scored), selected [Hkv, N, C] -> out [1, Hkv, G*N, D], lse [1, Hkv, G*N].
    """
    num_kv_heads, group, num_queries, _ = logits.shape
    mass = (logits + doc.log_sizes[:, None, None, :]).masked_fill_(selected[:, None], -math.inf)
    lse = torch.logsumexp(mass, dim=-1)  # [Hkv, G, N]; -inf when every cluster is read
    weights = mass.sub_(lse.masked_fill(lse == -math.inf, 0.0)[..., None]).exp_()
    weights = weights.view(num_kv_heads, group * num_queries, -1)
    if native.supports(doc.keys, 0):  # reads only the clusters with weight, bf16 for a bf16 cache
        out = native.weighted_means(weights, doc.compact_value_means)
    else:
        out = torch.bmm(weights, doc.value_means)
    return out[None], lse.reshape(1, num_kv_heads, -1)


def _gather_with_tail(
    doc: ClusteredLayer, indices: Tensor, tail_keys: Tensor, tail_values: Tensor
) -> tuple[Tensor, Tensor]:
    """Per kv head, the document rows `indices` [Hkv, M] followed by the tail [Hkv, S, D] -> [Hkv, M+S, D] each.

    Rows are copied straight into one buffer (no concatenation pass), viewed as int64 words where the
    row size allows: that copy runs about 1.7x faster than one of bf16 elements here.
    """
    num_kv_heads, num_rows = indices.shape
    out = []
    for stored, tail in ((doc.keys, tail_keys), (doc.values, tail_values)):
        buffer = stored.new_empty(num_kv_heads, num_rows + tail.shape[1], stored.shape[2])
        source, target = _as_words(stored), _as_words(buffer)
        for head in range(num_kv_heads):
            torch.index_select(source[head], 0, indices[head], out=target[head, :num_rows])
        buffer[:, num_rows:] = tail
        out.append(buffer)
    return out[0], out[1]


def _as_words(rows: Tensor) -> Tensor:
    """A contiguous [..., D] tensor viewed as int64 words per row when D * itemsize divides by 8."""
    if rows.is_contiguous() and rows.shape[-1] * rows.element_size() % 8 == 0:
        return rows.view(torch.int64)
    return rows


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
    q = query[0].float().reshape(num_kv_heads, num_heads // num_kv_heads * num_queries, head_dim)
    logits = (q @ keys.transpose(1, 2) * scaling).view(num_kv_heads, -1, num_queries, keys.shape[1])
    if tail_mask is not None:
        doc_visible = torch.ones(num_queries, num_doc, dtype=torch.bool, device=tail_mask.device)
        logits = logits.masked_fill(~torch.cat([doc_visible, tail_mask], dim=1), -math.inf)
    probs = torch.softmax(logits, dim=-1).view(num_kv_heads, -1, keys.shape[1])
    return (probs @ values).reshape(1, num_heads, num_queries, head_dim).to(query.dtype)


def full_document_attention(
    query: Tensor,  # [B, H, N, D]
    doc: ClusteredLayer,
    tail_keys: Tensor,  # [B, Hkv, S, D]
    tail_values: Tensor,  # [B, Hkv, S, D]
    tail_mask: Tensor | None,  # [N, S] bool or None
    scaling: float,
    stats: SqueezeStats | None = None,
) -> Tensor:  # [B, H, N, D], dtype of query
    """Every document key plus the masked tail, for the layers that attend too broadly to squeeze.

    The stored cluster-ordered keys are read in place (attention ignores key order): the document part
    and the tail part each return their log-sum-exp and are merged with it, so nothing is copied. GQA:
    the G query heads of a kv head are folded into its query rows.
    """
    batch, num_heads, num_queries, head_dim = query.shape
    assert batch == 1, f"squeezed attention serves one document at a time, got batch {batch}"
    num_kv_heads = doc.keys.shape[0]
    group = num_heads // num_kv_heads
    folded = fold_queries(query.to(doc.keys.dtype), num_kv_heads)
    doc_part = _attention_with_lse(folded, doc.keys[None], doc.values[None], None, scaling)
    out = _merge([doc_part, _tail_part(folded, tail_keys, tail_values, tail_mask, group, scaling)])
    if stats is not None:
        doc_keys = num_kv_heads * doc.num_tokens
        stats.add(doc_keys, num_queries, doc_keys, doc_keys * num_queries)
    return out.reshape(1, num_heads, num_queries, head_dim).to(query.dtype)


def _tail_part(
    rows: Tensor, tail_keys: Tensor, tail_values: Tensor, tail_mask: Tensor | None, group: int, scaling: float
) -> tuple[Tensor, Tensor]:
    """Folded query rows [1, Hkv, G*N, D] over the tail under its mask [N, S] -> (out, lse) as one softmax part."""
    mask = None if tail_mask is None else fold_mask(tail_mask, group)[None, None]  # [1, 1, G*N, S]
    return _attention_with_lse(rows, tail_keys.to(rows.dtype), tail_values.to(rows.dtype), mask, scaling)


def _merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Softmax parts (out [1, Hkv, R, D], lse [1, Hkv, R]) over disjoint keys -> their joint softmax, fp32."""
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    lse = lse.masked_fill(lse == -math.inf, 0.0)  # a query that sees nothing gets zeros, not NaN
    return sum(torch.exp(part_lse - lse)[..., None] * part_out.float() for part_out, part_lse in parts)


def _attention_with_lse(
    query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scaling: float
) -> tuple[Tensor, Tensor]:
    """query [1, Hkv, R, D], keys / values [1, Hkv, L, D], mask [1, 1|Hkv, R, L] bool or None
    -> out [1, Hkv, R, D], lse [1, Hkv, R] fp32; a row that sees nothing gets out 0 and lse -inf.

    On the CPU, torch's flash kernel (the one SDPA calls) returns the log-sum-exp it computes anyway;
    elsewhere an fp32 softmax does.
    """
    if keys.shape[2] == 0:
        return torch.zeros_like(query), query.new_full(query.shape[:3], -math.inf, dtype=torch.float32)
    if query.device.type == "cpu":
        additive = None if mask is None else torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, -math.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, False, attn_mask=additive, scale=scaling
        )
    else:
        logits = (query.float() @ keys.float().transpose(-1, -2)) * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(logits, dim=-1)
        out = torch.exp(logits - lse.nan_to_num(neginf=0.0)[..., None]) @ values.float()
    if mask is not None:
        seen = mask.any(dim=-1).expand_as(lse)
        lse = lse.masked_fill(~seen, -math.inf)
        out = out.masked_fill(~seen[..., None], 0.0)
    return out, lse
