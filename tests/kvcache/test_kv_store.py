import dataclasses
import os

import pytest
import torch
from kv_synthetic import NUM_HEADS, SCALING, planted_keys

from kvcache import store
from kvcache.calibration import calibrate_rest, calibrate_thresholds
from kvcache.clustering import ClusterConfig, cluster_layer
from kvcache.store import CacheCorruptError, CacheKey, CacheMismatchError, ClusteredCache, load_cache, save_cache

CONFIG = ClusterConfig(fraction=0.05, coarse_fraction=0.2)
TOKENS = list(range(100, 700))


def build_cache(with_thresholds: bool = True) -> ClusteredCache:
    layers = []
    for seed in range(2):
        keys, _, _ = planted_keys(len(TOKENS), num_directions=6, seed=seed)
        layers.append(cluster_layer(keys.bfloat16(), (-keys).bfloat16(), CONFIG))
    thresholds = None
    if with_thresholds:
        stand_in = torch.randn(NUM_HEADS, 16, 64)
        thresholds = tuple(calibrate_thresholds(stand_in, layer, SCALING) for layer in layers)
        # the rest choice is stored where it was calibrated (layer 0 here) and absent elsewhere
        thresholds = (calibrate_rest(stand_in, layers[0], thresholds[0], SCALING), thresholds[1])
    return ClusteredCache(tuple(layers), thresholds)


KEY = CacheKey.build("HuggingFaceTB/SmolLM2-135M-Instruct", "b179c95", CONFIG, torch.bfloat16, TOKENS)


def assert_same(loaded: ClusteredCache, cache: ClusteredCache) -> None:
    assert len(loaded.layers) == len(cache.layers)
    for got, want in zip(loaded.layers, cache.layers, strict=True):
        for field in ("keys", "values", "centroids", "value_means", "key_variances", "sizes", "offsets", "permutation"):
            assert getattr(got, field).dtype == getattr(want, field).dtype
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        for field in ("centroids", "sizes", "offsets"):
            assert torch.equal(getattr(got.coarse, field), getattr(want.coarse, field))
    if cache.thresholds is None:
        assert loaded.thresholds is None
    else:
        for got, want in zip(loaded.thresholds, cache.thresholds, strict=True):
            assert got.budgets == want.budgets and torch.equal(got.log_thresholds, want.log_thresholds)
            if want.rest_estimated is None:
                assert got.rest_estimated is None
            else:
                assert torch.equal(got.rest_estimated, want.rest_estimated)


@pytest.mark.parametrize("with_thresholds", [True, False])
def test_round_trip_is_bit_exact(tmp_path, with_thresholds):
    cache = build_cache(with_thresholds)
    path = tmp_path / "doc.safetensors"
    save_cache(path, cache, KEY)
    assert_same(load_cache(path, KEY), cache)
    assert os.listdir(tmp_path) == ["doc.safetensors"]  # no temporary file left behind


def test_a_loaded_cache_can_be_saved_again(tmp_path):
    save_cache(tmp_path / "a.safetensors", build_cache(), KEY)
    loaded = load_cache(tmp_path / "a.safetensors", KEY)
    save_cache(tmp_path / "b.safetensors", loaded, KEY)
    assert_same(load_cache(tmp_path / "b.safetensors", KEY), loaded)


@pytest.mark.parametrize(
    "other",
    [
        dict(model_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
        dict(model_revision="0000000"),
        dict(config=ClusterConfig(fraction=0.1, coarse_fraction=0.2)),
        dict(dtype=torch.float16),
        dict(token_ids=TOKENS[:-1] + [1]),
        dict(token_ids=TOKENS[:-1]),
        dict(budgets=(0.05, 0.1, 0.2, 0.3)),
    ],
    ids=["model", "revision", "config", "dtype", "tokens", "token_count", "budgets"],
)
def test_mismatched_key_is_refused(tmp_path, other):
    path = tmp_path / "doc.safetensors"
    save_cache(path, build_cache(), KEY)
    arguments = (
        dict(
            model_id=KEY.model_id,
            model_revision=KEY.model_revision,
            config=CONFIG,
            dtype=torch.bfloat16,
            token_ids=TOKENS,
        )
        | other
    )
    with pytest.raises(CacheMismatchError):
        load_cache(path, CacheKey.build(**arguments))


def test_key_is_the_same_for_a_list_or_a_tensor_of_tokens():
    assert CacheKey.build(
        "m", "r", CONFIG, torch.bfloat16, torch.tensor(TOKENS, dtype=torch.int32)
    ) == dataclasses.replace(KEY, model_id="m", model_revision="r")


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "doc.safetensors"
    save_cache(path, build_cache(), KEY)
    size = path.stat().st_size
    for keep in (size - 1, size // 2, 7):
        damaged = tmp_path / f"truncated_{keep}.safetensors"
        damaged.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(CacheCorruptError):
            load_cache(damaged, KEY)


def test_flipped_byte_in_the_data_is_refused(tmp_path):
    path = tmp_path / "doc.safetensors"
    save_cache(path, build_cache(), KEY)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="checksum"):
        load_cache(path, KEY)


def test_garbage_file_is_refused_and_a_missing_one_is_not_found(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(CacheCorruptError):
        load_cache(garbage, KEY)
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing.safetensors", KEY)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "doc.safetensors"
    cache = build_cache()
    save_cache(path, cache, KEY)

    def broken_save(tensors, filename, metadata):
        with open(filename, "wb") as file:
            file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_cache(path, build_cache(with_thresholds=False), KEY)
    assert os.listdir(tmp_path) == ["doc.safetensors"]
    assert_same(load_cache(path, KEY), cache)
