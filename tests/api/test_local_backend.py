"""LocalBackend on the tiny random model (byte tokenizer) and the bundled MiniLM embedder.

The invariant throughout: at temperature 0 the answer is the target's own greedy answer (the plain
AR loop over the whole prompt), whatever drafter, fusion or document KV path produced it.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from api.backend import ChatMessage, GenerationParams
from api.errors import IngestCancelled, InvalidParam, NotReady
from api.local_backend import DOCUMENT_SYSTEM, LocalBackend
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
        ("target_prefill", "done"), ("kv_clustering", "done")]
    assert (folder / "kvcache" / "document.safetensors").is_file()
    assert info.num_tokens == len(TEXT.encode()) and info.num_chunks == -(-info.num_tokens // 128)
    return folder


def run(pieces) -> tuple[str, object]:
    pieces = list(pieces)
    assert all(p.final is None for p in pieces[:-1])
    return "".join(p.text for p in pieces), pieces[-1].final


def test_ingest_resumes_and_rebuilds_damaged_parts(local, doc_dir):
    progress = []
    info = local.ingest(doc_dir, TEXT, lambda stage, f: progress.append((stage, f)), threading.Event())
    assert [s.status for s in info.steps] == ["reused"] * 5
    assert progress[0] == ("chunk", 0.0) and progress[-1] == ("done", 1.0)
    assert "prefill" not in [stage for stage, _ in progress]  # the stored KV is reused, not recomputed
    (doc_dir / "index" / "index.faiss").write_bytes(b"garbage")
    info = local.ingest(doc_dir, TEXT, no_progress, threading.Event())
    assert [s.status for s in info.steps] == ["reused", "done", "reused", "reused", "reused"]
    assert not list(doc_dir.glob("*.partial"))


def test_ingest_cancel(local, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(IngestCancelled):
        local.ingest(tmp_path, TEXT, no_progress, cancel)
    assert not (tmp_path / "index").exists()


def ask_prompt(local, doc_dir, question: str, system: str = DOCUMENT_SYSTEM) -> list[int]:
    """The target's whole prompt for `question` (what the plain AR reference reads)."""
    layout = local._split(local._render(local._document_messages(system, [ChatMessage("user", question)])), "", "q")
    token_ids, _ = local._load_chunks(doc_dir / "chunks", (doc_dir / "text.txt").read_text())
    return layout.before + token_ids.tolist() + layout.after


