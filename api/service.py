"""The service layer: what the HTTP routers and the batch jobs both call.

`DocumentService` stores documents and starts their ingest jobs; `GenerationService` validates
generation parameters, resolves documents and runs generations on the worker thread. Nothing here
knows HTTP: errors are `api.errors` exceptions, results are small dataclasses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from api.backend import Backend, ChatMessage, Final, GenerationParams, Piece, Prompt, RequestTimings
from api.errors import GenerationCancelled, InvalidParam, NotFound, NotReady, PayloadTooLarge
from api.jobs import IngestJobs
from api.metrics import Metrics
from api.settings import Settings
from api.storage import DocumentRecord, DocumentStatus, Storage
from api.worker import AsyncStream, BlockingStream, GenerationWorker, Run

SUMMARY_INSTRUCTION = "Summarize the following text in a few sentences.\n\n"
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class Limits:
    max_document_bytes: int
    max_tokens_limit: int
    default_max_tokens: int
    request_timeout_s: float


@dataclass(frozen=True)
class GenerationResult:
    text: str
    final: Final


class DocumentService:
    def __init__(self, storage: Storage, jobs: IngestJobs, limits: Limits):
        self.storage = storage
        self.jobs = jobs
        self.limits = limits

    def create(self, text: str, name: str | None = None, param: str = "text") -> DocumentRecord:
        """Store a document and queue its ingest."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise InvalidParam(param, f"is not valid Unicode ({err.reason} at character {err.start})") from None
        if size > self.limits.max_document_bytes:
            raise PayloadTooLarge(f"the document is {size} bytes; the limit is "
                                  f"{self.limits.max_document_bytes}", param)
        if not text.strip():
            raise InvalidParam(param, "the document is empty")
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise InvalidParam("name", f"at most {MAX_NAME_CHARS} characters, got {len(name)}")
        self.jobs.check_capacity()
        record = self.storage.create(name or "untitled", text)
        self.jobs.submit(record.id)
        return record

    def create_from_bytes(self, data: bytes, name: str | None = None, param: str = "file") -> DocumentRecord:
        if len(data) > self.limits.max_document_bytes:
            raise PayloadTooLarge(f"the document is {len(data)} bytes; the limit is "
                                  f"{self.limits.max_document_bytes}", param)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise InvalidParam(param, f"is not UTF-8 text (invalid byte at offset {err.start})") from None
        return self.create(text, name, param)

    def get(self, doc_id: str) -> DocumentRecord:
        record = self.storage.get(doc_id)
        if record is None:
            raise NotFound(f"no document {doc_id!r}", "document_id")
        return record

    def list(self) -> list[DocumentRecord]:
        return self.storage.list()

    def delete(self, doc_id: str) -> None:
        self.jobs.cancel(doc_id)
        if not self.storage.delete(doc_id):
            raise NotFound(f"no document {doc_id!r}", "document_id")

    def ready_dir(self, doc_id: str) -> Path:
        """The folder of a document that can answer questions."""
        record = self.get(doc_id)
        if record.status == DocumentStatus.FAILED:
            raise NotReady(f"document {doc_id} failed to ingest: {record.error}", "document_id")
        if record.status != DocumentStatus.READY:
            raise NotReady(f"document {doc_id} is still {record.status.value} ({record.progress:.0%} done); "
                           "retry when its status is ready", "document_id")
        return self.storage.document_dir(doc_id)


class Generation:
    """A running generation whose first piece has arrived (so errors found before decoding are raised
    by the call that started it); iterate it for all pieces, or await `result()`."""

    def __init__(self, first: Piece, rest: AsyncStream):
        self.first = first
        self.rest = rest

    async def __aiter__(self) -> AsyncIterator[Piece]:
        yield self.first
        if self.first.final is None:
            async for piece in self.rest:
                yield piece

    async def result(self) -> GenerationResult:
        texts = []
        async for piece in self:
            texts.append(piece.text)
            if piece.final is not None:
                return GenerationResult("".join(texts), piece.final)
        raise GenerationCancelled("the generation ended without a result")


