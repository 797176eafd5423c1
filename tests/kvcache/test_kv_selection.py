import math

import pytest
import torch
from kv_synthetic import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALING, planted_keys

from kvcache import selection
from kvcache.clustering import ClusterConfig, cluster_layer, layer_from_assignments
from kvcache.selection import (
    VARIANCE_WEIGHT,
    ThresholdRule,
    TopBudgetRule,
    centroid_logits,
    cluster_log_weights,
    hierarchical_log_weights,
    padded_ranges,
    select_clusters,
    top_budget,
)

GROUP = NUM_HEADS // NUM_KV_HEADS


def grouped_queries(num_queries: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_KV_HEADS, GROUP, num_queries, HEAD_DIM, generator=generator)


@pytest.fixture(scope="module")
def layer():
    keys, _, _ = planted_keys(3000, num_directions=20, seed=0)
    return cluster_layer(keys, torch.randn_like(keys), ClusterConfig(fraction=0.05, coarse_fraction=0.1))


def test_top_budget_docstring_example():
    sizes = torch.tensor([[4, 2, 3, 1]])
    scores = torch.tensor([[[-3.0, -1.0, -2.0, -4.0]]])
    assert top_budget(scores, sizes, 5).tolist() == [[[False, True, True, False]]]
    assert top_budget(scores, sizes, 5.5).tolist() == [[[True, True, True, False]]]
    never = torch.tensor([[[-3.0, -1.0, -math.inf, -4.0]]])
    assert top_budget(never, sizes, 100).tolist() == [[[True, True, False, True]]]


def test_padded_ranges_docstring_example():
    offsets = torch.tensor([[0, 2, 5], [0, 4, 5]])
    selected = torch.tensor([[False, True], [True, True]])
    indices, valid = padded_ranges(offsets, selected)
    assert indices.tolist() == [[2, 3, 4, 0, 0], [0, 1, 2, 3, 4]]
    assert valid.tolist() == [[True, True, True, False, False], [True] * 5]


def test_log_weights_are_normalised_even_for_huge_logits(layer):
    # Logits reach ~4e6 at scale 1e4 (the spread term grows with q^2), where fp32 resolves ~0.4.
    for scale in (1.0, 1e4):
        query = grouped_queries(4, seed=1) * scale
        tolerance = max(1e-5, 1e-7 * float(centroid_logits(query, layer, SCALING).abs().max()))
        log_weights = cluster_log_weights(query, layer, SCALING)
        nonempty = layer.sizes > 0
        assert torch.isfinite(log_weights[nonempty[:, None, None, :].expand_as(log_weights)]).all()
        # sum_j N_j S_j = 1: the estimated attention weights of all keys sum to one.
        total = torch.logsumexp(log_weights + torch.log(layer.sizes.float())[:, None, None, :], dim=-1)
        torch.testing.assert_close(total, torch.zeros_like(total), atol=tolerance, rtol=0)


def test_empty_clusters_score_minus_infinity_and_are_never_selected():
    keys = torch.randn(NUM_KV_HEADS, 6, HEAD_DIM)
    assignments = torch.tensor([[0, 0, 1, 1, 3, 3]] * NUM_KV_HEADS)
    layer = layer_from_assignments(keys, keys, assignments, num_clusters=4)
    log_weights = cluster_log_weights(grouped_queries(2, seed=2), layer, SCALING)
    assert (log_weights[..., 2] == -math.inf).all() and torch.isfinite(log_weights[..., [0, 1, 3]]).all()
    everything = ThresholdRule(torch.full((NUM_KV_HEADS,), -math.inf))
    assert select_clusters(grouped_queries(2, seed=2), layer, everything, SCALING)[..., 2].logical_not().all()


def test_group_selects_a_cluster_if_any_of_its_heads_would(layer):
    query = grouped_queries(3, seed=3)
    log_weights = cluster_log_weights(query, layer, SCALING)  # [Hkv, G, N, C]
    thresholds = torch.quantile(log_weights.flatten(1), 0.9, dim=1)  # [Hkv]
    selected = select_clusters(query, layer, ThresholdRule(thresholds), SCALING)
    per_head = log_weights >= thresholds[:, None, None, None]
    assert torch.equal(selected, per_head.any(dim=1))
    assert selected.any() and not selected.all()