def greedy(local, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    """The AR loop's greedy answer: text and token count."""
    tokens = generate_all(local.runner, prompt, GenerationConfig(max_new_tokens=max_tokens,
                                                                 stop_token_ids=local.stop_ids))
    return local.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def test_ask_is_the_target_greedy_output(local, doc_dir):
    question = "When does the keeper log the weather?"
    text, final = run(local.ask(doc_dir, question, GenerationParams(max_tokens=12), threading.Event()))
    assert final.target_context == "document" and final.finish_reason in ("stop", "length")
    assert final.citations and all(0 <= c.char_start < c.char_end <= len(TEXT) for c in final.citations)
    assert [c.chunk_index for c in final.citations] == sorted(c.chunk_index for c in final.citations)
    spec = final.speculation  # the default: the target drafting from the RAG context, fused with retrieval
    assert spec.num_drafts > 0 and spec.num_draft_tokens >= spec.num_drafts and spec.num_accepted_tokens > 0
    assert spec.mean_acceptance_length > 1 and spec.retrieval_seconds > 0 and spec.verify_seconds > 0
    assert spec.num_emitted_tokens == final.usage.completion_tokens
    prompt = ask_prompt(local, doc_dir, question)
    assert final.usage.prompt_tokens == len(prompt)
    assert (text, final.usage.completion_tokens) == greedy(local, prompt, 12)


@pytest.mark.parametrize("speculation", [
    {"drafter": "none"}, {"drafter": "self", "fuse_retrieval": False}, {"drafter": "self", "tree_budget": 3},
    {"drafter": "retrieval"}, {"drafter": "layer-skip", "layer_skip_layers": 1},
], ids=["none", "self-unfused", "self-budget-3", "retrieval", "layer-skip"])
@pytest.mark.parametrize("attention", ["dense", "squeezed-all"])
def test_every_drafter_and_attention_gives_the_greedy_answer(local, doc_dir, speculation, attention):
    """Invariant 1 through the service: the dense document KV rebuilt from the clusters, or squeezed
    attention reading every cluster ("top" budget 1.0), with any drafter, equals the AR loop."""
    config = local.config
    cache = config.document_cache
    if attention == "squeezed-all":
        cache = dataclasses.replace(cache, attention="squeezed",
                                    squeeze=dataclasses.replace(cache.squeeze, budget=1.0, rule="top"))
    backend = LocalBackend(local.lm, local.embedder, dataclasses.replace(
        config, speculation=dataclasses.replace(config.speculation, **speculation), document_cache=cache))
    question = "Who signed the treaty, and where?"
    text, final = run(backend.ask(doc_dir, question, GenerationParams(max_tokens=10), threading.Event()))
    assert backend._document(doc_dir).kv is not None  # the stored KV was used, not a fresh prefill
    assert (text, final.usage.completion_tokens) == greedy(local, ask_prompt(local, doc_dir, question), 10)
    assert (final.speculation.num_drafts > 0) == (speculation["drafter"] != "none")


def test_squeezed_attention_with_drafters_equals_squeezed_without(local, doc_dir):
    """Invariant 1 with the same (approximate) attention on both sides: calibrated budget 0.1."""
    config = local.config
    cache = dataclasses.replace(config.document_cache, attention="squeezed")
    answers = []
    for drafter in ("none", "self"):
        backend = LocalBackend(local.lm, local.embedder, dataclasses.replace(
            config, speculation=dataclasses.replace(config.speculation, drafter=drafter), document_cache=cache))
        answers.append(run(backend.ask(doc_dir, "What do bees do?", GenerationParams(max_tokens=10),
                                       threading.Event()))[0])
    assert answers[0] == answers[1] and answers[0]


def test_a_custom_system_prompt_prefills_the_whole_prompt(local, doc_dir):
    messages = [ChatMessage("system", "You are terse."), ChatMessage("user", "Who signed the treaty?")]
    text, final = run(local.complete(messages, GenerationParams(max_tokens=8), threading.Event(), doc_dir))
    prompt = ask_prompt(local, doc_dir, "Who signed the treaty?", system="You are terse.")
    assert final.target_context == "document" and final.usage.prompt_tokens == len(prompt)
    assert (text, final.usage.completion_tokens) == greedy(local, prompt, 8)
    # without a system prompt a chat shares the ask prefix, so it reads the stored KV
    text, final = run(local.complete(messages[1:], GenerationParams(max_tokens=8), threading.Event(), doc_dir))
    shared = ask_prompt(local, doc_dir, "Who signed the treaty?")
    assert (text, final.usage.completion_tokens) == greedy(local, shared, 8)


def test_long_document_falls_back_to_the_retrieved_context(local, tmp_path):
    long_text = "\n\n".join([TEXT] * 4)  # ~5.6K tokens: more than the tiny model's 4096-token window
    (tmp_path / "text.txt").write_text(long_text)
    info = local.ingest(tmp_path, long_text, no_progress, threading.Event())
    assert [(s.name, s.status) for s in info.steps[3:]] == [("target_prefill", "skipped"), ("kv_clustering", "skipped")]
    assert "window" in info.steps[3].detail and not (tmp_path / "kvcache").exists()
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


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sampled_answers_are_reproducible_with_a_seed(local, doc_dir, eta):
    """Sampling through the engine (RAPID's eta > 0 shifts the target toward the drafter on purpose)."""
    config = local.config
    backend = LocalBackend(local.lm, local.embedder, dataclasses.replace(
        config, speculation=dataclasses.replace(config.speculation, eta=eta)))
    params = GenerationParams(max_tokens=12, temperature=0.9, seed=5)
    first, final = run(backend.ask(doc_dir, "What do bees do?", params, threading.Event()))
    again, _ = run(backend.ask(doc_dir, "What do bees do?", params, threading.Event()))
    assert first == again and final.speculation.num_drafts > 0


def test_ingest_interrupted_during_prefill_resumes_from_saved_slices(local, tmp_path):
    cache = dataclasses.replace(local.config.document_cache, checkpoint_every=256)
    backend = LocalBackend(local.lm, local.embedder, dataclasses.replace(local.config, document_cache=cache))
    cancel = threading.Event()

    def cancel_midway(stage: str, fraction: float) -> None:
        if stage == "prefill" and fraction > 0.7:  # more than half of the prefill is done
            cancel.set()

    with pytest.raises(IngestCancelled):
        backend.ingest(tmp_path, TEXT, cancel_midway, cancel)
    assert list((tmp_path / "prefill.partial").glob("prefill-*"))
    info = backend.ingest(tmp_path, TEXT, no_progress, threading.Event())
    prefill = next(s for s in info.steps if s.name == "target_prefill")
    assert prefill.status == "done" and prefill.detail.startswith("resumed at token ")
    assert int(prefill.detail.split()[3]) >= 512
    assert not (tmp_path / "prefill.partial").exists()
