"""Squeezed attention inside the model: every cluster selected equals dense attention."""

import dataclasses

import pytest
import torch

from kvcache.clustering import ClusterConfig
from rapid.drafters.retrieval import RetrievalDrafter
from rapid.engine import EngineConfig, SpeculativeEngine
from rapid.generate import GenerationConfig, generate_all
from rapid.squeeze import SqueezeConfig, squeeze_document
from retrieval.datastore import TokenDatastore

CLUSTERS = ClusterConfig(fraction=0.1, min_clusters=4)


@pytest.fixture(scope="module")
def document():
    return torch.randint(0, 255, (240,), generator=torch.Generator().manual_seed(3)).tolist()


def test_all_clusters_equals_dense_logits(tiny_runner, document):
    squeezed, logits = squeeze_document(tiny_runner, document, SqueezeConfig(CLUSTERS, budget=1.0, rule="top",
                                                                             calibration_window=32))
    dense = tiny_runner.new_cache(400)
    dense_logits = tiny_runner.prefill(dense, document)
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    tail = tiny_runner.new_tail_cache(squeezed, 64)
    question = [7, 8, 9, 10, 11]
    torch.testing.assert_close(tiny_runner.prefill(tail, question), tiny_runner.prefill(dense, question),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tiny_runner.decode(tail, 12), tiny_runner.decode(dense, 12), atol=1e-4, rtol=1e-4)
    assert squeezed.stats.read_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("keep_fraction", [None, 0.1], ids=["clusters", "refined"])
def test_squeezed_engine_equals_squeezed_greedy(tiny_runner, document, keep_fraction):
    """Invariant 1 with the same attention mode on both sides: spec decoding over a squeezed cache."""
    question = [20, 21, 22, 23]
    config = SqueezeConfig(CLUSTERS, budget=0.2, calibration_window=32, sink_tokens=4, dense_layers=0,
                           keep_fraction=keep_fraction)
    squeezed, _ = squeeze_document(tiny_runner, document, config)
    reference_cache = tiny_runner.new_tail_cache(squeezed, 64)
    logits = tiny_runner.prefill(reference_cache, question)
    reference = [int(logits.argmax())]
    for _ in range(19):
        reference.append(int(tiny_runner.decode(reference_cache, reference[-1]).argmax()))
    engine = SpeculativeEngine(tiny_runner, EngineConfig(max_new_tokens=20))
    tail = tiny_runner.new_tail_cache(squeezed, EngineConfig(max_new_tokens=20).capacity(len(question)))
    datastore = TokenDatastore.build([document + reference])
    out = [t for chunk in engine.generate(tail, question, [RetrievalDrafter(datastore, question)]) for t in chunk]
    assert out == reference
    assert squeezed.stats.read_fraction < 0.6
    if keep_fraction is not None:
        assert squeezed.stats.values_read < squeezed.stats.keys_read


def test_keep_fraction_is_validated():
    with pytest.raises(ValueError, match="keep_fraction"):
        SqueezeConfig(budget=0.1, keep_fraction=0.2)
    assert SqueezeConfig(budget=0.2, keep_fraction=0.1).keep_fraction == 0.1


def test_calibrated_rest_follows_each_layers_calibration(tiny_runner, document):
    config = SqueezeConfig(CLUSTERS, budget=0.1, calibration_window=32, dense_layers=0)
    assert config.rest_mode == "calibrated" and SqueezeConfig(rule="top").rest_mode == "ignore"  # the rules' defaults
    assert dataclasses.replace(config, budget=0.15, rule="top").rest_mode == "ignore"  # the default follows the rule
    squeezed, _ = squeeze_document(tiny_runner, document, config)
    chosen = tuple(thresholds.estimates_rest(0.1) for thresholds in squeezed.clustered.thresholds)
    assert squeezed.estimate_rest == chosen and len(chosen) == len(squeezed.clustered.layers)
    for budget in config.budgets:
        assert squeezed.with_budget(budget, rest="estimate").estimate_rest == (True,) * len(chosen)
        assert squeezed.with_budget(budget, rest="ignore").estimate_rest == (False,) * len(chosen)
        assert squeezed.with_budget(budget, "top", rest=None).estimate_rest == (False,) * len(chosen)  # top: ignore
        calibrated = squeezed.with_budget(budget).estimate_rest  # the threshold rule's default
        assert calibrated == tuple(bool(t.rest_estimated[config.budgets.index(budget)])
                                   for t in squeezed.clustered.thresholds)
    tiny_runner.decode(tiny_runner.new_tail_cache(squeezed, 8), 5)  # runs with a mix of layers
    with pytest.raises(ValueError, match="calibrated"):
        squeezed.with_budget(0.1, "top", rest="calibrated")


