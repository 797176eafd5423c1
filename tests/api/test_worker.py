"""The generation worker, its streams, and stop strings."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from api.backend import Final, Piece, Usage
from api.errors import GenerationCancelled, GenerationTimeout, InvalidParam, QueueFull
from api.stops import StopMatcher
from api.worker import AsyncStream, BlockingStream, GenerationWorker
from rapid.metrics import SpecStats

FINAL = Final("length", Usage(1, 2), SpecStats())


def test_stop_matcher_worked_example():
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == ("ab", False)
    assert matcher.feed("ND!") == ("c", True)


@pytest.mark.parametrize("seed", range(20))
def test_stop_matcher_matches_whole_text_cut(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("abc") for _ in range(40))
    stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(2)]
    matcher = StopMatcher(stops)
    out, stopped, i = [], False, 0
    while i < len(text) and not stopped:
        step = rng.randint(1, 5)
        piece, stopped = matcher.feed(text[i:i + step])
        out.append(piece)
        i += step
    if not stopped:
        out.append(matcher.flush())
    cut = min([text.find(s) for s in stops if s in text], default=len(text))
    assert "".join(out) == text[:cut]
    assert stopped == (cut < len(text))


def test_no_stops_emits_everything_at_once():
    assert StopMatcher([]).feed("abc") == ("abc", False)


def pieces(n: int, gate: threading.Event | None = None):
    def run(cancel: threading.Event):
        for i in range(n):
            if gate is not None:
                gate.wait(5)
            yield Piece(f"{i} ", 1)
        yield Piece("", 0, FINAL)

    return run


@pytest.fixture
def worker():
    worker = GenerationWorker(queue_size=2)
    worker.start()
    yield worker
    worker.stop()


def test_blocking_stream_in_order(worker):
    stream = BlockingStream(5.0)
    worker.submit(pieces(3), stream)
    got = list(stream)
    assert [p.text for p in got] == ["0 ", "1 ", "2 ", ""] and got[-1].final is FINAL


def test_job_errors_reach_the_caller_and_the_worker_goes_on(worker):
    def failing(cancel):
        raise InvalidParam("max_tokens", "too many")
        yield

    stream = BlockingStream(5.0)
    worker.submit(failing, stream)
    with pytest.raises(InvalidParam, match="too many"):
        list(stream)
    stream = BlockingStream(5.0)
    worker.submit(pieces(1), stream)
    assert list(stream)[-1].final is FINAL


def test_cancel_stops_a_running_job_and_skips_a_queued_one(worker):
    seen = []

    def slow(cancel):
        for i in range(1000):
            seen.append(i)
            yield Piece("x", 1)
            cancel.wait(5)  # the next piece comes only after the caller cancelled

    running, queued = BlockingStream(5.0), BlockingStream(5.0)
    worker.submit(slow, running)
    started = threading.Event()

    def never(cancel):
        started.set()
        yield Piece("never", 1)

    worker.submit(never, queued)
    queued.cancel.set()
    assert next(running).text == "x"
    running.cancel.set()
    with pytest.raises(GenerationCancelled):
        list(running)
    with pytest.raises(GenerationCancelled):
        list(queued)
    assert not started.is_set() and len(seen) <= 2


def test_queue_full(worker):
    gate = threading.Event()
    streams = [BlockingStream(5.0) for _ in range(3)]
    worker.submit(pieces(1, gate), streams[0])
    while worker.running == 0:
        pass
    worker.submit(pieces(1), streams[1])
    worker.submit(pieces(1), streams[2])
    with pytest.raises(QueueFull) as info:
        worker.submit(pieces(1), BlockingStream(5.0))
    assert info.value.retry_after_s >= 1 and worker.waiting == 2
    gate.set()
    for stream in streams:
        assert list(stream)[-1].final is FINAL


def test_timeout_cancels(worker):
    gate = threading.Event()
    stream = BlockingStream(0.2)
    worker.submit(pieces(1, gate), stream)
    with pytest.raises(GenerationTimeout):
        list(stream)
    assert stream.cancel.is_set()
    gate.set()


def test_async_stream(worker):
    async def consume():
        stream = AsyncStream(asyncio.get_running_loop(), 5.0)
        worker.submit(pieces(2), stream)
        return [piece.text async for piece in stream]

    assert asyncio.run(consume()) == ["0 ", "1 ", ""]


def test_stop_cancels_what_is_left():
    worker = GenerationWorker(queue_size=4)
    gate = threading.Event()
    first, second = BlockingStream(5.0), BlockingStream(5.0)
    worker.submit(pieces(5, gate), first)
    worker.submit(pieces(5), second)
    worker.start()
    threading.Timer(0.2, gate.set).start()
    worker.stop()
    assert first.cancel.is_set() and second.cancel.is_set()
    with pytest.raises(GenerationCancelled):
        list(second)
