import logging
import math
import shutil

import pytest
import torch

from kvcache import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the native kernel")

NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM = 3, 300, 64


def reference(query, keys, values, starts, ends, range_offsets, row_mask):
    """fp32 softmax of each row over the keys of the ranges it reads -> out [Hkv, R, D], lse [Hkv, R]."""
    num_kv_heads, rows, dim = query.shape
    out, lse = torch.zeros(num_kv_heads, rows, dim), torch.full((num_kv_heads, rows), -math.inf)
    for head in range(num_kv_heads):
        for row in range(rows):
            ranges = range(int(range_offsets[head]), int(range_offsets[head + 1]))
            picked = [
                torch.arange(int(starts[i]), int(ends[i])) for i in ranges if row_mask is None or bool(row_mask[i, row])
            ]
            index = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)
            if index.numel():
                logits = keys[head, index].float() @ query[head, row]
                lse[head, row] = torch.logsumexp(logits, 0)
                out[head, row] = torch.softmax(logits, 0) @ values[head, index].float()
    return out, lse


def random_ranges(seed: int):
    """Per head a few ranges, some empty, some longer than the kernel's 64-key block, some adjacent."""
    generator = torch.Generator().manual_seed(seed)
    starts, ends, counts = [], [], []
    for _ in range(NUM_KV_HEADS):
        cuts = torch.sort(torch.randint(0, NUM_TOKENS, (8,), generator=generator)).values.tolist()
        pairs = [(cuts[0], cuts[0]), (cuts[1], cuts[3]), (cuts[3], cuts[4]), (cuts[5], NUM_TOKENS)]
        starts += [a for a, _ in pairs]
        ends += [b for _, b in pairs]
        counts.append(len(pairs))
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    return torch.tensor(starts), torch.tensor(ends), offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_equals_softmax_over_the_ranges(dtype, masked):
    generator = torch.Generator().manual_seed(0)
    rows = 12
    query = torch.randn(NUM_KV_HEADS, rows, HEAD_DIM, generator=generator) * HEAD_DIM**-0.5
    keys = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator).to(dtype)
    values = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator).to(dtype)
    starts, ends, offsets = random_ranges(seed=1)
    row_mask = torch.rand(len(starts), rows, generator=generator) < 0.6 if masked else None
    out, lse = native.range_attention(query, keys, values, starts, ends, offsets, row_mask)
    expected_out, expected_lse = reference(query, keys, values, starts, ends, offsets, row_mask)
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=2e-5)


def test_a_row_that_reads_nothing_gets_zeros_and_minus_infinity():
    query = torch.randn(NUM_KV_HEADS, 2, HEAD_DIM)
    keys = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM)
    starts, ends = torch.tensor([0, 10, 5]), torch.tensor([40, 10, 90])
    offsets = torch.tensor([0, 1, 2, 3])  # head 1 has only an empty range
    row_mask = torch.tensor([[True, False], [True, True], [True, True]])
    out, lse = native.range_attention(query, keys, keys, starts, ends, offsets, row_mask)
    assert lse[0, 1] == -math.inf and bool((out[0, 1] == 0).all())
    assert bool((lse[1] == -math.inf).all()) and bool((out[1] == 0).all())
    assert bool(torch.isfinite(lse[2]).all()) and bool(torch.isfinite(lse[0, :1]).all())


def test_huge_logits_stay_finite():
    query = torch.full((1, 1, HEAD_DIM), 30.0)
    keys = torch.randn(1, NUM_TOKENS, HEAD_DIM) * 10
    starts, ends, offsets = torch.tensor([0]), torch.tensor([NUM_TOKENS]), torch.tensor([0, 1])
    out, lse = native.range_attention(query, keys, keys, starts, ends, offsets, None)
    expected_out, expected_lse = reference(query, keys, keys, starts, ends, offsets, None)
    torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-2)


