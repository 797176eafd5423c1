import math

import pytest
import torch
from kv_synthetic import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, SCALING, ancestor_mask, planted_keys, random_tree_mask

from kvcache import native
from kvcache.calibration import calibrate_thresholds
from kvcache.clustering import ClusterConfig, cluster_layer, layer_from_assignments, ranges_to_indices
from kvcache.selection import ThresholdRule, TopBudgetRule, select_clusters
from kvcache.squeezed import (
    SqueezeStats,
    dense_attention,
    full_document_attention,
    squeezed_attention,
    squeezed_with_and_without_rest,
)

NUM_DOC, NUM_PREFIX = 2000, 6
EVERY_CLUSTER = (
    TopBudgetRule(1.0),
    ThresholdRule(torch.full((NUM_KV_HEADS,), -math.inf)),
    TopBudgetRule(1.0, expand_fraction=1.0),
)


@pytest.fixture(autouse=True, params=["native", "gathered"])
def path(request, monkeypatch):
    """Every test runs on both squeezed-attention paths: the C kernel and the torch gather."""
    if request.param == "native" and native.load() is None:
        pytest.skip("no C compiler here for the native kernel")
    if request.param == "gathered":
        monkeypatch.setattr(native, "supports", lambda keys, rows: False)
    return request.param


@pytest.fixture(scope="module")
def document():
    keys, directions, _ = planted_keys(NUM_DOC, num_directions=16, seed=0)
    values = torch.randn(NUM_KV_HEADS, NUM_DOC, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    layer = cluster_layer(keys, values, ClusterConfig(fraction=0.05, coarse_fraction=0.2))
    return keys, values, directions, layer


def tail(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator),
        torch.randn(1, NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator),
    )


def queries(num_queries: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(1, NUM_HEADS, num_queries, HEAD_DIM, generator=generator)


def test_ancestor_mask_helper():
    assert ancestor_mask([-1, 0, 0, 1]).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


@pytest.mark.parametrize("rule", EVERY_CLUSTER, ids=["top_budget", "threshold", "hierarchical"])
def test_decode_with_every_cluster_equals_dense(document, rule):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=2)
    query = queries(1, seed=3)
    stats = SqueezeStats()
    out = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING, stats)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING)
    assert out.shape == (1, NUM_HEADS, 1, HEAD_DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert stats.read_fraction == 1.0 and stats.selected_fraction == 1.0


@pytest.mark.parametrize("rule", EVERY_CLUSTER, ids=["top_budget", "threshold", "hierarchical"])
def test_tree_with_every_cluster_equals_dense(document, rule):
    keys, values, _, layer = document
    num_nodes = 16
    tail_keys, tail_values = tail(NUM_PREFIX + num_nodes, seed=4)
    tail_mask = random_tree_mask(num_nodes, NUM_PREFIX, seed=5)
    query = queries(num_nodes, seed=6)
    out = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, tail_mask, SCALING)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dense_reference_ignores_key_order(document):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=7)
    query = queries(3, seed=8)
    torch.testing.assert_close(
        dense_attention(query, layer.keys, layer.values, tail_keys, tail_values, None, SCALING),
        dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING),
    )


def test_tail_mask_is_respected(document):
    _, _, _, layer = document
    num_nodes = 8
    tail_keys, tail_values = tail(NUM_PREFIX + num_nodes, seed=9)
    tail_mask = random_tree_mask(num_nodes, NUM_PREFIX, seed=10)
    query = queries(num_nodes, seed=11)
    rule = TopBudgetRule(0.3)
    out = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING)
    all_visible = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING)
    torch.testing.assert_close(
        all_visible, squeezed_attention(query, layer, rule, tail_keys, tail_values, torch.ones_like(tail_mask), SCALING)
    )
    # Changing a token hidden from a node leaves that node's output exactly as it was.
    hidden = NUM_PREFIX + num_nodes - 1  # the last node: only it (and descendants, none) can see itself
    changed_keys, changed_values = tail_keys.clone(), tail_values.clone()
    changed_keys[..., hidden, :] += 5.0
    changed_values[..., hidden, :] -= 5.0
    changed = squeezed_attention(query, layer, rule, changed_keys, changed_values, tail_mask, SCALING)
    blind = ~tail_mask[:, hidden]
    assert blind.any() and not blind.all()
    assert torch.equal(changed[:, :, blind], out[:, :, blind])
    assert not torch.allclose(changed[:, :, ~blind], out[:, :, ~blind])


