"""Which document clusters each query reads: centroid scores, GQA grouping and the selection rules.

A query scores every cluster j with the estimated attention weight of each of its keys,
S_j = exp(l_j) / sum_i N_i exp(l_i)  (DESIGN 4.5), kept as log S_j in log-sum-exp form so huge logits
cannot overflow. DESIGN's cluster logit is the mean one, l_j = q.C_j * scaling; the mean of exp over a
cluster is larger than exp of the mean, by exp(s^2/2 * sum_d q_d^2 var_jd) for Gaussian keys (var_jd: the
cluster's key variance in dimension d, s = scaling). We add VARIANCE_WEIGHT times that term:
l_j = q.C_j * s + VARIANCE_WEIGHT * s^2/2 * sum_d q_d^2 var_jd, for the selection, the calibration and the
estimate of the clusters not read alike. GQA: the G query heads of one KV group share
that group's clusters; a cluster is scored for the group by the MAX of log S_j over its heads, so a
cluster is read if any head of the group wants it (no head loses a key it would have chosen alone).

Shapes: Hkv kv heads, G query heads per kv head, N queries, C clusters, Cc coarse clusters, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kvcache import native
from kvcache.clustering import ClusteredLayer, ranges_to_indices

# Measured on `default/4` at 128K (a throwaway script over one prefill, thresholds recalibrated per weight, every
# layer squeezed, 256 teacher-forced steps): top-1 agreement at 10% of the keys with the unread clusters estimated
# 97.3 / 98.0 / 98.8 / 98.4% at weights 0 / 0.25 / 0.5 / 0.75, and 96.9 -> 98.0% (weight 0.5) without the estimate;
# at 30% with the estimate 98.8 -> 99.2%. At 32K 96.5 -> 97.3% (estimated) and 92.2 -> 91.8% (not); weight 1 there
# fell to 87.9%: the Gaussian term overrates clusters whose logits spread without a tail.
VARIANCE_WEIGHT = 0.5


@dataclass(frozen=True)
class ThresholdRule:
    """Read cluster j when the group's log S_j >= log_thresholds[kv head] (see kvcache.calibration).

    expand_fraction: None for a flat lookup over all centroids; otherwise (layers with a coarse
    level) first expand the best coarse clusters covering this fraction of the keys, then score
    only their fine clusters.
    """

    log_thresholds: Tensor  # [Hkv] fp32
    expand_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_fraction("expand_fraction", self.expand_fraction)


@dataclass(frozen=True)
class TopBudgetRule:
    """Read the best-scoring clusters, best first, until `fraction` of the document keys is covered.

    expand_fraction: as in ThresholdRule.
    """

    fraction: float
    expand_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_fraction("fraction", self.fraction)
        _check_fraction("expand_fraction", self.expand_fraction)


SelectionRule = ThresholdRule | TopBudgetRule


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def select_clusters(query: Tensor, layer: ClusteredLayer, rule: SelectionRule, scaling: float) -> Tensor:
    """query [Hkv, G, N, D] fp32 -> selected [Hkv, N, C] bool (shared by the G heads of a group)."""
    return score_clusters(query, layer, rule, scaling)[0]


def score_clusters(query: Tensor, layer: ClusteredLayer, rule: SelectionRule, scaling: float) -> tuple[Tensor, Tensor]:
    """query [Hkv, G, N, D] fp32 -> selected [Hkv, N, C] bool and the centroid logits q.C_j * scaling
    [Hkv, G, N, C] fp32 they were chosen from (-inf for a cluster the hierarchical lookup did not score)."""
    if rule.expand_fraction is None or layer.coarse is None:
        logits = centroid_logits(query, layer, scaling)
        log_weights = _normalised(logits, layer.log_sizes)
    else:
        log_weights, logits = _hierarchical_scores(query, layer, rule.expand_fraction, scaling)
    group_scores = log_weights.amax(dim=1)  # [Hkv, N, C]
    if isinstance(rule, ThresholdRule):
        thresholds = rule.log_thresholds.to(group_scores.device)[:, None, None]
        return (group_scores >= thresholds) & (group_scores > -math.inf), logits
    return top_budget(group_scores, layer.sizes, rule.fraction * layer.num_tokens), logits


def centroid_logits(query: Tensor, layer: ClusteredLayer, scaling: float) -> Tensor:
    """The cluster logits l_j (module docstring): query [Hkv, G, N, D] fp32 -> [Hkv, G, N, C] fp32."""
    num_kv_heads, group, num_queries, head_dim = query.shape
    rows = query.reshape(num_kv_heads, group * num_queries, head_dim)
    spread = VARIANCE_WEIGHT * scaling * scaling / 2
    if native.supports(layer.keys, 0):  # bf16 centroids for a bf16 cache: half the bytes of this memory-bound pass
        if spread:
            logits = native.centroid_logits(torch.cat([rows * scaling, rows * rows * spread], 2), layer.compact_scoring)
        else:
            logits = native.centroid_logits(rows * scaling, layer.compact_centroids)
    else:
        logits = torch.bmm(rows, layer.centroids_by_dim) * scaling
        if spread:
            logits += torch.bmm(rows * rows, layer.variances_by_dim) * spread
    return logits.view(num_kv_heads, group, num_queries, -1)


def cluster_log_weights(query: Tensor, layer: ClusteredLayer, scaling: float) -> Tensor:
    """log S_j for every query head and cluster: query [Hkv, G, N, D] fp32 -> [Hkv, G, N, C] fp32.

    Empty clusters get -inf (they hold no key).
    """
    return _normalised(centroid_logits(query, layer, scaling), layer.log_sizes)


def _normalised(logits: Tensor, log_sizes: Tensor) -> Tensor:
    """log S_j = logit_j - log sum_i N_i exp(logit_i); -inf for an empty cluster. log_sizes [Hkv, C]."""
    log_sizes = log_sizes[:, None, None, :]
    denominator = torch.logsumexp(logits + log_sizes, dim=-1, keepdim=True)
    return (logits - denominator).masked_fill_(log_sizes == -math.inf, -math.inf)


def hierarchical_log_weights(query: Tensor, layer: ClusteredLayer, expand_fraction: float, scaling: float) -> Tensor:
    """log S_j scored through the coarse level: [Hkv, G, N, D] fp32 -> [Hkv, G, N, C] fp32 (see below)."""
    return _hierarchical_scores(query, layer, expand_fraction, scaling)[0]


def _hierarchical_scores(
    query: Tensor, layer: ClusteredLayer, expand_fraction: float, scaling: float
) -> tuple[Tensor, Tensor]:
    """log S_j scored through the coarse level, and the fine logits: [Hkv, G, N, D] fp32 -> 2 x [Hkv, G, N, C].

    Each query (per kv group) expands the best coarse clusters covering `expand_fraction` of the keys
    and scores only their fine clusters; the others get -inf. The softmax denominator sums the
    expanded fine clusters exactly and the unexpanded coarse clusters through their coarse
    centroids, so with everything expanded this equals cluster_log_weights.
    """
    coarse = layer.coarse
    assert coarse is not None
    num_heads, group, num_queries, head_dim = query.shape
    num_clusters = layer.num_clusters
    coarse_logits = torch.einsum("hgnd,hcd->hgnc", query, coarse.centroids) * scaling  # [Hkv, G, N, Cc]
    coarse_mass = coarse_logits + _log_sizes(coarse.sizes)[:, None, None, :]
    coarse_scores = (coarse_mass - torch.logsumexp(coarse_mass, dim=-1, keepdim=True)).amax(dim=1)
    expanded = top_budget(coarse_scores, coarse.sizes, expand_fraction * layer.num_tokens)  # [Hkv, N, Cc]

    # Score the union over queries of the expanded fine clusters, each query keeping only its own.
    fine, valid = padded_ranges(coarse.offsets, expanded.any(dim=1))  # [Hkv, F]
    centroids = layer.centroids.gather(1, fine[..., None].expand(-1, -1, head_dim))
    variances = layer.key_variances.gather(1, fine[..., None].expand(-1, -1, head_dim))
    fine_logits = torch.einsum("hgnd,hfd->hgnf", query, centroids) * scaling  # [Hkv, G, N, F], as centroid_logits
    fine_logits += torch.einsum("hgnd,hfd->hgnf", query * query, variances) * (VARIANCE_WEIGHT * scaling**2 / 2)
    fine_coarse = coarse.fine_to_coarse().gather(1, fine)  # [Hkv, F]
    own = expanded.gather(2, fine_coarse[:, None, :].expand(-1, num_queries, -1)) & valid[:, None, :]
    fine_logits = fine_logits.masked_fill(~own[:, None], -math.inf)
    # Padding goes to a spare column C so it never collides with a real cluster in the scatter.
    column = fine.masked_fill(~valid, num_clusters)[:, None, None, :].expand_as(fine_logits)
    logits = torch.full((num_heads, group, num_queries, num_clusters + 1), -math.inf, device=query.device)
    logits = logits.scatter(3, column, fine_logits)[..., :num_clusters]  # [Hkv, G, N, C]

    log_sizes = layer.log_sizes[:, None, None, :]
    unexpanded_mass = coarse_mass.masked_fill(expanded[:, None], -math.inf)
    denominator = torch.logaddexp(
        torch.logsumexp(logits + log_sizes, dim=-1, keepdim=True),
        torch.logsumexp(unexpanded_mass, dim=-1, keepdim=True),
    )
    return (logits - denominator).masked_fill(log_sizes == -math.inf, -math.inf), logits


def top_budget(scores: Tensor, sizes: Tensor, budget_keys: float) -> Tensor:
    """Take clusters best first until `budget_keys` keys are covered (the crossing cluster included).

    scores [Hkv, N, C] (-inf = never take), sizes [Hkv, C] -> selected [Hkv, N, C] bool.

    Example: sizes [4, 2, 3, 1], scores [-3, -1, -2, -4], budget_keys 5: best first the clusters
    are 1 (2 keys), 2 (3 keys), 0, 3; keys before each are 0, 2, 5, 9, so clusters 1 and 2 are
    taken -> [False, True, True, False].
    """
    order = torch.sort(scores, dim=-1, descending=True).indices  # [Hkv, N, C]
    sorted_sizes = sizes[:, None, :].expand_as(scores).gather(2, order)
    keys_before = torch.cumsum(sorted_sizes, dim=-1) - sorted_sizes
    take = (keys_before < budget_keys) & (scores.gather(2, order) > -math.inf)
    return torch.zeros_like(take).scatter(2, order, take)


def padded_ranges(offsets: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """Per head, the indices of the selected ranges, padded to the longest head.

    offsets [Hkv, K+1], selected [Hkv, K] bool -> indices [Hkv, M] int64 (padding 0), valid [Hkv, M] bool.

    Example: offsets [[0, 2, 5], [0, 4, 5]], selected [[False, True], [True, True]]
    -> indices [[2, 3, 4, 0, 0], [0, 1, 2, 3, 4]], valid [[T, T, T, F, F], [T, T, T, T, T]].
    """
    per_head = [ranges_to_indices(offsets[h], selected[h]) for h in range(offsets.shape[0])]
    indices = pad_sequence(per_head, batch_first=True, padding_value=-1)
    valid = indices >= 0
    return indices.clamp(min=0), valid


def _log_sizes(sizes: Tensor) -> Tensor:
    """log N_j as fp32; -inf for an empty cluster, so it weighs nothing in any sum."""
    return torch.log(sizes.float())