class GenerationService:
    def __init__(self, backend: Backend, documents: DocumentService, worker: GenerationWorker,
                 metrics: Metrics, limits: Limits, model_name: str):
        self.backend = backend
        self.documents = documents
        self.worker = worker
        self.metrics = metrics
        self.limits = limits
        self.model_name = model_name

    def params(self, max_tokens: int | None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: tuple[str, ...] = (),
               max_tokens_field: str = "max_tokens") -> GenerationParams:
        """Generation parameters checked against the server's limits (errors name the field)."""
        max_tokens = self.limits.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise InvalidParam(max_tokens_field, f"must be at least 1, got {max_tokens}")
        if max_tokens > self.limits.max_tokens_limit:
            raise InvalidParam(max_tokens_field,
                               f"must be at most {self.limits.max_tokens_limit}, got {max_tokens}")
        return GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stop)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise NotFound(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model")

    async def ask(self, doc_id: str, question: str, params: GenerationParams,
                  cancel: threading.Event | None = None) -> Generation:
        def submit(stream: AsyncStream) -> None:
            doc_dir = self.documents.ready_dir(doc_id)
            self.worker.submit(self._job(lambda c: self.backend.ask(doc_dir, question, params, c)), stream)

        return await self._start(submit, cancel)

    async def complete(self, prompt: Prompt, params: GenerationParams, doc_id: str | None = None,
                       cancel: threading.Event | None = None) -> Generation:
        def submit(stream: AsyncStream) -> None:
            doc_dir = self.documents.ready_dir(doc_id) if doc_id is not None else None
            self.worker.submit(self._job(lambda c: self.backend.complete(prompt, params, c, doc_dir)), stream)

        return await self._start(submit, cancel)

    def summarize(self, text: str, params: GenerationParams) -> GenerationResult:
        """Summarize one text, blocking (for batch jobs; same worker and backend as the API)."""
        messages = [ChatMessage("user", SUMMARY_INSTRUCTION + text)]
        stream = BlockingStream(self.limits.request_timeout_s)
        self.worker.submit(self._job(lambda c: self.backend.complete(messages, params, c)), stream)
        texts = []
        for piece in stream:
            texts.append(piece.text)
            if piece.final is not None:
                return GenerationResult("".join(texts), piece.final)
        raise GenerationCancelled("the generation ended without a result")

    async def _start(self, submit: Callable[[AsyncStream], None],
                     cancel: threading.Event | None) -> Generation:
        stream = AsyncStream(asyncio.get_running_loop(), self.limits.request_timeout_s, cancel)
        await run_in_threadpool(submit, stream)  # document lookups read SQLite: not on the event loop
        try:
            first = await anext(stream)
        except BaseException:
            stream.cancel.set()
            raise
        return Generation(first, stream)

    def _job(self, produce: Callable[[threading.Event], Iterator[Piece]]) -> Run:
        """Wrap a backend call with request timings and metrics (runs on the worker thread)."""
        submitted = time.monotonic()

        def run(cancel: threading.Event) -> Iterator[Piece]:
            started = time.monotonic()
            first_token = None
            finished = False
            try:
                for piece in produce(cancel):
                    now = time.monotonic()
                    if first_token is None and piece.num_tokens:
                        first_token = now
                    if piece.final is not None:
                        ttft = None if first_token is None else first_token - submitted
                        timings = RequestTimings(queued_s=started - submitted, ttft_s=ttft, total_s=now - submitted)
                        piece = replace(piece, final=replace(piece.final, timings=timings))
                        self.metrics.generation_finished(piece.final)
                        finished = True
                    yield piece
            finally:
                if not finished and cancel.is_set():
                    self.metrics.generation_cancelled()

        return run


@dataclass
class Services:
    """Everything a server or a batch job runs on, built from settings and a backend."""

    settings: Settings
    backend: Backend
    storage: Storage
    worker: GenerationWorker
    jobs: IngestJobs
    metrics: Metrics
    documents: DocumentService
    generation: GenerationService
    started_at: float = field(default_factory=time.time)

    @classmethod
    def open(cls, settings: Settings, backend: Backend, recover: bool = True) -> Services:
        """Start the worker and the ingest jobs; `recover` resumes the ingests a crash interrupted
        (the server does; one-off CLI commands, which may run beside a server, do not)."""
        storage = Storage(settings.data_dir)
        model_name = settings.served_model_name or backend.model_id
        metrics = Metrics(model_name)
        worker = GenerationWorker(settings.queue_size)
        worker.start()
        metrics.track_queue(lambda: worker.waiting, lambda: worker.running)
        jobs = IngestJobs(storage, backend, metrics, settings.max_pending_ingests,
                          settings.max_ingest_attempts)
        limits = Limits(max_document_bytes=settings.max_document_bytes,
                        max_tokens_limit=settings.max_tokens_limit,
                        default_max_tokens=settings.default_max_tokens,
                        request_timeout_s=settings.request_timeout_s)
        documents = DocumentService(storage, jobs, limits)
        generation = GenerationService(backend, documents, worker, metrics, limits, model_name)
        if recover:
            jobs.recover()
        return cls(settings, backend, storage, worker, jobs, metrics, documents, generation)

    def close(self) -> None:
        self.jobs.shutdown()
        self.worker.stop()
        self.storage.close()