def test_hierarchical_lookup_expanding_everything_equals_flat(layer):
    query = grouped_queries(5, seed=4)
    flat = cluster_log_weights(query, layer, SCALING)
    hierarchical = hierarchical_log_weights(query, layer, 1.0, SCALING)
    torch.testing.assert_close(hierarchical, flat, atol=1e-5, rtol=0)
    for flat_rule, hierarchical_rule in (
        (TopBudgetRule(0.2), TopBudgetRule(0.2, expand_fraction=1.0)),
        (ThresholdRule(torch.full((NUM_KV_HEADS,), -7.0)), ThresholdRule(torch.full((NUM_KV_HEADS,), -7.0), 1.0)),
    ):
        assert torch.equal(
            select_clusters(query, layer, flat_rule, SCALING), select_clusters(query, layer, hierarchical_rule, SCALING)
        )


def test_hierarchical_lookup_selects_only_inside_expanded_coarse_clusters(layer):
    query = grouped_queries(2, seed=5)
    log_weights = hierarchical_log_weights(query, layer, 0.2, SCALING)  # [Hkv, G, N, C]
    scored = torch.isfinite(log_weights).any(dim=1)  # [Hkv, N, C]
    coarse_of_fine = layer.coarse.fine_to_coarse()
    for head in range(NUM_KV_HEADS):
        for query_index in range(2):
            groups = torch.unique(coarse_of_fine[head, scored[head, query_index]])
            keys = layer.coarse.sizes[head, groups].sum()
            # The expanded coarse clusters just cover 20% of the keys (the crossing one included).
            assert keys >= 0.2 * layer.num_tokens
            assert keys - layer.coarse.sizes[head, groups].max() < 0.2 * layer.num_tokens
    selected = select_clusters(query, layer, TopBudgetRule(0.1, expand_fraction=0.2), SCALING)
    assert not (selected & ~scored).any()
    # Where the expanded clusters are scored, the scores agree with the flat ones up to the denominator.
    flat = cluster_log_weights(query, layer, SCALING)
    shift = log_weights - flat
    finite = torch.isfinite(log_weights)
    spread = shift.masked_fill(~finite, -math.inf).amax(-1) - shift.masked_fill(~finite, math.inf).amin(-1)
    assert (spread < 1e-4).all()


def test_rules_validate_fractions():
    with pytest.raises(ValueError):
        TopBudgetRule(0.0)
    with pytest.raises(ValueError):
        TopBudgetRule(0.1, expand_fraction=1.5)


@pytest.mark.parametrize("native_scoring", [True, False])
def test_cluster_logits_add_the_weighted_spread_of_the_keys(layer, native_scoring, monkeypatch):
    """l_j = q.C_j * s + VARIANCE_WEIGHT * s^2 / 2 * sum_d q_d^2 var_jd, in C and in torch alike."""
    if not native_scoring:
        monkeypatch.setattr(selection.native, "supports", lambda *args: False)
    query = grouped_queries(3, seed=4)
    expected = torch.einsum("hgnd,hcd->hgnc", query, layer.centroids) * SCALING
    expected += torch.einsum("hgnd,hcd->hgnc", query**2, layer.key_variances) * (VARIANCE_WEIGHT * SCALING**2 / 2)
    torch.testing.assert_close(centroid_logits(query, layer, SCALING), expected, atol=1e-4, rtol=1e-4)


def test_a_spread_cluster_outranks_a_tight_one_with_the_same_mean():
    """Keys mu +- d along the query hold more attention than keys all at mu (the mean of exp exceeds exp of the
    mean), and the spread term says so, where mean logits alone tie."""
    direction = torch.zeros(HEAD_DIM)
    direction[0] = 1.0
    tight = direction.expand(8, -1)
    spread = torch.cat([direction.expand(4, -1) * 3, direction.expand(4, -1) * -1])  # mean: the same direction
    keys = torch.cat([tight, spread])[None]
    layer = layer_from_assignments(keys, keys, torch.tensor([[0] * 8 + [1] * 8]), 2)
    logits = centroid_logits(direction.expand(1, 1, 1, -1) * 4, layer, SCALING)[0, 0, 0]
    assert torch.equal(layer.centroids[0, 0], layer.centroids[0, 1]) and logits[1] > logits[0]
    true_mass = torch.logsumexp(keys[0, 8:] @ direction * 4 * SCALING, 0) - math.log(8)
    assert logits[1] - logits[0] < true_mass - logits[0]  # a hedged Gaussian estimate: below the true excess
