"""Per-layer thresholds on log S_j for named KV budgets, calibrated on stand-in queries.

The last W document positions' queries stand in for future queries (DESIGN 4.5). For a budget b
(fraction of the document keys) and a kv head, the threshold is the weighted quantile of the
group scores log S_j over (query, cluster) pairs, each weighing N_j / (W * T), so that reading
the clusters at or above it covers about b of the keys on the calibration queries.

The same queries also decide, per layer and budget, whether counting the unread clusters by centroid and
mean value (squeezed attention's estimate_rest) brings the layer's attention output closer to dense attention
than leaving them out: `calibrate_rest`.

Shapes: H query heads, Hkv kv heads, G = H / Hkv, W calibration queries, C clusters, D head dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kvcache.clustering import ClusteredLayer
from kvcache.selection import SelectionRule, ThresholdRule, cluster_log_weights, select_clusters
from kvcache.squeezed import full_document_attention, squeezed_with_and_without_rest

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (0.05, 0.10, 0.125, 0.20, 0.30)  # 0.125 with estimate_rest: the preset's 99%; 0.3: refined keys
QUERY_CHUNK = 64  # calibrate_rest's queries per squeezed call: their rows stay within the native kernel's


@dataclass(frozen=True)
class Thresholds:
    """One layer's calibrated thresholds: log_thresholds[h, i] is kv head h's for budgets[i]; rest_estimated[i]
    whether estimating the unread clusters helped this layer at budgets[i] (None: not calibrated)."""

    budgets: tuple[float, ...]
    log_thresholds: Tensor  # [Hkv, len(budgets)] fp32
    rest_estimated: Tensor | None = None  # [len(budgets)] bool

    def rule(self, budget: float, expand_fraction: float | None = None) -> ThresholdRule:
        """The threshold rule of one named budget (must be one of `budgets`)."""
        if budget not in self.budgets:
            raise KeyError(f"budget {budget} was not calibrated; have {self.budgets}")
        column = self.budgets.index(budget)
        return ThresholdRule(self.log_thresholds[:, column].contiguous(), expand_fraction)

    def estimates_rest(self, budget: float) -> bool:
        """Whether calibration found the unread-cluster estimate closer to dense at `budget` (see calibrate_rest)."""
        if self.rest_estimated is None:
            raise KeyError("the rest estimate was not calibrated for these thresholds")
        if budget not in self.budgets:
            raise KeyError(f"budget {budget} was not calibrated; have {self.budgets}")
        return bool(self.rest_estimated[self.budgets.index(budget)])


def calibrate_thresholds(
    queries: Tensor,  # [H, W, D] after RoPE
    layer: ClusteredLayer,
    scaling: float,
    budgets: tuple[float, ...] = DEFAULT_BUDGETS,
) -> Thresholds:
    """Thresholds such that on `queries` about budgets[i] of each kv head's keys are selected."""
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"budgets must be fractions in (0, 1], got {budgets}")
    scores = cluster_log_weights(_grouped(queries, layer), layer, scaling).amax(dim=1)  # [Hkv, W, C]
    num_kv_heads, num_queries, _ = scores.shape
    weights = (layer.float_sizes / (num_queries * layer.num_tokens))[:, None, :].expand_as(scores)
    thresholds = weighted_quantiles(scores.reshape(num_kv_heads, -1), weights.reshape(num_kv_heads, -1), budgets)
    return Thresholds(tuple(budgets), thresholds)


def calibrate_rest(
    queries: Tensor,  # [H, W, D] after RoPE
    layer: ClusteredLayer,
    thresholds: Thresholds,
    scaling: float,
    always_read: Tensor | None = None,  # [Hkv, C] bool, as squeezed attention will be given it
) -> Thresholds:
    """`thresholds` with rest_estimated set: per budget, whether estimating the unread clusters gives the calibration
    queries a smaller attention error against dense attention over the whole document than ignoring them.

    The error is the mean over query rows of |o - o_dense|^2 / |o_dense|^2, with o each row's attention output
    (fp32). A tie (every cluster read) keeps the cheaper choice, ignoring. The stand-in queries are scored as
    decode steps after the document, as calibrate_thresholds scores them.
    """
    num_kv_heads, _, head_dim = layer.keys.shape
    query = queries[None].to(layer.keys.dtype)  # [1, H, W, D]
    empty = layer.keys.new_empty(1, num_kv_heads, 0, head_dim)
    dense = full_document_attention(query, layer, empty, empty, None, scaling).float()
    scale = dense.square().sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)  # [1, H, W]

    def error_pair(rule: ThresholdRule) -> tuple[float, float]:  # (ignored, estimated)
        outs = [squeezed_with_and_without_rest(chunk, layer, rule, empty, empty, None, scaling, always_read)
                for chunk in query.split(QUERY_CHUNK, dim=2)]
        return tuple(float(((torch.cat(mode, dim=2).float() - dense).square().sum(dim=-1) / scale).mean())
                     for mode in zip(*outs, strict=True))

    errors = [error_pair(rule) for rule in map(thresholds.rule, thresholds.budgets)]
    log.debug("rest errors (ignored, estimated) per budget %s: %s", thresholds.budgets, errors)
    return replace(thresholds, rest_estimated=torch.tensor([estimated < ignored for ignored, estimated in errors]))


def weighted_quantiles(scores: Tensor, weights: Tensor, budgets: tuple[float, ...]) -> Tensor:
    """Per row, the highest cutoff whose scores at or above it weigh at least each budget.

    scores, weights [R, K] (weights of a row sum to 1) -> [R, len(budgets)].

    Example: scores [-1, -3, -2, -4], weights [0.4, 0.2, 0.3, 0.1], budget 0.5: best first the
    cumulative weights are 0.4, 0.7, 0.9, 1.0; 0.7 is the first to reach 0.5, at score -2, so the
    cutoff is -2 (selecting the scores -1 and -2, weight 0.7).
    """
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    cumulative = torch.cumsum(weights.gather(1, order), dim=-1)  # [R, K]
    targets = torch.tensor(budgets, dtype=cumulative.dtype, device=scores.device)
    # Float sums may end a hair below 1, so clamp to the last position.
    position = torch.searchsorted(cumulative, targets.expand(scores.shape[0], -1).contiguous())
    # A budget of 1 is every score, even where the float sum reaches 1 before the last one.
    position = position.masked_fill(targets >= 1.0, scores.shape[1] - 1)
    return sorted_scores.gather(1, position.clamp(max=scores.shape[1] - 1))


def selected_fraction(queries: Tensor, layer: ClusteredLayer, rule: SelectionRule, scaling: float) -> Tensor:
    """Mean fraction of each kv head's document keys that `rule` selects per query: [Hkv] fp32.

    queries [H, W, D] after RoPE.
    """
    selected = select_clusters(_grouped(queries, layer), layer, rule, scaling)  # [Hkv, W, C]
    keys = (selected * layer.sizes[:, None, :]).sum(dim=-1).float()  # [Hkv, W]
    return keys.mean(dim=1) / layer.num_tokens


def _grouped(queries: Tensor, layer: ClusteredLayer) -> Tensor:
    """[H, W, D] -> [Hkv, G, W, D] fp32 (query head h*G + g belongs to kv head h)."""
    num_heads, num_queries, head_dim = queries.shape
    num_kv_heads = layer.keys.shape[0]
    return queries.float().reshape(num_kv_heads, num_heads // num_kv_heads, num_queries, head_dim)