def test_each_tree_query_gets_what_it_would_get_alone(document):
    _, _, _, layer = document
    num_nodes = 5
    tail_keys, tail_values = tail(NUM_PREFIX + num_nodes, seed=12)
    tail_mask = random_tree_mask(num_nodes, NUM_PREFIX, seed=13)
    query = queries(num_nodes, seed=14)
    threshold = calibrate_thresholds(queries(64, seed=15)[0], layer, SCALING, (0.1,)).rule(0.1)
    for rule in (TopBudgetRule(0.1), TopBudgetRule(0.1, expand_fraction=0.3), threshold):
        stats = SqueezeStats()
        together = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING, stats)
        for node in range(num_nodes):
            alone = squeezed_attention(
                query[:, :, node : node + 1], layer, rule, tail_keys, tail_values, tail_mask[node : node + 1], SCALING
            )
            torch.testing.assert_close(together[:, :, node : node + 1], alone, atol=1e-6, rtol=1e-6)
        # The union over the nodes is read, each node attends to about its own 10%.
        assert stats.selected_fraction < stats.read_fraction < 1.0
        assert 0.1 <= stats.selected_fraction < 0.2 or rule is threshold


def test_gqa_heads_of_a_group_share_its_kv_head(document):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=15)
    query = queries(2, seed=16)
    out = squeezed_attention(query, layer, TopBudgetRule(1.0), tail_keys, tail_values, None, SCALING)
    group = NUM_HEADS // NUM_KV_HEADS
    for head in range(NUM_HEADS):
        kv = head // group  # transformers' repeat_kv layout
        all_keys = torch.cat([keys[kv], tail_keys[0, kv]])
        all_values = torch.cat([values[kv], tail_values[0, kv]])
        probs = torch.softmax(query[0, head] @ all_keys.T * SCALING, dim=-1)
        torch.testing.assert_close(out[0, head], probs @ all_values, atol=1e-5, rtol=1e-5)


def test_huge_logits_stay_finite_and_exact(document):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=17)
    query = queries(3, seed=18, scale=1e4)
    out = squeezed_attention(query, layer, TopBudgetRule(1.0), tail_keys, tail_values, None, SCALING)
    assert torch.isfinite(out).all()
    expected = dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_bf16_cache_matches_the_fp32_reference_to_bf16_precision(document):
    keys, values, _, _ = document
    layer = cluster_layer(keys.bfloat16(), values.bfloat16(), ClusterConfig())
    tail_keys, tail_values = tail(NUM_PREFIX, seed=19)
    query = queries(2, seed=20).bfloat16()
    args = (tail_keys.bfloat16(), tail_values.bfloat16(), None, SCALING)
    out = squeezed_attention(query, layer, TopBudgetRule(1.0), *args)
    assert out.dtype == torch.bfloat16
    # SDPA's bf16 kernel rounds the probabilities to bf16 before multiplying the values: a few ulps.
    torch.testing.assert_close(out, dense_attention(query, layer.keys, layer.values, *args), atol=1e-3, rtol=2e-2)


def test_empty_tail_and_a_query_that_sees_nothing(document):
    keys, values, _, layer = document
    empty_keys, empty_values = tail(0, seed=21)
    query = queries(2, seed=22)
    out = squeezed_attention(query, layer, TopBudgetRule(1.0), empty_keys, empty_values, None, SCALING)
    torch.testing.assert_close(out, dense_attention(query, keys, values, empty_keys, empty_values, None, SCALING))
    # No cluster passes an infinite threshold; with the tail hidden too, the output is zero, not NaN.
    tail_keys, tail_values = tail(3, seed=23)
    nothing = ThresholdRule(torch.full((NUM_KV_HEADS,), math.inf))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    stats = SqueezeStats()
    out = squeezed_attention(query, layer, nothing, tail_keys, tail_values, mask, SCALING, stats)
    assert torch.equal(out, torch.zeros_like(out)) and stats.keys_read == 0


