"""Fixtures for the API tests: a fake backend (no models) and apps built around it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.backend import Citation, Final, GenerationParams, IngestInfo, IngestStep, Piece, Prompt, Usage
from api.errors import IngestCancelled, InvalidParam
from api.main import create_app
from api.settings import Settings
from api.stops import StopMatcher
from rapid.metrics import SpecStats


class FakeBackend:
    """Deterministic words instead of a model: piece i is "w{i} ". Records every call.

    `gate`: generation waits for it before the first word (to hold the worker busy);
    `ingest_gate`: ingest waits for it; `delay_s`: sleep per word; `fail_ingest`: ingest raises.
    """

    model_id = "fake-model"
    max_context = 512

    def __init__(self, delay_s: float = 0.0, fail_ingest: bool = False):
        self.delay_s = delay_s
        self.fail_ingest = fail_ingest
        self.gate = threading.Event()
        self.gate.set()
        self.ingest_gate = threading.Event()
        self.ingest_gate.set()
        self.calls: list[tuple] = []
        self.started = threading.Event()  # a generation began
        self.cancelled = threading.Event()  # a generation saw its cancel event

    def ingest(self, doc_dir: Path, text: str, progress, cancel: threading.Event) -> IngestInfo:
        progress("chunk", 0.0)
        while not self.ingest_gate.wait(0.01):
            if cancel.is_set():
                raise IngestCancelled(doc_dir.name)
        if self.fail_ingest:
            raise ValueError("this document cannot be ingested")
        (doc_dir / "fake-index.txt").write_text(str(len(text.split())))
        progress("done", 1.0)
        return IngestInfo(num_tokens=len(text.split()), num_chunks=1,
                          steps=(IngestStep("fake_index", "done", 0.001), IngestStep("kv_clustering", "skipped",
                                                                                     detail="fake")))

    def ask(self, doc_dir: Path, question: str, params: GenerationParams, cancel) -> Iterator[Piece]:
        self.calls.append(("ask", doc_dir.name, question, params))
        citation = Citation(0, 0, 12, 0, 3, 0.9, "the snippet")
        return self._words(len(question.split()) + 10, params, cancel, (citation,), "document")

    def complete(self, prompt: Prompt, params: GenerationParams, cancel, doc_dir: Path | None = None):
        self.calls.append(("complete", prompt, params, doc_dir.name if doc_dir else None))
        text = prompt if isinstance(prompt, str) else " ".join(m.content for m in prompt)
        citations = (Citation(0, 0, 12, 0, 3, 0.5, "cited"),) if doc_dir else ()
        return self._words(len(text.split()), params, cancel, citations, "document" if doc_dir else "prompt")

    def _words(self, prompt_tokens: int, params: GenerationParams, cancel, citations, target_context):
        if prompt_tokens + params.max_tokens > self.max_context:
            raise InvalidParam("max_tokens", f"at most {self.max_context - prompt_tokens} for this prompt")
        return self._generate(prompt_tokens, params, cancel, citations, target_context)

    def _generate(self, prompt_tokens: int, params: GenerationParams, cancel, citations, target_context):
        self.started.set()
        try:
            while not self.gate.wait(0.01):
                if cancel.is_set():
                    return
            stops = StopMatcher(params.stop)
            stats = SpecStats()
            stats.record_step(drafted=4, accepted=2)
            generated = 0
            finish = "length"
            for i in range(params.max_tokens):
                if cancel.is_set():
                    return
                time.sleep(self.delay_s)
                generated += 1
                text, stopped = stops.feed(f"w{i} ")
                if stopped:
                    finish = "stop"
                    yield Piece(text, 1)
                    break
                yield Piece(text, 1)
            tail = "" if finish == "stop" else stops.flush()
            yield Piece(tail, 0, Final(finish, Usage(prompt_tokens, generated), stats, citations, target_context))
        finally:
            if cancel.is_set():  # stopped by the cancel event, or closed by the worker after it
                self.cancelled.set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on a free local port; the lifespan runs as in `rapid serve`."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def Server() -> type[LiveServer]:  # noqa: N802 - used like the class it returns
    return LiveServer


@pytest.fixture(scope="session")
def tiny_backend(tmp_path_factory):
    """A LocalBackend on the tiny random model and the bundled MiniLM embedder (loaded once)."""
    from api.local_backend import LocalBackend

    settings = Settings(model="tiny", device="cpu", data_dir=tmp_path_factory.mktemp("unused"), chunk_tokens=128,
                        rag_min_tokens=256, prefill_chunk=512)
    return LocalBackend.from_settings(settings)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_document_bytes=10_000, max_tokens_limit=100,
                    default_max_tokens=8, queue_size=4, request_timeout_s=10.0)


@pytest.fixture
def fake_backend() -> type[FakeBackend]:
    return FakeBackend


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(settings: Settings, backend: FakeBackend) -> Iterator[TestClient]:
    with TestClient(create_app(settings, backend)) as test_client:
        yield test_client


def wait_status(client: TestClient, doc_id: str, statuses=("ready", "failed"), timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/documents/{doc_id}").json()
        if body["status"] in statuses:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{doc_id} never reached {statuses}: {body}")
        time.sleep(0.02)


@pytest.fixture
def wait():
    """`wait(client, doc_id)`: poll a document until it is ready or failed; returns its body."""
    return wait_status


@pytest.fixture
def ready_doc(client: TestClient) -> str:
    response = client.post("/v1/documents", json={"text": "alpha beta gamma delta", "name": "greek"})
    assert response.status_code == 201, response.text
    doc_id = response.json()["id"]
    assert wait_status(client, doc_id)["status"] == "ready"
    return doc_id
