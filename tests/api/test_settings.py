"""RAPID_* settings of speculation and the document KV cache, and how LocalBackend reads them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.local_backend import LocalBackend
from api.settings import Settings


def test_speculation_and_cache_settings_from_the_environment(monkeypatch, tmp_path):
    for name, value in {"DRAFTER": "layer-skip", "FUSE_RETRIEVAL": "false", "TREE_BUDGET": "6",
                        "LAYER_SKIP_LAYERS": "2", "ETA": "0.5", "ATTENTION": "squeezed", "SQUEEZE_BUDGET": "0.2",
                        "SQUEEZE_KEEP_FRACTION": "0.1", "DOCUMENT_CACHE_ROOM": "300"}.items():
        monkeypatch.setenv(f"RAPID_{name}", value)
    settings = Settings(model="tiny", device="cpu", data_dir=tmp_path)
    backend = LocalBackend.from_settings(settings, load_embedder=False)
    speculation, cache = backend.config.speculation, backend.config.document_cache
    assert (speculation.drafter, speculation.fuse_retrieval, speculation.tree_budget, speculation.eta) == (
        "layer-skip", False, 6, 0.5)
    assert backend.drafter_runner.model.config.num_hidden_layers == 2
    assert (cache.enabled, cache.attention, cache.squeeze.budget, cache.squeeze.rule, cache.room) == (
        True, "squeezed", 0.2, "threshold", 300)
    assert cache.squeeze.keep_fraction == 0.1


def test_defaults_are_rapid_self_speculation_over_the_dense_document():
    settings = Settings()
    assert (settings.drafter, settings.fuse_retrieval, settings.tree_budget, settings.layer_skip_layers) == (
        "self", True, 16, 8)
    assert (settings.eta, settings.attention, settings.squeeze_budget, settings.document_cache) == (
        0.0, "dense", 0.125, True)


def test_invalid_settings_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="calibrated"):
        Settings(squeeze_budget=0.25)
    assert Settings(squeeze_budget=0.25, squeeze_rule="top").squeeze_budget == 0.25
    with pytest.raises(ValidationError, match="exceeds squeeze_budget"):
        Settings(squeeze_keep_fraction=0.2)
    with pytest.raises(ValidationError, match="needs squeeze_rule 'threshold'"):
        Settings(squeeze_rule="top", squeeze_rest="calibrated")
    with pytest.raises(ValidationError):
        Settings(squeeze_rest="guess")
    with pytest.raises(ValidationError):
        Settings(drafter="small")
    with pytest.raises(ValidationError):
        Settings(eta=-1)
    with pytest.raises(ValueError, match="layer-skip"):  # the tiny model has 3 layers
        LocalBackend.from_settings(Settings(model="tiny", device="cpu", data_dir=tmp_path, drafter="layer-skip"),
                                   load_embedder=False)


def test_squeeze_defaults_follow_rapid_squeeze():
    from api.settings import CALIBRATED_BUDGETS, SQUEEZE_BUDGET
    from rapid.squeeze import BUDGET, DENSE_LAYERS, KEEP_FRACTION, RECENT_TOKENS, SqueezeConfig

    settings = Settings()
    assert settings.squeeze_dense_layers == DENSE_LAYERS and settings.squeeze_rest is None
    assert settings.squeeze_recent_tokens == RECENT_TOKENS and settings.squeeze_keep_fraction == KEEP_FRACTION
    assert CALIBRATED_BUDGETS == SqueezeConfig().budgets and SQUEEZE_BUDGET == BUDGET == settings.squeeze_budget
