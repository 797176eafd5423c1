"""The document KV cache of LocalBackend: prefilled and clustered once at ingest, saved keyed and
CRC-checked, reused by every question (and after a restart); a damaged or foreign file is refused."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading

import pytest
from test_local_backend import TEXT, ask_prompt, greedy, no_progress, run

from api.backend import GenerationParams
from api.errors import IngestCancelled
from api.local_backend import KV_FILE, LocalBackend
from kvcache.clustering import ClusterConfig

QUESTION = "Where was the treaty signed?"


def reference(local, doc_dir, question: str) -> tuple[str, int]:
    """The AR loop's greedy answer (8 tokens at most) to `question` over the whole prompt."""
    return greedy(local, ask_prompt(local, doc_dir, question), 8)


def backend_with(local, drafter: str = "self", **cache) -> LocalBackend:
    """A fresh backend (nothing loaded, as after a restart) over the same models."""
    config = local.config
    return LocalBackend(local.lm, local.embedder, dataclasses.replace(
        config, speculation=dataclasses.replace(config.speculation, drafter=drafter),
        document_cache=dataclasses.replace(config.document_cache, **cache)))


@pytest.fixture(scope="module")
def pristine(tiny_backend, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine")
    (folder / "text.txt").write_text(TEXT)
    tiny_backend.ingest(folder, TEXT, no_progress, threading.Event())
    return folder


@pytest.fixture
def doc_dir(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "doc")


@pytest.fixture
def counted(monkeypatch):
    """Counts of `squeeze_document` (ingest's prefill + clustering) and `load_cache` calls."""
    import api.local_backend as module

    counts = {"squeeze": 0, "load": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(module, "squeeze_document", counting("squeeze", module.squeeze_document))
    monkeypatch.setattr(module, "load_cache", counting("load", module.load_cache))
    return counts


def test_ingest_builds_once_and_questions_reuse_the_stored_kv(tiny_backend, tmp_path, counted):
    folder = tmp_path / "doc"
    folder.mkdir()
    (folder / "text.txt").write_text(TEXT)
    progress = []
    info = tiny_backend.ingest(folder, TEXT, lambda stage, f: progress.append((stage, f)), threading.Event())
    assert [(s.name, s.status) for s in info.steps[3:]] == [("target_prefill", "done"), ("kv_clustering", "done")]
    prefill = [f for stage, f in progress if stage == "prefill"]
    assert len(prefill) >= 3 and prefill == sorted(prefill) and 0 < prefill[0] < prefill[-1] <= 0.9
    assert counted["squeeze"] == 1 and not list(folder.glob("*.partial"))

    questions = (QUESTION, "What does the keeper log?")
    expected = [reference(tiny_backend, folder, question) for question in questions]
    counted["load"] = 0
    backend = backend_with(tiny_backend, drafter="none")
    prefilled = []
    real_prefill = backend.runner.prefill
    backend.runner.prefill = lambda cache, ids, *a, **k: prefilled.append(len(ids)) or real_prefill(cache, ids, *a, **k)
    for question, answer in zip(questions, expected, strict=True):
        text, final = run(backend.ask(folder, question, GenerationParams(max_tokens=8), threading.Event()))
        assert (text, final.usage.completion_tokens) == answer
        kv = backend._document(folder).kv
        assert kv.dense.length == kv.prefix_len and not kv.lock.locked()  # cut back to the document
    # no prefill or clustering of the document at question time: only the question tails went in
    assert counted["squeeze"] == 1 and counted["load"] == 1
    assert len(prefilled) == 2 and max(prefilled) < 60 < kv.prefix_len

    info = tiny_backend.ingest(folder, TEXT, no_progress, threading.Event())  # a resumed ingest
    assert [s.status for s in info.steps] == ["reused"] * 5 and counted["squeeze"] == 1


def test_squeezed_questions_read_the_clusters_without_prefill(tiny_backend, doc_dir, counted):
    backend = backend_with(tiny_backend, attention="squeezed")
    for _ in range(2):
        text, final = run(backend.ask(doc_dir, QUESTION, GenerationParams(max_tokens=8), threading.Event()))
        assert text and final.usage.prompt_tokens == len(ask_prompt(tiny_backend, doc_dir, QUESTION))
    assert counted == {"squeeze": 0, "load": 1}
    assert backend._document(doc_dir).kv.dense is None  # no dense copy of the document is made


def test_a_damaged_cache_is_refused_and_the_answer_stays_right(tiny_backend, doc_dir, caplog):
    path = doc_dir / "kvcache" / KV_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensors
    path.write_bytes(bytes(data))
    backend = backend_with(tiny_backend)
    with caplog.at_level(logging.WARNING, logger="api.local_backend"):
        text, final = run(backend.ask(doc_dir, QUESTION, GenerationParams(max_tokens=8), threading.Event()))
    assert backend._document(doc_dir).kv is None
    assert "not using the stored KV cache" in caplog.text and "checksum" in caplog.text
    assert final.target_context == "document"  # the whole prompt, prefilled for this request
    assert (text, final.usage.completion_tokens) == reference(tiny_backend, doc_dir, QUESTION)

    info = tiny_backend.ingest(doc_dir, TEXT, no_progress, threading.Event())  # ingest again: rebuilt
    assert [s.status for s in info.steps] == ["reused", "reused", "reused", "done", "done"]
    assert backend_with(tiny_backend)._document(doc_dir).kv is not None


def test_a_cache_built_with_another_cluster_config_is_refused(tiny_backend, doc_dir, caplog):
    squeeze = dataclasses.replace(tiny_backend.config.document_cache.squeeze, cluster=ClusterConfig(fraction=0.1))
    backend = backend_with(tiny_backend, squeeze=squeeze)
    with caplog.at_level(logging.WARNING, logger="api.local_backend"):
        text, final = run(backend.ask(doc_dir, QUESTION, GenerationParams(max_tokens=8), threading.Event()))
    assert backend._document(doc_dir).kv is None and "built for something else" in caplog.text
    assert (text, final.usage.completion_tokens) == reference(tiny_backend, doc_dir, QUESTION)


def test_cancel_during_the_prefill_then_resume(tiny_backend, tmp_path):
    folder = tmp_path / "doc"
    folder.mkdir()
    cancel = threading.Event()

    def progress(stage: str, fraction: float) -> None:
        if stage == "prefill" and fraction > 0.45:
            cancel.set()

    with pytest.raises(IngestCancelled):
        tiny_backend.ingest(folder, TEXT, progress, cancel)
    assert (folder / "datastore").is_dir() and not (folder / "kvcache").exists()  # nothing half-written is published
    info = tiny_backend.ingest(folder, TEXT, no_progress, threading.Event())
    assert [s.status for s in info.steps] == ["reused", "reused", "reused", "done", "done"]
    assert not list(folder.glob("*.partial"))


def test_cancel_or_abandon_mid_answer_frees_the_document_kv(tiny_backend, doc_dir):
    backend = backend_with(tiny_backend)
    params = GenerationParams(max_tokens=40)
    cancel = threading.Event()
    pieces = backend.ask(doc_dir, QUESTION, params, cancel)
    next(pieces)
    cancel.set()
    assert all(p.final is None for p in pieces)
    kv = backend._document(doc_dir).kv
    assert not kv.lock.locked() and kv.dense.length == kv.prefix_len
    abandoned = backend.ask(doc_dir, QUESTION, params, threading.Event())
    next(abandoned)
    assert kv.lock.locked()
    abandoned.close()  # what the worker does when a client goes away
    assert not kv.lock.locked() and kv.dense.length == kv.prefix_len
    text, final = run(backend.ask(doc_dir, QUESTION, GenerationParams(max_tokens=8), threading.Event()))
    assert (text, final.usage.completion_tokens) == reference(tiny_backend, doc_dir, QUESTION)


def test_two_questions_at_once_on_one_document(tiny_backend, doc_dir):
    """The shared dense KV serves one question at a time; a second one meanwhile gets its own copy."""
    backend = backend_with(tiny_backend)
    other = "What do the bees do?"
    first = backend.ask(doc_dir, QUESTION, GenerationParams(max_tokens=8), threading.Event())
    head = next(first)  # holds the document's cache
    text, final = run(backend.ask(doc_dir, other, GenerationParams(max_tokens=8), threading.Event()))
    assert (text, final.usage.completion_tokens) == reference(tiny_backend, doc_dir, other)
    rest, final = run(first)
    assert (head.text + rest, final.usage.completion_tokens) == reference(tiny_backend, doc_dir, QUESTION)