def test_supports_only_contiguous_cpu_bf16_or_fp32_within_its_buffers():
    keys = torch.zeros(NUM_KV_HEADS, 8, HEAD_DIM)
    assert native.supports(keys, rows=3) and native.supports(keys.bfloat16(), rows=native.MAX_ROWS)
    assert not native.supports(keys.half(), rows=3)
    assert not native.supports(keys.transpose(0, 1), rows=3)
    assert not native.supports(keys, rows=native.MAX_ROWS + 1)


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    monkeypatch.setenv("RAPID_KERNEL_DIR", str(tmp_path))
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def test_compiles_once_into_the_kernel_dir(fresh_load):
    assert native.load() is not None
    (built,) = fresh_load.glob("range_attention-*.so")
    stamp = built.stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load() is not None and built.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_without_a_compiler_or_when_disabled_it_falls_back(fresh_load, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_load / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="kvcache.native"):
        assert native.load() is None
    assert "falls back to torch" in caplog.text
    assert not native.supports(torch.zeros(1, 4, HEAD_DIM), rows=1)
    native.load.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("RAPID_NATIVE_KERNELS", "0")
    assert native.load() is None


def test_concurrent_calls_from_worker_threads_stay_exact():
    from concurrent.futures import ThreadPoolExecutor

    starts, ends, offsets = random_ranges(seed=2)

    def one(seed: int):
        generator = torch.Generator().manual_seed(seed)
        query = torch.randn(NUM_KV_HEADS, 6, HEAD_DIM, generator=generator) * HEAD_DIM**-0.5
        keys = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator).bfloat16()
        out, _ = native.range_attention(query, keys, keys, starts, ends, offsets, None)
        return out, reference(query, keys, keys, starts, ends, offsets, None)[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        for out, expected in pool.map(one, range(8)):
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_rounding_the_probabilities_to_bf16_follows_torchs_bf16_sdpa():
    """torch's bf16 flash kernel weighs the values by bf16-rounded probabilities; round_probs does the same."""
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(NUM_KV_HEADS, 3, HEAD_DIM, generator=generator).bfloat16()
    keys = torch.randn(NUM_KV_HEADS, 4096, HEAD_DIM, generator=generator).bfloat16()
    values = torch.randn(NUM_KV_HEADS, 4096, HEAD_DIM, generator=generator).bfloat16()
    whole = torch.zeros(NUM_KV_HEADS, dtype=torch.int64), torch.full((NUM_KV_HEADS,), 4096), torch.arange(4)
    scaled = query.float() * HEAD_DIM**-0.5
    exact, _ = native.range_attention(scaled, keys, values, *whole, None)
    rounded, _ = native.range_attention(scaled, keys, values, *whole, None, round_probs=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(query[None], keys[None], values[None])[0]

    def mismatched(out):  # fraction of bf16 outputs that differ from SDPA's (measured 44% exact, 27% rounded)
        return float((out.bfloat16() != sdpa).float().mean())

    assert mismatched(rounded) < 0.8 * mismatched(exact)
    torch.testing.assert_close(rounded, exact, atol=2e-3, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centroid_logits_and_weighted_means_match_torch(dtype):
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(NUM_KV_HEADS, 6, HEAD_DIM, generator=generator)
    centroids = torch.randn(NUM_KV_HEADS, 50, HEAD_DIM, generator=generator).to(dtype)
    torch.testing.assert_close(
        native.centroid_logits(query, centroids), query @ centroids.float().transpose(1, 2), atol=1e-4, rtol=1e-5
    )
    weights = torch.softmax(4 * torch.randn(NUM_KV_HEADS, 6, 50, generator=generator), dim=-1)
    means = torch.randn(NUM_KV_HEADS, 50, HEAD_DIM, generator=generator).to(dtype)
    expected = weights @ means.float()
    torch.testing.assert_close(native.weighted_means(weights, means, skip_below=0.0), expected, atol=1e-5, rtol=1e-5)
    # Skipping the clusters below 1e-3 in every row moves each output by at most 50 * 1e-3 * max |mean|.
    skipped = native.weighted_means(weights, means, skip_below=1e-3)
    assert (skipped - expected).abs().max() <= 50 * 1e-3 * means.float().abs().max()


def threshold_cases(num_queries: int):
    """A layer with empty clusters, queries, two pinned clusters (one empty) and three threshold vectors:
    about half the non-empty clusters read (halfway between two scores, so rounding cannot tie), all, none."""
    from kvcache.clustering import layer_from_assignments
    from kvcache.selection import cluster_log_weights

    generator = torch.Generator().manual_seed(3)
    group, num_clusters = 2, 40
    keys = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator)
    values = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator)
    assignments = torch.randint(0, num_clusters // 2, (NUM_KV_HEADS, NUM_TOKENS), generator=generator) * 2
    layer = layer_from_assignments(keys, values, assignments, num_clusters)  # odd clusters stay empty
    query = torch.randn(NUM_KV_HEADS, group, num_queries, HEAD_DIM, generator=generator)
    pinned = torch.zeros(NUM_KV_HEADS, num_clusters, dtype=torch.bool)
    pinned[:, [4, 7]] = True  # one full, one empty
    scores = cluster_log_weights(query, layer, HEAD_DIM**-0.5).amax(dim=1)[:, :, ::2].flatten(1)  # non-empty
    ordered = scores.sort(dim=1).values
    half = ordered.shape[1] // 2
    middle = (ordered[:, half - 1] + ordered[:, half]) / 2
    return layer, query, pinned, (middle, torch.full((3,), -math.inf), torch.full((3,), math.inf))


@pytest.mark.parametrize("num_queries", [1, 5])
def test_native_threshold_selection_equals_torchs(num_queries):
    from kvcache.selection import ThresholdRule, centroid_logits, score_clusters
    from kvcache.squeezed import KeyRanges

    layer, query, pinned, cases = threshold_cases(num_queries)
    group = query.shape[1]
    for thresholds in cases:
        rule = ThresholdRule(thresholds)
        selected = score_clusters(query, layer, rule, HEAD_DIM**-0.5)[0] | pinned[:, None, :]
        selected &= layer.sizes[:, None, :] > 0
        union = selected.any(dim=1)
        expected = KeyRanges.of(layer, selected, union, group, pinned)
        logits = centroid_logits(query, layer, HEAD_DIM**-0.5).view(NUM_KV_HEADS, group * num_queries, -1)
        *ranges, keys_read, keys_selected = native.select_ranges(
            logits, thresholds, layer.sizes, layer.offsets, pinned, num_queries
        )
        wanted = (expected.starts, expected.ends, expected.range_offsets, expected.row_mask, expected.pinned,
                  expected.clusters)
        for ours, theirs in zip(ranges, wanted, strict=True):
            assert (ours is None and theirs is None) or torch.equal(ours, theirs)
        assert keys_read == int((union * layer.sizes).sum())
        assert keys_selected == int((selected * layer.sizes[:, None, :]).sum())
        if thresholds is cases[0]:
            assert 0.2 < selected.float().mean() / (layer.sizes > 0).float().mean() < 0.8


@pytest.mark.parametrize("num_queries", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rest_estimate_equals_torchs(num_queries, dtype):
    """The estimate of the unread clusters, fused with the threshold rule, against the torch path's over the
    selection score_clusters makes (every cluster read: nothing to estimate; none read: all of them)."""
    from kvcache.selection import ThresholdRule, centroid_logits, score_clusters
    from kvcache.squeezed import _estimated_rest

    layer, query, pinned, cases = threshold_cases(num_queries)
    group = query.shape[1]
    means = layer.value_means.to(dtype)
    for thresholds in cases:
        selected, logits = score_clusters(query, layer, ThresholdRule(thresholds), HEAD_DIM**-0.5)
        expected_out, expected_lse = _estimated_rest(logits, selected | pinned[:, None, :], layer)
        flat = centroid_logits(query, layer, HEAD_DIM**-0.5).view(NUM_KV_HEADS, group * num_queries, -1)
        out, lse = native.rest_estimate(flat, thresholds, layer.sizes, pinned, means, num_queries)
        torch.testing.assert_close(lse, expected_lse[0], atol=1e-4, rtol=1e-5)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 means
        torch.testing.assert_close(out, expected_out[0], atol=tolerance, rtol=tolerance)
        if thresholds is cases[1]:
            assert (lse == -math.inf).all() and (out == 0).all()
        else:
            assert (lse > -math.inf).all()


def refined_reference(query, keys, values, starts, ends, range_offsets, row_mask, pinned, queries, keep,
                      means=None, clusters=None):
    """Per query n: its candidate keys scored by the max logit over the heads of its group, the `keep` best
    and every pinned key kept, then each row's fp32 softmax over the kept keys; with means, over every
    candidate, a dropped one holding its range's cluster mean."""
    num_kv_heads, rows, dim = query.shape
    group = rows // queries
    out, lse = torch.zeros(num_kv_heads, rows, dim), torch.full((num_kv_heads, rows), -math.inf)
    for head in range(num_kv_heads):
        ranges = range(int(range_offsets[head]), int(range_offsets[head + 1]))
        for n in range(queries):
            reads = [i for i in ranges if row_mask is None or bool(row_mask[i, n])]
            if not reads:
                continue
            index = torch.cat([torch.arange(int(starts[i]), int(ends[i])) for i in reads])
            forced = torch.cat([torch.full((int(ends[i] - starts[i]),), bool(pinned[i])) for i in reads])
            own_rows = [g * queries + n for g in range(group)]
            logits = query[head, own_rows] @ keys[head, index].float().T  # [G, M]
            score = logits.amax(0).masked_fill(forced, math.inf)
            kept = score >= score.topk(min(keep, len(score))).values[-1]
            weighed, held = kept, values[head, index].float()
            if means is not None:
                weighed = torch.ones_like(kept)
                cluster = torch.cat([torch.full((int(ends[i] - starts[i]),), int(clusters[i])) for i in reads])
                held = torch.where(kept[:, None], held, means[head, cluster].float())
            for g, row in enumerate(own_rows):
                lse[head, row] = torch.logsumexp(logits[g, weighed], 0)
                out[head, row] = torch.softmax(logits[g, weighed], 0) @ held[weighed]
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("keep", [1, 40, 1000])
@pytest.mark.parametrize("estimate_dropped", [False, True], ids=["kept-only", "dropped-at-means"])
def test_refined_kernel_keeps_each_querys_best_candidate_keys(dtype, queries, keep, estimate_dropped):
    generator = torch.Generator().manual_seed(4)
    group = 3
    rows = group * queries
    query = torch.randn(NUM_KV_HEADS, rows, HEAD_DIM, generator=generator) * HEAD_DIM**-0.5
    keys = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator).to(dtype)
    values = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=generator).to(dtype)
    starts, ends, offsets = random_ranges(seed=5)
    per_query = torch.rand(len(starts), queries, generator=generator) < 0.7
    row_mask = None if queries == 1 else per_query.repeat(1, group)  # rows g*N + n: every head of query n alike
    pinned = torch.zeros(len(starts), dtype=torch.bool)
    pinned[offsets[:-1] + 2] = True  # one range per head, read by some queries only
    means = clusters = None
    if estimate_dropped:
        means = torch.randn(NUM_KV_HEADS, 7, HEAD_DIM, generator=generator).to(dtype)
        clusters = torch.randint(0, 7, (len(starts),), generator=generator)
    out, lse, (keys_read, values_read, kept) = native.refined_attention(
        query, keys, values, starts, ends, offsets, row_mask, pinned, queries, keep, means=means, clusters=clusters
    )
    expected_out, expected_lse = refined_reference(
        query, keys, values, starts, ends, offsets, row_mask, pinned, queries, keep, means, clusters
    )
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=2e-5)
    assert keys_read == int((ends - starts).sum())
    assert kept <= values_read * queries and values_read <= keys_read
    if keep == 1000:  # more than there are candidates: every candidate is kept, as by range_attention
        whole_out, whole_lse = native.range_attention(query, keys, values, starts, ends, offsets, row_mask)
        torch.testing.assert_close(out, whole_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, whole_lse, atol=2e-5, rtol=2e-5)
        assert values_read == keys_read