def test_rest_is_validated():
    with pytest.raises(ValueError, match="rest must be one of"):
        SqueezeConfig(rest="guess")
    with pytest.raises(ValueError, match="needs rule 'threshold'"):
        SqueezeConfig(budget=0.15, rule="top", rest="calibrated")


def test_dense_layers_read_every_key_and_match_dense_attention(tiny_runner, document):
    """Every layer dense: any budget gives dense attention; one dense layer of three reads >1/3 of the keys."""
    question = [40, 41, 42]
    dense = tiny_runner.new_cache(400)
    tiny_runner.prefill(dense, document)
    expected = tiny_runner.prefill(dense, question)
    config = SqueezeConfig(CLUSTERS, budget=0.05, calibration_window=32, dense_layers=3)
    squeezed, _ = squeeze_document(tiny_runner, document, config)
    torch.testing.assert_close(tiny_runner.prefill(tiny_runner.new_tail_cache(squeezed, 64), question), expected,
                               atol=1e-4, rtol=1e-4)
    assert squeezed.stats.read_fraction == pytest.approx(1.0)
    one = squeezed.with_budget(0.05, dense_layers=1)
    tiny_runner.prefill(tiny_runner.new_tail_cache(one, 64), question)
    assert 1 / 3 < one.stats.read_fraction < 1.0


def test_recent_window_is_always_read(tiny_runner, document):
    config = SqueezeConfig(dataclasses.replace(CLUSTERS, recent_tokens=24), budget=0.05, rule="top",
                           calibration_window=32, sink_tokens=0, dense_layers=0)
    squeezed, _ = squeeze_document(tiny_runner, document, config)
    assert squeezed.recent_tokens == squeezed.with_budget(0.05, "top").recent_tokens == 24
    for layer, pinned in zip(squeezed.clustered.layers, squeezed.always_read, strict=True):
        assert torch.equal(pinned.sum(dim=1), torch.ones(pinned.shape[0], dtype=torch.int64))  # the window alone
        assert torch.equal(layer.sizes[pinned], torch.full((pinned.shape[0],), 24))
    tiny_runner.decode(tiny_runner.new_tail_cache(squeezed, 8), 5)
    num_layers = len(squeezed.clustered.layers)
    assert squeezed.stats.keys_read >= 24 * squeezed.always_read[0].shape[0] * num_layers


def test_budget_one_greedy_equals_dense_greedy(tiny_runner, document):
    question = [30, 31, 32]
    squeezed, _ = squeeze_document(tiny_runner, document, SqueezeConfig(CLUSTERS, budget=1.0, rule="top",
                                                                        calibration_window=16))
    tail = tiny_runner.new_tail_cache(squeezed, 64)
    logits = tiny_runner.prefill(tail, question)
    out = [int(logits.argmax())]
    for _ in range(15):
        out.append(int(tiny_runner.decode(tail, out[-1]).argmax()))
    assert out == generate_all(tiny_runner, document + question, GenerationConfig(max_new_tokens=16))


def test_dense_cache_from_clusters_equals_the_prefilled_cache(tiny_runner, document):
    from rapid.squeeze import dense_cache

    squeezed, _ = squeeze_document(tiny_runner, document, SqueezeConfig(CLUSTERS, calibration_window=16))
    rebuilt = dense_cache(squeezed.clustered, len(document) + 8)
    prefilled = tiny_runner.new_cache(len(document) + 8)
    tiny_runner.prefill(prefilled, document)
    assert rebuilt.length == prefilled.length == len(document)
    for ours, theirs in zip(rebuilt.layers, prefilled.layers, strict=True):
        assert torch.equal(ours.keys[:, :, : len(document)], theirs.keys[:, :, : len(document)])
    torch.testing.assert_close(tiny_runner.decode(rebuilt, 5), tiny_runner.decode(prefilled, 5))


def test_pinned_clusters_worked_example():
    from kvcache.clustering import layer_from_assignments
    from rapid.squeeze import pinned_clusters

    keys = torch.randn(1, 5, 4)
    layer = layer_from_assignments(keys, keys, torch.tensor([[2, 0, 2, 0, 0]]), 3)
    assert layer.permutation.tolist() == [[1, 3, 4, 0, 2]]
    assert pinned_clusters(layer, 1).tolist() == [[False, False, True]]
    assert pinned_clusters(layer, 2).tolist() == [[True, False, True]]
    assert pinned_clusters(layer, 0, recent_tokens=1).tolist() == [[True, False, False]]
    assert pinned_clusters(layer, 1, recent_tokens=1).tolist() == [[True, False, True]]


