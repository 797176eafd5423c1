"""The model-facing side of the service: one small `Backend` protocol and the records it exchanges.

The service layer (HTTP and batch jobs alike) talks only to a `Backend`: `LocalBackend` runs our
models and retrieval in this process; tests use a fake. Generation is an iterator of `Piece`s run on
the generation worker thread; the last piece carries a `Final` with the finish reason, token usage,
citations and speculation stats (`rapid.metrics.SpecStats`, the engine's own record). `cancel` is
set when the client goes away; a backend checks it between tokens and simply stops (no final piece
is needed then).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from rapid.metrics import SpecStats

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]
StepStatus = Literal["done", "reused", "skipped"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


Prompt = str | Sequence[ChatMessage]  # a raw completion prompt, or chat messages


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one


@dataclass(frozen=True)
class Citation:
    """A chunk of the document the RAG context was built from (char and token spans, half-open)."""

    chunk_index: int
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    score: float  # cosine similarity to the question
    snippet: str  # the chunk's first characters


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestTimings:
    """Seconds from submission: waiting for the worker, to the first token, to the end."""

    queued_s: float
    ttft_s: float | None  # None when no token was generated
    total_s: float


@dataclass(frozen=True)
class Final:
    finish_reason: FinishReason
    usage: Usage
    speculation: SpecStats
    citations: tuple[Citation, ...] = ()
    # what the target model read: the prompt alone, the whole document, or the retrieved chunks
    target_context: Literal["prompt", "document", "retrieved"] = "prompt"
    timings: RequestTimings | None = None  # set by the service layer, not by backends


@dataclass(frozen=True)
class Piece:
    """New text and the number of generated tokens it covers; the last piece has `final`."""

    text: str
    num_tokens: int
    final: Final | None = None


@dataclass(frozen=True)
class IngestStep:
    name: str
    status: StepStatus  # done now, reused from an interrupted earlier run, or skipped (detail says why)
    seconds: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class IngestInfo:
    num_tokens: int
    num_chunks: int
    steps: tuple[IngestStep, ...]


ProgressFn = Callable[[str, float], None]  # (stage name, overall fraction done in [0, 1])


class Backend(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def max_context(self) -> int: ...

    def ingest(self, doc_dir: Path, text: str, progress: ProgressFn, cancel: threading.Event) -> IngestInfo:
        """Build everything a question needs under `doc_dir`; resumable (finished parts are reused).

        Raises `IngestCancelled` when `cancel` is set.
        """
        ...

    def ask(self, doc_dir: Path, question: str, params: GenerationParams,
            cancel: threading.Event) -> Iterator[Piece]:
        """Answer a question about an ingested document; citations name the chunks used."""
        ...

    def complete(self, prompt: Prompt, params: GenerationParams, cancel: threading.Event,
                 doc_dir: Path | None = None) -> Iterator[Piece]:
        """Continue a raw prompt or a chat, optionally grounded in an ingested document."""
        ...
