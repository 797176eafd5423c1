import pytest
import torch
from kv_synthetic import HEAD_DIM, NUM_KV_HEADS, planted_keys

from kvcache.clustering import (
    ClusterConfig,
    cluster_layer,
    cluster_shares,
    kmeans,
    layer_from_assignments,
    ranges_to_indices,
)


def test_config_validates_and_bounds_cluster_count():
    config = ClusterConfig(fraction=0.05, min_clusters=16, max_clusters=1000)
    assert config.num_clusters(100_000) == 1000
    assert config.num_clusters(10_000) == 500
    assert config.num_clusters(100) == 16
    assert config.num_clusters(10) == 10
    for bad in (
        dict(fraction=0.0),
        dict(min_clusters=0),
        dict(min_clusters=5, max_clusters=4),
        dict(iterations=0),
        dict(coarse_fraction=1.0),
        dict(backend="faiss"),
        dict(recent_tokens=-1),
    ):
        with pytest.raises(ValueError):
            ClusterConfig(**bad)


def test_ranges_to_indices_docstring_example():
    offsets = torch.tensor([0, 3, 5, 9])
    selected = torch.tensor([True, False, True])
    assert ranges_to_indices(offsets, selected).tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert ranges_to_indices(offsets, torch.zeros(3, dtype=torch.bool)).tolist() == []


def test_layout_docstring_example_with_an_empty_cluster():
    keys = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0]).view(1, 5, 1)
    layer = layer_from_assignments(keys, -keys, torch.tensor([[2, 0, 2, 0, 0]]), num_clusters=3)
    assert layer.permutation.tolist() == [[1, 3, 4, 0, 2]]
    assert layer.sizes.tolist() == [[3, 0, 2]]
    assert layer.offsets.tolist() == [[0, 3, 3, 5]]
    assert layer.keys.flatten().tolist() == [1.0, 3.0, 5.0, 0.0, 2.0]
    assert layer.values.flatten().tolist() == [-1.0, -3.0, -5.0, -0.0, -2.0]
    assert layer.centroids.flatten().tolist() == [3.0, 0.0, 1.0]


def test_cluster_layer_invariants():
    keys, _, _ = planted_keys(1000, num_directions=12, seed=0)
    values = torch.randn_like(keys)
    layer = cluster_layer(keys, values, ClusterConfig(fraction=0.05))
    assert layer.centroids.shape == (NUM_KV_HEADS, 50, HEAD_DIM)
    for head in range(NUM_KV_HEADS):
        permutation = layer.permutation[head]
        assert torch.equal(torch.sort(permutation).values, torch.arange(1000))
        assert torch.equal(layer.keys[head], keys[head, permutation])
        assert torch.equal(layer.values[head], values[head, permutation])
        offsets = layer.offsets[head]
        assert offsets[0] == 0 and offsets[-1] == 1000
        assert torch.equal(offsets[1:] - offsets[:-1], layer.sizes[head])
        for cluster in range(0, 50, 7):
            members = layer.keys[head, offsets[cluster] : offsets[cluster + 1]]
            if len(members):
                torch.testing.assert_close(members.mean(0), layer.centroids[head, cluster])
                member_values = layer.values[head, offsets[cluster] : offsets[cluster + 1]]
                torch.testing.assert_close(member_values.mean(0), layer.value_means[head, cluster])
                spread = members.var(0, correction=0)  # the population variance, per dimension
                torch.testing.assert_close(layer.key_variances[head, cluster], spread, atol=1e-5, rtol=1e-4)
    restored_keys, restored_values = layer.original_order()
    assert torch.equal(restored_keys, keys) and torch.equal(restored_values, values)


@pytest.mark.parametrize("coarse_fraction", [None, 0.2])
def test_recent_window_is_one_cluster_of_its_own(coarse_fraction):
    keys, _, _ = planted_keys(1000, num_directions=12, seed=0)
    values = torch.randn_like(keys)
    config = ClusterConfig(fraction=0.05, recent_tokens=100, coarse_fraction=coarse_fraction)
    layer = cluster_layer(keys, values, config)
    assert layer.num_clusters == config.num_clusters(900) + 1 == 46
    for head in range(NUM_KV_HEADS):
        (window,) = torch.nonzero(layer.sizes[head] == 100).flatten().tolist()  # no k-means cluster is that large
        start, end = layer.offsets[head, window], layer.offsets[head, window + 1]
        assert sorted(layer.permutation[head, start:end].tolist()) == list(range(900, 1000))
        torch.testing.assert_close(layer.centroids[head, window], keys[head, 900:].mean(0))
    restored_keys, restored_values = layer.original_order()
    assert torch.equal(restored_keys, keys) and torch.equal(restored_values, values)


def test_recent_window_covering_the_document_is_its_only_cluster():
    keys, _, _ = planted_keys(50, num_directions=2, seed=0)
    layer = cluster_layer(keys, keys, ClusterConfig(recent_tokens=64))
    assert layer.sizes.tolist() == [[50]] * NUM_KV_HEADS
    assert torch.equal(layer.original_order()[0], keys)


