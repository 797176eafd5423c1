"""The generation worker: one dedicated thread runs generations one at a time from a bounded queue.

The event loop never runs model code. A request puts a job (a function from a cancel event to an
iterator of `Piece`s) and a stream into the queue and awaits the stream; the worker thread pushes
pieces into the stream with `loop.call_soon_threadsafe`. A full queue raises `QueueFull` at once
(HTTP 429). Setting the stream's `cancel` event (client disconnect, timeout) makes the worker stop
that job between two pieces, or skip it if it has not started. Batch jobs use `BlockingStream`, the
same jobs and worker without an event loop.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from api.backend import Piece
from api.errors import GenerationCancelled, GenerationTimeout, QueueFull

Run = Callable[[threading.Event], Iterator[Piece]]
_END = object()


class _Stream(ABC):
    """Consumer side of one job: pieces in order, then the end; an exception from the job is re-raised.

    `cancel` may be shared with the caller (who sets it when its client disconnects).
    """

    def __init__(self, timeout_s: float, cancel: threading.Event | None = None):
        self.cancel = cancel if cancel is not None else threading.Event()
        self.timeout_s = timeout_s
        self._done = False

    @abstractmethod
    def put(self, item) -> None:
        """Deliver a `Piece`, an exception or the end marker (called on the worker thread)."""

    def close(self) -> None:  # called on the worker thread
        self.put(_END)

    def _take(self, item) -> Piece:
        if item is _END:
            self._done = True
            raise GenerationCancelled("the generation was cancelled before it finished")
        if isinstance(item, Exception):
            self._done = True
            raise item
        if item.final is not None:
            self._done = True
        return item

    def _timed_out(self) -> GenerationTimeout:
        self.cancel.set()
        self._done = True
        return GenerationTimeout(f"the generation did not finish within {self.timeout_s:g} s")


class AsyncStream(_Stream):
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float,
                 cancel: threading.Event | None = None):
        super().__init__(timeout_s, cancel)
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._deadline = loop.time() + timeout_s

    def put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Piece:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await asyncio.wait_for(self._queue.get(), max(self._deadline - self._loop.time(), 0.0))
        except TimeoutError:
            raise self._timed_out() from None
        return self._take(item)


class BlockingStream(_Stream):
    def __init__(self, timeout_s: float, cancel: threading.Event | None = None):
        super().__init__(timeout_s, cancel)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._deadline = time.monotonic() + timeout_s

    def put(self, item) -> None:
        self._queue.put(item)

    def __iter__(self) -> BlockingStream:
        return self

    def __next__(self) -> Piece:
        if self._done:
            raise StopIteration
        try:
            item = self._queue.get(timeout=max(self._deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise self._timed_out() from None
        return self._take(item)


@dataclass
class _Job:
    run: Run
    stream: _Stream
    submitted: float = field(default_factory=time.monotonic)


class GenerationWorker:
    def __init__(self, queue_size: int):
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._current: _Job | None = None
        self._mean_job_s = 1.0  # moving average of job durations, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="rapid-generation", daemon=True)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return int(self._current is not None)

    def start(self) -> None:
        self._thread.start()

    def submit(self, run: Run, stream: _Stream) -> None:
        try:
            self._queue.put_nowait(_Job(run, stream))
        except queue.Full:
            retry = min(600, max(1, math.ceil(self._mean_job_s * (self.waiting + 1))))
            raise QueueFull(f"the generation queue is full ({self.waiting} waiting); retry in {retry} s",
                            retry_after_s=retry) from None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel what is queued and running, then end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.stream.cancel.set()
                job.stream.close()
        current = self._current
        if current is not None:
            current.stream.cancel.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            self._current = job
            start = time.monotonic()
            try:
                self._run(job)
            finally:
                self._current = None
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - start)

    @staticmethod
    def _run(job: _Job) -> None:
        stream = job.stream
        pieces = None
        try:
            if stream.cancel.is_set():
                return
            pieces = job.run(stream.cancel)
            for piece in pieces:
                if stream.cancel.is_set():
                    return
                stream.put(piece)
        except Exception as err:  # the job's own failure goes to its caller, the worker goes on
            stream.put(err)
        finally:
            if pieces is not None and hasattr(pieces, "close"):
                pieces.close()
            stream.close()