def test_empty_clusters_are_harmless():
    keys = torch.randn(NUM_KV_HEADS, 50, HEAD_DIM)
    values = torch.randn(NUM_KV_HEADS, 50, HEAD_DIM)
    assignments = torch.randint(0, 5, (NUM_KV_HEADS, 50)) * 2  # odd clusters stay empty
    layer = layer_from_assignments(keys, values, assignments, num_clusters=10)
    tail_keys, tail_values = tail(2, seed=24)
    query = queries(3, seed=25)
    for rule in (TopBudgetRule(1.0), ThresholdRule(torch.full((NUM_KV_HEADS,), -math.inf))):
        out = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING)
        torch.testing.assert_close(out, dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING))


def test_small_budget_reads_few_keys_with_small_error(document):
    """Queries pointing at one planted direction: 10% of the keys carry nearly all attention."""
    keys, values, directions, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=26)
    generator = torch.Generator().manual_seed(27)
    target = torch.randint(0, 16, (NUM_KV_HEADS,), generator=generator)
    aimed = directions[torch.arange(NUM_KV_HEADS), target]  # [Hkv, D]
    query = 20 * aimed.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)[None, :, None, :]
    query = query + torch.randn(1, NUM_HEADS, 1, HEAD_DIM, generator=generator)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING)
    for rule in (TopBudgetRule(0.1), TopBudgetRule(0.1, expand_fraction=0.3)):
        stats = SqueezeStats()
        out = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING, stats)
        assert stats.read_fraction < 0.15
        relative_error = (out - expected).norm() / expected.norm()
        assert relative_error < 0.02, relative_error


def test_batch_must_be_one(document):
    _, _, _, layer = document
    tail_keys, tail_values = tail(2, seed=28)
    with pytest.raises(AssertionError):
        squeezed_attention(
            queries(1, seed=29).expand(2, -1, -1, -1),
            layer,
            TopBudgetRule(1.0),
            tail_keys.expand(2, -1, -1, -1),
            tail_values.expand(2, -1, -1, -1),
            None,
            SCALING,
        )


@pytest.mark.parametrize("num_queries", [1, 16])
def test_full_document_attention_equals_dense(document, num_queries):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX + num_queries, seed=30)
    tail_mask = None if num_queries == 1 else random_tree_mask(num_queries, NUM_PREFIX, seed=31)
    query = queries(num_queries, seed=32)
    stats = SqueezeStats()
    out = full_document_attention(query, layer, tail_keys, tail_values, tail_mask, SCALING, stats)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, tail_mask, SCALING)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert stats.read_fraction == 1.0 and stats.selected_fraction == 1.0


def test_full_document_attention_in_bf16_and_with_a_hidden_tail(document):
    keys, values, _, _ = document
    layer = cluster_layer(keys.bfloat16(), values.bfloat16(), ClusterConfig())
    tail_keys, tail_values = tail(4, seed=33)
    query = queries(2, seed=34).bfloat16()
    hidden = torch.zeros(2, 4, dtype=torch.bool)  # the tail is invisible: the document alone decides
    args = (tail_keys.bfloat16(), tail_values.bfloat16(), hidden, SCALING)
    out = full_document_attention(query, layer, *args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, dense_attention(query, layer.keys, layer.values, *args), atol=1e-3, rtol=2e-2)


def test_estimated_rest_is_exact_for_singleton_clusters():
    """A cluster of one key is its own centroid and mean value, so the estimate of the unread ones is exact."""
    generator = torch.Generator().manual_seed(40)
    keys = torch.randn(NUM_KV_HEADS, 300, HEAD_DIM, generator=generator)
    values = torch.randn(NUM_KV_HEADS, 300, HEAD_DIM, generator=generator)
    layer = layer_from_assignments(keys, values, torch.arange(300).expand(NUM_KV_HEADS, -1), num_clusters=300)
    tail_keys, tail_values = tail(NUM_PREFIX, seed=41)
    num_nodes = 5
    tail_mask = random_tree_mask(num_nodes, NUM_PREFIX - num_nodes, seed=42)
    query = queries(num_nodes, seed=43)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, tail_mask, SCALING)
    for rule in (TopBudgetRule(0.1), ThresholdRule(torch.full((NUM_KV_HEADS,), math.inf))):  # 10%, nothing read
        out = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING, estimate_rest=True)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        without = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING)
        assert (without - expected).abs().max() > 1e-2  # the estimate is what makes it exact


