"""The runner on the tiny random model: every mode answers, references hold, ingest is shared, results stream."""

import pytest

from api.qa import DocumentQA
from eval.modes import QUALITY_MODES, resolve_modes
from eval.result import ResultWriter, read_results
from eval.runner import RunConfig, Runner
from eval.targets import Targets
from eval.tasks.needle import NeedleConfig, needle_examples
from eval.tasks.speed import SpeedConfig, speed_examples
from kvcache.clustering import ClusterConfig
from rapid.models import ModelSpec
from rapid.squeeze import SqueezeConfig

CONFIG = RunConfig(chunk_tokens=64, rag_tokens=64, tree_budget=8, progress=False,
                   squeeze=SqueezeConfig(ClusterConfig(fraction=0.1, min_clusters=4), calibration_window=32))


@pytest.fixture(scope="module")
def targets():
    return Targets(ModelSpec("tiny", device="cpu"))


@pytest.fixture
def ingests(monkeypatch):
    """Count DocumentQA.ingest calls by attention."""
    calls: list[str] = []
    original = DocumentQA.ingest

    def counting(self, text, *args, **kwargs):
        calls.append(self.config.attention)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(DocumentQA, "ingest", counting)
    return calls


def test_quality_modes_answer_and_greedy_spec_matches(targets, embedder, corpus, tmp_path, ingests):
    examples = needle_examples(targets.tokenizer, corpus, NeedleConfig(lengths=(300,), depths=(0.2, 0.8),
                                                                       max_new_tokens=12))
    modes = resolve_modes([*QUALITY_MODES, "rapid-squeezed", "retrieval", "layer-skip"])
    writer = ResultWriter(tmp_path / "examples.jsonl")
    results = Runner(targets, embedder, modes, CONFIG, writer.write).run(examples)
    writer.close()
    assert len(results) == len(examples) * len(modes)
    assert ingests == ["dense", "squeezed"] * len(examples)  # once per (example, attention), not per mode
    checked = [r for r in results if r.reference_mode is not None]
    assert {r.mode for r in checked} == {"rapid", "rapid-squeezed", "retrieval", "layer-skip"}
    assert all(r.identical for r in checked)
    assert all(r.score in (0.0, 1.0) and 1 <= len(r.token_ids) <= 12 for r in results)
    eta = [r for r in results if r.mode == "rapid-eta"]
    assert all(r.identical is None and r.stats.num_drafts > 0 for r in eta)
    assert all(r.rag_tokens <= r.document_tokens and r.rope_factor == 1.0 for r in results)
    reread = read_results(tmp_path / "examples.jsonl")
    assert [r.to_json() for r in reread] == [r.to_json() for r in results]


def test_long_documents_are_cut_in_the_middle(targets, embedder, corpus):
    examples = speed_examples(targets.tokenizer, corpus, SpeedConfig(lengths=(500,), questions=("Go on.",),
                                                                     max_new_tokens=4))
    config = RunConfig(chunk_tokens=64, rag_tokens=64, max_document_tokens=200, progress=False)
    result, = Runner(targets, embedder, resolve_modes(["dense"]), config).run(examples)
    assert result.document_tokens <= 200 and result.cut_tokens >= 300 and result.score is None


def test_past_the_native_window_the_target_is_stretched(targets):
    assert targets.factor_for(targets.native_context) == 1.0
    assert targets.factor_for(targets.native_context + 1) == 2.0
    assert targets.factor_for(3 * targets.native_context) == 4.0
    model = targets.get(2.0)
    assert model.max_context == 2 * targets.native_context
    assert targets.get(1.0).max_context == targets.native_context


def test_runner_rejects_a_reference_that_comes_later(targets, embedder):
    modes = resolve_modes(["rapid"])
    with pytest.raises(ValueError, match="earlier"):
        Runner(targets, embedder, modes[::-1], CONFIG)