@pytest.mark.parametrize("ties", [False, True])
def test_refined_kernel_finds_the_exact_cutoff_among_many_candidates(ties):
    """Past 8K candidates the cutoff comes from a sampled bracket and a quickselect inside it, still exact."""
    generator = torch.Generator().manual_seed(6)
    num_tokens, group = 20000, 3
    query = torch.randn(NUM_KV_HEADS, group, HEAD_DIM, generator=generator) * HEAD_DIM**-0.5
    keys = torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator)
    if ties:  # runs of identical keys: many equal logits around the cutoff
        keys = keys[:, torch.arange(num_tokens) // 50]
    values = torch.randn(NUM_KV_HEADS, num_tokens, HEAD_DIM, generator=generator)
    starts = torch.tensor([0, 12000, 100, 9000, 300, 15000])
    ends = torch.tensor([11000, 19000, 8900, 20000, 14000, 19990])
    offsets = torch.tensor([0, 2, 4, 6])
    for keep in (1, 2500, 9000):
        out, lse, (_, values_read, kept) = native.refined_attention(
            query, keys, values, starts, ends, offsets, None, None, 1, keep
        )
        expected_out, expected_lse = refined_reference(
            query, keys, values, starts, ends, offsets, None, torch.zeros(6, dtype=torch.bool), 1, keep
        )
        torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=2e-5)
        assert kept == values_read and (kept == NUM_KV_HEADS * keep or ties)