@pytest.mark.parametrize("rule", EVERY_CLUSTER, ids=["top_budget", "threshold", "hierarchical"])
def test_estimated_rest_is_empty_when_every_cluster_is_read(document, rule):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=44)
    query = queries(3, seed=45)
    out = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING, estimate_rest=True)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_estimated_rest_cuts_the_error_of_a_small_budget(document):
    """Planted clusters: the unread ones are tight, so their centroid and mean value stand in for them well."""
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=46)
    query = queries(4, seed=47, scale=0.5)  # broad attention, so the unread clusters carry real mass
    expected = dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING)
    rule = TopBudgetRule(0.05)
    plain = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING)
    estimated = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING, estimate_rest=True)
    plain_error, estimated_error = (plain - expected).norm(), (estimated - expected).norm()
    assert estimated_error < 0.5 * plain_error, (plain_error, estimated_error)


@pytest.mark.parametrize("num_queries", [1, 5])
def test_with_and_without_rest_are_squeezed_attentions_two_outputs(document, num_queries):
    """One selection and one read serve both outputs: what two squeezed_attention calls return."""
    _, _, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=48)
    mask = random_tree_mask(num_queries, NUM_PREFIX - num_queries, seed=49)
    query = queries(num_queries, seed=50, scale=0.5)
    sinks = torch.zeros(layer.sizes.shape, dtype=torch.bool)
    sinks[:, 0] = True
    for rule in (TopBudgetRule(0.05), ThresholdRule(torch.zeros(NUM_KV_HEADS))):
        ignored, estimated = squeezed_with_and_without_rest(query, layer, rule, tail_keys, tail_values, mask,
                                                            SCALING, sinks)
        for out, estimate_rest in ((ignored, False), (estimated, True)):
            expected = squeezed_attention(query, layer, rule, tail_keys, tail_values, mask, SCALING,
                                          always_read=sinks, estimate_rest=estimate_rest)
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        assert (ignored - estimated).abs().max() > 1e-3


@pytest.mark.parametrize("rule", EVERY_CLUSTER[:2], ids=["top_budget", "threshold"])
@pytest.mark.parametrize("num_queries", [1, 16])
def test_refining_every_key_of_every_cluster_equals_dense(document, rule, num_queries):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX + num_queries, seed=30)
    tail_mask = random_tree_mask(num_queries, NUM_PREFIX, seed=31) if num_queries > 1 else None
    query = queries(num_queries, seed=32).transpose(1, 2).contiguous().transpose(1, 2)  # strided as transformers's
    stats = SqueezeStats()
    out = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING, stats, keep_fraction=1.0)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, tail_mask, SCALING)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert stats.read_fraction == 1.0 and stats.selected_fraction == 1.0


def test_each_tree_query_refines_what_it_would_alone(document):
    _, _, _, layer = document
    num_nodes = 5
    tail_keys, tail_values = tail(NUM_PREFIX + num_nodes, seed=33)
    tail_mask = random_tree_mask(num_nodes, NUM_PREFIX, seed=34)
    query = queries(num_nodes, seed=35)
    pinned = torch.zeros(layer.sizes.shape, dtype=torch.bool)
    pinned[:, :3] = True
    threshold = calibrate_thresholds(queries(64, seed=36)[0], layer, SCALING, (0.3,)).rule(0.3)
    for rule in (TopBudgetRule(0.3), threshold):
        stats = SqueezeStats()
        together = squeezed_attention(
            query, layer, rule, tail_keys, tail_values, tail_mask, SCALING, stats, pinned, keep_fraction=0.1
        )
        for node in range(num_nodes):
            alone = squeezed_attention(
                query[:, :, node : node + 1], layer, rule, tail_keys, tail_values, tail_mask[node : node + 1],
                SCALING, None, pinned, keep_fraction=0.1,
            )  # fmt: skip
            torch.testing.assert_close(together[:, :, node : node + 1], alone, atol=1e-6, rtol=1e-6)
        # Each node attends to its 10% (ties and pinned keys may add a few); V is read for the kept keys only.
        assert 0.1 <= stats.selected_fraction < 0.12
        assert stats.values_read < stats.keys_read


