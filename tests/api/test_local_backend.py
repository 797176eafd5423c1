"""LocalBackend on the tiny random model (byte tokenizer) and the bundled MiniLM embedder."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from api.backend import ChatMessage, GenerationParams
from api.errors import IngestCancelled, InvalidParam, NotReady
from api.local_backend import LocalBackend
from rapid.generate import GenerationConfig, generate_all

PARAGRAPHS = [
    "The lighthouse keeper logs the weather every morning at six.",
    "Grain prices rose sharply after the long drought in the valley.",
    "The treaty was signed in the old library by both delegations.",
    "Bees return to the hive when the afternoon light begins to fade.",
]
TEXT = "\n\n".join(PARAGRAPHS[i % 4] + f" Entry {i}." for i in range(20))  # ~1.4K bytes = tokens


@pytest.fixture(scope="module")
def local(tiny_backend) -> LocalBackend:
    return tiny_backend


def no_progress(stage: str, fraction: float) -> None:
    pass


@pytest.fixture(scope="module")
def doc_dir(local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("doc")
    (folder / "text.txt").write_text(TEXT)
    info = local.ingest(folder, TEXT, no_progress, threading.Event())
    assert [(s.name, s.status) for s in info.steps] == [
        ("chunks", "done"), ("index", "done"), ("datastore", "done"),
        ("target_prefill", "skipped"), ("kv_clustering", "skipped")]
    assert info.num_tokens == len(TEXT.encode()) and info.num_chunks == -(-info.num_tokens // 128)
    return folder


def run(pieces) -> tuple[str, object]:
    pieces = list(pieces)
    assert all(p.final is None for p in pieces[:-1])
    return "".join(p.text for p in pieces), pieces[-1].final


def test_ingest_resumes_and_rebuilds_damaged_parts(local, doc_dir):
    progress = []
    info = local.ingest(doc_dir, TEXT, lambda stage, f: progress.append((stage, f)), threading.Event())
    assert [s.status for s in info.steps[:3]] == ["reused", "reused", "reused"]
    assert progress[0] == ("chunk", 0.0) and progress[-1] == ("done", 1.0)
    (doc_dir / "index" / "index.faiss").write_bytes(b"garbage")
    info = local.ingest(doc_dir, TEXT, no_progress, threading.Event())
    assert [s.status for s in info.steps[:3]] == ["reused", "done", "reused"]
    assert not list(doc_dir.glob("*.partial"))


def test_ingest_cancel(local, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(IngestCancelled):
        local.ingest(tmp_path, TEXT, no_progress, cancel)
    assert not (tmp_path / "index").exists()


def test_ask_is_the_target_greedy_output(local, doc_dir):
    params = GenerationParams(max_tokens=6)
    text, final = run(local.ask(doc_dir, "When does the keeper log the weather?", params, threading.Event()))
    assert final.target_context == "document" and final.finish_reason in ("stop", "length")
    assert final.citations and all(0 <= c.char_start < c.char_end <= len(TEXT) for c in final.citations)
    assert [c.chunk_index for c in final.citations] == sorted(c.chunk_index for c in final.citations)
    assert final.speculation.num_drafts == 0 and final.speculation.mean_acceptance_length == 1.0
    assert final.speculation.retrieval_seconds > 0
    # the same prompt through the plain AR loop gives the same tokens
    doc = local._document(doc_dir)
    layout = local._split(local._render(_ask_messages(local, "When does the keeper log the weather?")), "", "q")
    prompt = layout.before + doc.token_ids.tolist() + layout.after
    assert final.usage.prompt_tokens == len(prompt)
    expected = generate_all(local.runner, prompt, GenerationConfig(max_new_tokens=6, stop_token_ids=local.stop_ids))
    assert final.usage.completion_tokens == len(expected)
    assert text == local.tokenizer.decode(expected, skip_special_tokens=True)


def _ask_messages(local, question):
    from api.local_backend import ASK_SYSTEM, DOC_MARK

    return [ChatMessage("system", ASK_SYSTEM), ChatMessage("user", f"Document:\n{DOC_MARK}\n\nQuestion: {question}")]


def test_long_document_falls_back_to_the_retrieved_context(local, tmp_path):
    long_text = "\n\n".join([TEXT] * 4)  # ~5.6K tokens: more than the tiny model's 4096-token window
    (tmp_path / "text.txt").write_text(long_text)
    local.ingest(tmp_path, long_text, no_progress, threading.Event())
    _, final = run(local.ask(tmp_path, "treaty library", GenerationParams(max_tokens=4), threading.Event()))
    assert final.target_context == "retrieved"
    assert 0 < sum(c.token_end - c.token_start for c in final.citations) <= 256
    assert final.usage.prompt_tokens < 256 + 200  # the template and question around the context


def test_complete_and_chat(local, doc_dir):
    params = GenerationParams(max_tokens=5, temperature=0.8, seed=3)
    text, final = run(local.complete("Once upon a time", params, threading.Event()))
    again, _ = run(local.complete("Once upon a time", params, threading.Event()))
    assert text == again and final.target_context == "prompt" and not final.citations  # same seed, same output
    messages = [ChatMessage("user", "Who signed the treaty?")]
    _, final = run(local.complete(messages, params, threading.Event(), doc_dir))
    assert final.target_context == "document" and final.citations
    _, final = run(local.complete(messages, params, threading.Event()))
    assert final.usage.prompt_tokens < 100


def test_stop_strings_and_cancel(local):
    params = GenerationParams(max_tokens=40)
    text, _ = run(local.complete("abc", params, threading.Event()))
    assert len(text) > 4
    stop = text[2:4]
    cut, final = run(local.complete("abc", dataclasses.replace(params, stop=(stop,)), threading.Event()))
    assert cut == text[:text.index(stop)] and final.finish_reason == "stop"
    cancel = threading.Event()
    pieces = local.complete("abc", params, cancel)
    next(pieces)
    cancel.set()
    assert all(p.final is None for p in pieces)


def test_limits_name_the_field(local, doc_dir):
    with pytest.raises(InvalidParam) as info:
        list(local.complete("x" * local.max_context, GenerationParams(max_tokens=1), threading.Event()))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidParam) as info:
        list(local.complete("hello", GenerationParams(max_tokens=local.max_context), threading.Event()))
    assert info.value.param == "max_tokens" and "at most" in info.value.message


def test_document_from_another_model_is_refused(local, doc_dir):
    other_lm = dataclasses.replace(local.lm, revision="other")
    other = LocalBackend(other_lm, local.embedder, local.config)
    with pytest.raises(NotReady, match="upload it again"):
        list(other.ask(doc_dir, "q", GenerationParams(max_tokens=1), threading.Event()))