class Interrupted(Exception):
    pass


def test_interrupted_prefill_resumes_from_saved_slices(tiny_runner, document, tmp_path):
    from kvcache.store import CacheKey, PrefillCheckpoints

    config = SqueezeConfig(CLUSTERS, calibration_window=32)
    key = CacheKey.build("tiny", "r1", config.cluster, torch.float32, document)
    checkpoints = PrefillCheckpoints(tmp_path / "prefill", key)

    def crash_after_100(done: int, total: int) -> None:
        if done >= 100:
            raise Interrupted

    with pytest.raises(Interrupted):
        squeeze_document(tiny_runner, document, config, on_chunk=crash_after_100, checkpoints=checkpoints,
                         checkpoint_every=32)
    assert len(list((tmp_path / "prefill").glob("prefill-*"))) == 3  # 0-32, 32-64, 64-96 were saved
    reported = []
    resumed, logits = squeeze_document(tiny_runner, document, config, on_chunk=lambda d, t: reported.append(d),
                                       checkpoints=checkpoints, checkpoint_every=32)
    assert reported[0] > 96 and reported[-1] == len(document)  # the first 96 positions were not prefilled again
    fresh, fresh_logits = squeeze_document(tiny_runner, document, config)
    torch.testing.assert_close(logits, fresh_logits)
    for ours, theirs in zip(resumed.clustered.layers, fresh.clustered.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys)
        assert torch.equal(ours.permutation, theirs.permutation)
    checkpoints.clear()
    assert not (tmp_path / "prefill").exists()


def test_prefill_checkpoints_of_another_document_or_damaged_are_dropped(tiny_runner, document, tmp_path):
    from kvcache.store import CacheKey, PrefillCheckpoints

    config = SqueezeConfig(CLUSTERS, calibration_window=32)
    key = CacheKey.build("tiny", "r1", config.cluster, torch.float32, document)
    squeeze_document(tiny_runner, document, config, checkpoints=PrefillCheckpoints(tmp_path, key),
                     checkpoint_every=64)
    slices = sorted(tmp_path.glob("prefill-*"))
    assert len(slices) == 4  # 208 positions before the window, in slices of 64
    other = CacheKey.build("tiny", "r1", config.cluster, torch.float32, document[::-1])
    assert PrefillCheckpoints(tmp_path, other).restore() == (0, [])
    assert not list(tmp_path.glob("prefill-*"))  # a checkpoint of something else is deleted, never used

    squeeze_document(tiny_runner, document, config, checkpoints=PrefillCheckpoints(tmp_path, key),
                     checkpoint_every=64)
    second = sorted(tmp_path.glob("prefill-*"))[1]
    second.write_bytes(second.read_bytes()[:-10])  # truncated: slices from the second on are dropped
    done, layers = PrefillCheckpoints(tmp_path, key).restore()
    assert done == 64 and layers[0][0].shape[1] == 64
    assert len(list(tmp_path.glob("prefill-*"))) == 1


@pytest.mark.parametrize("dense_layers, budget", [(0, 0.2), (1, 0.1)])
def test_bf16_squeezed_tree_rows_equal_decode_steps_bit_for_bit(tiny_bf16_runner, path_tree, greedy_steps,
                                                                 dense_layers, budget):
    """Each tree node selects its own clusters and the kernel reads them row by row, so over a squeezed
    document too a node on the path gets exactly the decode step's logits in bf16."""
    runner = tiny_bf16_runner
    document = torch.randint(0, 255, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    config = SqueezeConfig(CLUSTERS, budget=budget, calibration_window=32, sink_tokens=4, dense_layers=dense_layers)
    squeezed, _ = squeeze_document(runner, document, config)
    tail = runner.new_tail_cache(squeezed, 64)
    first = int(runner.prefill(tail, [20, 21, 22, 23]).argmax())
    start = tail.length
    path, steps, _ = greedy_steps(runner, tail, first, 5)
    tail.truncate(start)
    tokens, depths, mask, slots = path_tree(path)
    tree_logits = runner.score_tree(tail, tokens, depths, mask)
    for slot, step in zip(slots, steps, strict=True):
        assert torch.equal(tree_logits[slot], step)