def test_refinement_attends_to_the_best_candidate_keys_and_the_tail(document):
    """Decode: the query attends exactly to the keep_fraction * T candidate keys of highest max-over-heads logit,
    and to the other candidates at their logit holding their cluster's mean value."""
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=41)
    query = queries(1, seed=42, scale=3.0)
    rule = TopBudgetRule(0.3)
    out = squeezed_attention(query, layer, rule, tail_keys, tail_values, None, SCALING, keep_fraction=0.1)
    group = NUM_HEADS // NUM_KV_HEADS
    candidates = select_clusters(query[0].view(NUM_KV_HEADS, group, 1, HEAD_DIM), layer, rule, SCALING)[:, 0]
    expected = torch.empty_like(out).view(NUM_KV_HEADS, group, HEAD_DIM)
    for head in range(NUM_KV_HEADS):
        rows = ranges_to_indices(layer.offsets[head], candidates[head])
        q = query[0, head * group : (head + 1) * group, 0]  # [G, D]
        best = (q @ layer.keys[head, rows].T).amax(0).topk(round(0.1 * NUM_DOC)).indices
        cluster = torch.searchsorted(layer.offsets[head, 1:], rows, right=True)
        candidate_values = layer.value_means[head, cluster]
        candidate_values[best] = layer.values[head, rows[best]]
        all_keys = torch.cat([layer.keys[head, rows], tail_keys[0, head]])
        all_values = torch.cat([candidate_values, tail_values[0, head]])
        expected[head] = torch.softmax(q @ all_keys.T * SCALING, dim=-1) @ all_values
    torch.testing.assert_close(out, expected.view_as(out), atol=1e-5, rtol=1e-5)


def test_dropped_candidates_are_exact_when_a_cluster_holds_one_value():
    """A dropped candidate counts at its exact logit holding its cluster's mean value: exact when the cluster's
    values are all equal, so any refinement then equals attention over the whole candidate clusters."""
    generator = torch.Generator().manual_seed(45)
    num_clusters = 40
    keys = torch.randn(NUM_KV_HEADS, NUM_DOC, HEAD_DIM, generator=generator)
    assignments = torch.randint(0, num_clusters, (NUM_KV_HEADS, NUM_DOC), generator=generator)
    cluster_values = torch.randn(NUM_KV_HEADS, num_clusters, HEAD_DIM, generator=generator)
    values = cluster_values.gather(1, assignments[..., None].expand(-1, -1, HEAD_DIM))
    layer = layer_from_assignments(keys, values, assignments, num_clusters)
    tail_keys, tail_values = tail(NUM_PREFIX + 4, seed=46)
    tail_mask = random_tree_mask(4, NUM_PREFIX, seed=47)
    query = queries(4, seed=48, scale=3.0)
    for rule in (TopBudgetRule(0.3), ThresholdRule(torch.full((NUM_KV_HEADS,), -math.log(NUM_DOC)))):
        whole = squeezed_attention(query, layer, rule, tail_keys, tail_values, tail_mask, SCALING)
        stats = SqueezeStats()
        refined = squeezed_attention(
            query, layer, rule, tail_keys, tail_values, tail_mask, SCALING, stats, keep_fraction=0.02
        )
        torch.testing.assert_close(refined, whole, atol=1e-5, rtol=1e-5)
        assert stats.values_read < 0.5 * stats.keys_read


def test_refinement_with_the_rest_estimated_equals_dense_when_every_key_is_kept(document):
    keys, values, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=49)
    query = queries(1, seed=50)
    expected = dense_attention(query, keys, values, tail_keys, tail_values, None, SCALING)
    out = squeezed_attention(query, layer, TopBudgetRule(1.0), tail_keys, tail_values, None, SCALING,
                             estimate_rest=True, keep_fraction=1.0)  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_stats_fractions_are_per_call_averages(document):
    _, _, _, layer = document
    tail_keys, tail_values = tail(NUM_PREFIX, seed=43)
    once, twice = SqueezeStats(), SqueezeStats()
    for stats, calls in ((once, 1), (twice, 2)):
        for _ in range(calls):
            squeezed_attention(queries(3, seed=44), layer, TopBudgetRule(0.1), tail_keys, tail_values, None, SCALING,
                               stats)  # fmt: skip
    assert twice.selected_fraction == pytest.approx(once.selected_fraction) and 0.1 <= once.selected_fraction < 0.2
    assert twice.read_fraction == pytest.approx(once.read_fraction)
