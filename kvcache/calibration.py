"""Per-layer thresholds on log S_j for named KV budgets, calibrated on stand-in queries.

The last W document positions' queries stand in for future queries (DESIGN 4.5). For a budget b
(fraction of the document keys) and a kv head, the threshold is the weighted quantile of the
group scores log S_j over (query, cluster) pairs, each weighing N_j / (W * T), so that reading
the clusters at or above it covers about b of the keys on the calibration queries.

Shapes: H query heads, Hkv kv heads, G = H / Hkv, W calibration queries, C clusters, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcache.clustering import ClusteredLayer
from kvcache.selection import SelectionRule, ThresholdRule, cluster_log_weights, select_clusters

DEFAULT_BUDGETS = (0.05, 0.10, 0.125, 0.20, 0.30)  # 0.125 with estimate_rest: the preset's 99%; 0.3: refined keys


@dataclass(frozen=True)
class Thresholds:
    """One layer's calibrated thresholds: log_thresholds[h, i] is kv head h's for budgets[i]."""

    budgets: tuple[float, ...]
    log_thresholds: Tensor  # [Hkv, len(budgets)] fp32

    def rule(self, budget: float, expand_fraction: float | None = None) -> ThresholdRule:
        """The threshold rule of one named budget (must be one of `budgets`)."""
        if budget not in self.budgets:
            raise KeyError(f"budget {budget} was not calibrated; have {self.budgets}")
        column = self.budgets.index(budget)
        return ThresholdRule(self.log_thresholds[:, column].contiguous(), expand_fraction)


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
