"""Ingest jobs: one background thread runs `Backend.ingest` per document and records its progress.

Lifecycle of a document row: queued -> ingesting -> ready | failed. Progress (stage, fraction) is
written to the row while the job runs, at most every `progress_interval_s`.

After a crash or kill, rows still `ingesting` are found at startup by `recover`: the interruption is
counted, and the document is queued again (the backend reuses the parts it had published) until it
has crashed `max_attempts` times, then it is marked failed. A graceful shutdown cancels the running
job and puts its document back to `queued` without counting a crash.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from api.backend import Backend
from api.errors import IngestCancelled, QueueFull
from api.metrics import Metrics
from api.storage import DocumentStatus, Storage

log = logging.getLogger(__name__)


class IngestJobs:
    def __init__(self, storage: Storage, backend: Backend, metrics: Metrics, max_pending: int,
                 max_attempts: int, progress_interval_s: float = 0.25):
        self.storage = storage
        self.backend = backend
        self.metrics = metrics
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self.progress_interval_s = progress_interval_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rapid-ingest")
        self._lock = threading.Lock()
        self._cancels: dict[str, threading.Event] = {}
        self._shutting_down = threading.Event()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._cancels)

    def check_capacity(self) -> None:
        if self.pending >= self.max_pending:
            raise QueueFull(f"{self.pending} documents are waiting to be ingested; try again later",
                            retry_after_s=30)

    def submit(self, doc_id: str) -> Future:
        with self._lock:
            self._cancels[doc_id] = threading.Event()
        return self._executor.submit(self._run, doc_id)

    def cancel(self, doc_id: str) -> None:
        with self._lock:
            event = self._cancels.get(doc_id)
        if event is not None:
            event.set()

    def recover(self) -> None:
        """Resume or fail the ingests a previous process left unfinished (call once at startup)."""
        for removed in self.storage.remove_orphans():
            log.info("removed leftover folder %s (no document row)", removed)
        for record in self.storage.unfinished():
            crashes = record.crashes + (record.status == DocumentStatus.INGESTING)
            if crashes >= self.max_attempts:
                self.storage.mark_failed(record.id, f"ingest was interrupted {crashes} times (the server "
                                                    "crashed or was killed while ingesting); giving up")
                continue
            self.storage.mark_queued(record.id, crashes)
            log.info("resuming the ingest of %s", record.id)
            self.submit(record.id)

    def shutdown(self) -> None:
        self._shutting_down.set()
        with self._lock:
            events = list(self._cancels.values())
        for event in events:
            event.set()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self, doc_id: str) -> None:
        with self._lock:
            cancel = self._cancels[doc_id]
        try:
            record = self.storage.get(doc_id)
            if record is None or cancel.is_set():
                return
            self._ingest(doc_id, cancel)
        finally:
            with self._lock:
                self._cancels.pop(doc_id, None)
            if self.storage.get(doc_id) is None:  # deleted meanwhile: the job may have rewritten parts
                shutil.rmtree(self.storage.documents_dir / doc_id, ignore_errors=True)

    def _ingest(self, doc_id: str, cancel: threading.Event) -> None:
        self.storage.mark_ingesting(doc_id)
        last_write = 0.0
        last_stage = ""

        def progress(stage: str, fraction: float) -> None:
            nonlocal last_write, last_stage
            now = time.monotonic()
            if stage != last_stage or now - last_write >= self.progress_interval_s:
                self.storage.update_progress(doc_id, stage, fraction)
                last_write, last_stage = now, stage
            if cancel.is_set():
                raise IngestCancelled(doc_id)

        start = time.perf_counter()
        try:
            text = self.storage.read_text(doc_id)
            info = self.backend.ingest(self.storage.document_dir(doc_id), text, progress, cancel)
        except IngestCancelled:
            record = self.storage.get(doc_id)
            if record is not None and self._shutting_down.is_set():
                self.storage.mark_queued(doc_id, record.crashes)
            self.metrics.ingest_finished("cancelled", time.perf_counter() - start)
            return
        except Exception as err:  # a bad document must not take the server down: record it, go on
            log.exception("ingest of %s failed", doc_id)
            self.storage.mark_failed(doc_id, f"{type(err).__name__}: {err}")
            self.metrics.ingest_finished("failed", time.perf_counter() - start)
            return
        if cancel.is_set():
            self.metrics.ingest_finished("cancelled", time.perf_counter() - start)
            return
        self.storage.mark_ready(doc_id, info)
        self.metrics.ingest_finished("ready", time.perf_counter() - start)
