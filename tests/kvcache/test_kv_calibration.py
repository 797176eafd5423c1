import dataclasses

import pytest
import torch
from kv_synthetic import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALING, planted_keys

from kvcache.calibration import Thresholds, calibrate_rest, calibrate_thresholds, selected_fraction, weighted_quantiles
from kvcache.clustering import ClusterConfig, cluster_layer
from kvcache.selection import TopBudgetRule

BUDGETS = (0.05, 0.10, 0.20)


@pytest.fixture(scope="module")
def calibrated():
    keys, directions, _ = planted_keys(4000, num_directions=24, seed=0, noise=1.0)
    layer = cluster_layer(keys, keys, ClusterConfig(fraction=0.05))
    # Stand-in queries: the document's own last keys, as [H, W, D], one copy per head of a group.
    generator = torch.Generator().manual_seed(1)
    stand_in = keys[:, -64:].repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)
    stand_in = stand_in + 0.5 * torch.randn(NUM_HEADS, 64, HEAD_DIM, generator=generator)
    return layer, stand_in, calibrate_thresholds(stand_in, layer, SCALING, BUDGETS)


def test_weighted_quantiles_docstring_example():
    scores = torch.tensor([[-1.0, -3.0, -2.0, -4.0]])
    weights = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
    assert weighted_quantiles(scores, weights, (0.5,)).tolist() == [[-2.0]]
    assert weighted_quantiles(scores, weights, (0.4, 0.41, 1.0)).tolist() == [[-1.0, -2.0, -4.0]]


def test_a_budget_of_one_is_every_score_despite_rounding():
    scores = torch.tensor([[-1.0, -2.0, -3.0]])
    weights = torch.tensor([[1.0, 1e-9, 1e-9]])  # the float cumulative sum is 1.0 from the first score on
    assert weighted_quantiles(scores, weights, (1.0,)).tolist() == [[-3.0]]


def test_budget_one_thresholds_read_every_cluster(calibrated):
    layer, stand_in, _ = calibrated
    thresholds = calibrate_thresholds(stand_in, layer, SCALING, (1.0,))
    assert (selected_fraction(stand_in, layer, thresholds.rule(1.0), SCALING) == 1.0).all()


def test_thresholds_hit_the_budget_on_the_calibration_queries(calibrated):
    layer, stand_in, thresholds = calibrated
    assert thresholds.log_thresholds.shape == (NUM_KV_HEADS, len(BUDGETS))
    # A bigger budget is a lower threshold.
    assert (thresholds.log_thresholds[:, :-1] >= thresholds.log_thresholds[:, 1:]).all()
    for budget in BUDGETS:
        fraction = selected_fraction(stand_in, layer, thresholds.rule(budget), SCALING)
        # At least the budget, over it by at most one cluster for one query (plus ties).
        assert (fraction >= budget).all(), fraction
        assert (fraction <= budget + 0.01).all(), fraction


def test_top_budget_rule_covers_its_fraction_per_query(calibrated):
    layer, stand_in, _ = calibrated
    fraction = selected_fraction(stand_in, layer, TopBudgetRule(0.1), SCALING)
    largest = layer.sizes.max() / layer.num_tokens
    assert (fraction >= 0.1).all() and (fraction < 0.1 + largest).all()


def test_huge_logits_calibrate_to_finite_thresholds(calibrated):
    layer, stand_in, _ = calibrated
    thresholds = calibrate_thresholds(stand_in * 1e5, layer, SCALING, BUDGETS)
    assert torch.isfinite(thresholds.log_thresholds).all()
    assert (selected_fraction(stand_in * 1e5, layer, thresholds.rule(0.1), SCALING) >= 0.1).all()


def test_thresholds_rule_names_a_calibrated_budget():
    thresholds = Thresholds((0.1, 0.2), torch.tensor([[-1.0, -2.0]] * NUM_KV_HEADS))
    assert thresholds.rule(0.2).log_thresholds.tolist() == [-2.0] * NUM_KV_HEADS
    assert thresholds.rule(0.2, expand_fraction=0.5).expand_fraction == 0.5
    with pytest.raises(KeyError):
        thresholds.rule(0.15)
    with pytest.raises(ValueError):
        calibrate_thresholds(torch.zeros(NUM_HEADS, 1, HEAD_DIM), None, SCALING, (0.0,))


def uniform_clusters(norm: float = 3.0):
    """A layer whose clusters each hold one repeated key and value (the rest estimate is exact there), and
    stand-in queries near its keys; the larger the keys' norm, the sharper the attention."""
    keys, _, labels = planted_keys(2000, num_directions=40, seed=3, norm=norm, noise=0.0)
    values = torch.randn(NUM_KV_HEADS, 40, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    values = values.gather(1, labels[..., None].expand(-1, -1, HEAD_DIM))
    layer = cluster_layer(keys, values, ClusterConfig(fraction=0.05))
    assert (layer.key_variances < 1e-4).all()  # each cluster holds one direction (k-means merged none)
    stand_in = keys[:, -32:].repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)
    stand_in = stand_in + 0.3 * torch.randn(NUM_HEADS, 32, HEAD_DIM, generator=torch.Generator().manual_seed(5))
    return layer, stand_in


def test_calibrate_rest_estimates_where_the_estimate_is_exact():
    layer, stand_in = uniform_clusters()
    thresholds = calibrate_rest(stand_in, layer, calibrate_thresholds(stand_in, layer, SCALING, BUDGETS), SCALING)
    assert thresholds.rest_estimated.tolist() == [True] * len(BUDGETS)
    assert thresholds.estimates_rest(0.1) and torch.equal(thresholds.log_thresholds,
                                                           calibrate_thresholds(stand_in, layer, SCALING,
                                                                                BUDGETS).log_thresholds)


def test_calibrate_rest_ignores_where_the_estimate_overcounts():
    layer, stand_in = uniform_clusters(norm=8.0)  # the budget's clusters hold nearly all the attention
    # A spread no cluster has: every unread cluster's estimated mass grows by the same factor per query, so the
    # selection keeps its order while the estimate overcounts what it leaves out.
    spread = dataclasses.replace(layer, key_variances=torch.full_like(layer.key_variances, 64.0))
    thresholds = calibrate_rest(stand_in, spread, calibrate_thresholds(stand_in, spread, SCALING, BUDGETS), SCALING)
    assert thresholds.rest_estimated.tolist() == [False] * len(BUDGETS)
    assert not thresholds.estimates_rest(0.2)


def test_calibrate_rest_keeps_ignoring_when_every_cluster_is_read():
    layer, stand_in = uniform_clusters()
    thresholds = calibrate_thresholds(stand_in, layer, SCALING, BUDGETS)
    every = torch.ones(layer.sizes.shape, dtype=torch.bool)  # always read: nothing is left to estimate
    assert calibrate_rest(stand_in, layer, thresholds, SCALING, always_read=every).rest_estimated.tolist() == [
        False
    ] * len(BUDGETS)  # a tie keeps the cheaper choice


def test_estimates_rest_needs_a_calibrated_choice_and_budget():
    with pytest.raises(KeyError, match="not calibrated"):
        Thresholds((0.1,), torch.zeros(NUM_KV_HEADS, 1)).estimates_rest(0.1)
    with pytest.raises(KeyError, match="0.15"):
        Thresholds((0.1,), torch.zeros(NUM_KV_HEADS, 1), torch.tensor([True])).estimates_rest(0.15)