def test_cluster_layer_keeps_the_cache_dtype():
    keys, _, _ = planted_keys(300, num_directions=4, seed=1)
    layer = cluster_layer(keys.bfloat16(), keys.bfloat16(), ClusterConfig(min_clusters=8))
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    assert layer.centroids.dtype == torch.float32
    assert torch.equal(layer.original_order()[0], keys.bfloat16())


@pytest.mark.parametrize(
    "backend, two_level_from",
    [("sklearn", None), ("torch", None), ("torch", 16)],
    ids=["sklearn", "torch", "torch-two-level"],
)
def test_kmeans_never_mixes_planted_directions_and_is_seeded(backend, two_level_from):
    config = ClusterConfig(iterations=10, seed=0, backend=backend, two_level_from=two_level_from)
    # Over-clustered like a KV cache (C = 4x the true groups): no cluster mixes two directions.
    keys, _, labels = planted_keys(2000, num_directions=8, seed=2, noise=0.05)
    assignments = kmeans(keys, 32, config)
    for head in range(NUM_KV_HEADS):
        for cluster in range(32):
            assert len(torch.unique(labels[head, assignments[head] == cluster])) <= 1
    assert torch.equal(assignments, kmeans(keys, 32, config))
    # Norm does not matter (up to rounding of the normalisation): clustering is on directions.
    scaled = keys * (0.1 + 5 * torch.rand(NUM_KV_HEADS, 2000, 1))
    assert (assignments == kmeans(scaled, 32, config)).float().mean() > 0.99


def test_cluster_shares_docstring_example_and_bounds():
    assert cluster_shares(torch.tensor([6, 3, 0, 1]), 5).tolist() == [3, 1, 0, 1]
    generator = torch.Generator().manual_seed(5)
    for _ in range(100):
        counts = torch.randint(0, 40, (12,), generator=generator)
        counts[0] += 1
        nonempty = int((counts > 0).sum())
        total = int(torch.randint(nonempty, int(counts.sum()) + 1, (), generator=generator))
        shares = cluster_shares(counts, total)
        assert int(shares.sum()) == total and bool((shares <= counts).all())
        assert bool(((shares >= 1) == (counts > 0)).all())


def test_two_level_kmeans_uses_every_cluster_id_once_per_group():
    keys, _, _ = planted_keys(3000, num_directions=30, seed=6, noise=0.1)
    assignments = kmeans(keys, 100, ClusterConfig(two_level_from=16))
    assert assignments.min() >= 0 and assignments.max() < 100
    for head in range(NUM_KV_HEADS):
        assert len(torch.unique(assignments[head])) > 90  # a few may run empty, like flat k-means


@pytest.mark.parametrize("seed", range(3))
def test_torch_kmeans_reseeds_empty_clusters(seed):
    # 10 distinct directions, the first repeated 30 more times: random initial centroids land on copies
    # of it, tie, and all but one run empty; re-seeding gives every direction its own cluster.
    generator = torch.Generator().manual_seed(4)
    distinct = torch.nn.functional.normalize(torch.randn(NUM_KV_HEADS, 10, HEAD_DIM, generator=generator), dim=-1)
    keys = torch.cat([distinct, distinct[:, :1].expand(-1, 30, -1)], dim=1)
    assignments = kmeans(keys, 10, ClusterConfig(iterations=50, backend="torch", seed=seed))
    for head in range(NUM_KV_HEADS):
        assert len(torch.unique(assignments[head])) == 10


def test_coarse_level_partitions_the_fine_clusters():
    keys, _, _ = planted_keys(2000, num_directions=10, seed=3)
    layer = cluster_layer(keys, keys, ClusterConfig(fraction=0.05, coarse_fraction=0.1))
    coarse = layer.coarse
    assert coarse is not None and coarse.centroids.shape == (NUM_KV_HEADS, 10, HEAD_DIM)
    assert torch.equal(coarse.offsets[:, 0], torch.zeros(NUM_KV_HEADS, dtype=torch.int64))
    assert torch.equal(coarse.offsets[:, -1], torch.full((NUM_KV_HEADS,), 100))
    fine_to_coarse = coarse.fine_to_coarse()
    for head in range(NUM_KV_HEADS):
        for group in range(10):
            start, end = coarse.offsets[head, group], coarse.offsets[head, group + 1]
            assert (fine_to_coarse[head, start:end] == group).all()
            assert coarse.sizes[head, group] == layer.sizes[head, start:end].sum()
            if coarse.sizes[head, group]:
                token_start, token_end = layer.offsets[head, start], layer.offsets[head, end]
                members = layer.keys[head, token_start:token_end]
                torch.testing.assert_close(members.mean(0), coarse.centroids[head, group])
    # The renumbering keeps the layout invariants.
    assert torch.equal(layer.keys, keys.gather(1, layer.permutation[..., None].expand(-1, -1, HEAD_DIM)))