def cache_reference(query, scaling, keys, values, mask, queries, round_probs=False):
    """float64 softmax of each row over the keys its query sees -> [Hkv, R, D] fp32; with round_probs the weights
    of the values are rounded to bf16 (the sums are not), as the kernel's round_probs asks."""
    logits = torch.einsum("hrd,hsd->hrs", query.double(), keys.double()) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask.repeat(query.shape[1] // queries, 1)[None], -math.inf)
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    rounded = weights.bfloat16().double() if round_probs else weights
    return (torch.einsum("hrs,hsd->hrd", rounded, values.double()) / weights.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries,length,masked", [(1, 70, False), (1, 300, True), (5, 300, True), (16, 129, True)])
def test_cache_kernel_equals_softmax_over_the_keys_each_query_sees(dtype, queries, length, masked):
    generator = torch.Generator().manual_seed(queries + length)
    rows = 3 * queries  # 3 query heads per kv head: 48 rows for 16 queries are three groups of vector lanes
    query = torch.randn(NUM_KV_HEADS, rows, HEAD_DIM, generator=generator).to(dtype)
    stored = torch.randn(2, NUM_KV_HEADS, length + 40, HEAD_DIM, generator=generator).to(dtype)
    keys, values = stored[0, :, :length], stored[1, :, :length]  # views with a longer head stride, as in a cache
    mask = None
    if masked:
        mask = torch.rand(queries, length, generator=generator) > 0.4
        mask[:, : length // 2] = True
        mask[0, -1] = False
    out = native.cache_attention(query, 0.125, keys, values, mask, queries)
    torch.testing.assert_close(out, cache_reference(query, 0.125, keys, values, mask, queries), atol=2e-5, rtol=1e-4)


# The ways the kernel reads bf16 caches, by the flags that take the faster ones away: AMX tiles (logits, and values
# past a few hundred keys), AVX512-BF16 pairs, fp32.
SCORING_PATHS = {"tiles": (), "pairs": ("-mno-amx-tile",), "fp32": ("-mno-amx-tile", "-mno-avx512bf16")}


@pytest.fixture(params=list(SCORING_PATHS))
def scoring_path(request, fresh_load, monkeypatch):
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, *SCORING_PATHS[request.param]))
    if native.load() is None:
        pytest.skip(f"this compiler has no {SCORING_PATHS[request.param]} (not x86)")
    return request.param


@pytest.mark.parametrize("prefix", [61, 190])
def test_cache_kernel_rows_depend_only_on_the_keys_they_see(scoring_path, prefix):
    """A tree node over the prefix plus its ancestors, scattered among other nodes' keys and with other rows
    beside it, gets bit for bit the row of a decode step over the prefix and the same path in a row. At 61 the
    tree crosses a 64-key block; at 190 tiles weigh 128 of the path node's values and 64 of the root's."""
    generator = torch.Generator().manual_seed(7)
    path, tree = [0, 2, 3, 5, 7], 8
    stored = torch.randn(2, NUM_KV_HEADS, prefix + tree, HEAD_DIM, generator=generator).bfloat16()
    query = torch.randn(NUM_KV_HEADS, 3 * tree, HEAD_DIM, generator=generator).bfloat16()
    mask = torch.ones(tree, prefix + tree, dtype=torch.bool)
    mask[:, prefix:] = False
    for node in range(tree):
        mask[node, prefix + node] = True
    seen = [prefix + slot for slot in path]
    mask[path[-1], seen] = True  # the last path node sees its ancestors
    tree_out = native.cache_attention(query, 0.125, stored[0], stored[1], mask, tree, round_probs=True)
    keep = list(range(prefix)) + seen
    rows = [g * tree + path[-1] for g in range(3)]
    step_out = native.cache_attention(query[:, rows], 0.125, stored[0][:, keep], stored[1][:, keep], None, 1,
                                      round_probs=True)
    assert torch.equal(tree_out[:, rows], step_out)


def random_bf16_case(generator, queries, length, hidden, seen_by_all):
    """bf16 query rows (3 heads per kv head), keys and values over `length` keys, and a mask that hides about a
    `hidden` share of the keys past the first `seen_by_all`."""
    query = torch.randn(NUM_KV_HEADS, 3 * queries, HEAD_DIM, generator=generator).bfloat16()
    keys, values = torch.randn(2, NUM_KV_HEADS, length, HEAD_DIM, generator=generator).bfloat16()
    mask = torch.rand(queries, length, generator=generator) > hidden
    mask[:, :seen_by_all] = True
    return query, keys, values, mask


def test_cache_kernel_scores_bf16_caches_on_every_path(scoring_path):
    """Each way of reading bf16 caches (and the query layout it wants) gives the softmax over the keys each query
    sees, for one lane group and for several, over a length that is no whole number of tiles; with bf16 weights
    (what the model asks for) tiles weigh the first 192 values of a row that sees every key."""
    generator = torch.Generator().manual_seed(3)
    for queries in (1, 5, 7):
        query, keys, values, mask = random_bf16_case(generator, queries, 301, 0.3, 150)
        mask[0] = True
        out = native.cache_attention(query, 0.125, keys, values, mask, queries)
        expected = cache_reference(query, 0.125, keys, values, mask, queries)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
        rounded = native.cache_attention(query, 0.125, keys, values, mask, queries, round_probs=True)
        expected = cache_reference(query, 0.125, keys, values, mask, queries, round_probs=True)
        torch.testing.assert_close(rounded, expected, atol=1e-4, rtol=1e-3)


def test_cache_kernel_value_pairs_sum_as_fmas():
    """Where the CPU's vdpbf16ps adds a pair's products in order, weighing bf16 values by pairs of keys gives the
    FMA path's bits: one lane group and several, a masked tree, an odd length."""
    if not native.value_pairs_supported():
        pytest.skip("this CPU has no in-order vdpbf16ps")
    generator = torch.Generator().manual_seed(11)
    for queries in (1, 5, 9):
        query, keys, values, mask = random_bf16_case(generator, queries, 333, 0.4, 200)
        args = (query, 0.125, keys, values, None if queries == 1 else mask, queries)
        pairs = native.cache_attention(*args, round_probs=True)
        fmas = native.cache_attention(*args, round_probs=True, value_pairs=False)
        assert torch.equal(pairs, fmas)


def test_cache_kernel_gives_zeros_to_a_row_that_sees_nothing():
    keys = torch.randn(NUM_KV_HEADS, 20, HEAD_DIM)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    out = native.cache_attention(torch.randn(NUM_KV_HEADS, 2, HEAD_DIM), 1.0, keys, keys, mask, 2)
    assert torch.equal(out[:, 1], torch.zeros(NUM_KV_HEADS, HEAD_DIM)) and out[:, 0].abs().sum() > 0


def test_cache_kernel_supports_row_contiguous_views_only():
    stored = torch.randn(2, NUM_KV_HEADS, 50, HEAD_DIM)
    assert native.supports_cache(stored[0, :, :30], stored[1, :, :30], 48)
    assert not native.supports_cache(stored[0].transpose(1, 2), stored[1].transpose(1, 2), 48)
    assert not native.supports_cache(stored[0], stored[1], native.MAX_ROWS + 1)
    odd = torch.randn(NUM_KV_HEADS, 10, 60)
    assert not native.supports_cache(odd, odd, 3)
