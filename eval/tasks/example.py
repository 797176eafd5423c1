"""One evaluation example: a document, a question about it, and how to score the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["match_all", "passkey", "kv_word", "f1", "rouge_l", "exact_match", "none"]


@dataclass(frozen=True)
class Example:
    id: str
    task: str  # "needle", "passkey", "kv", "ruler-multikey", "longbench-qasper", "speed", ...
    document_id: str  # examples with the same document_id share one context and one ingest
    context: str
    question: str
    references: tuple[str, ...]
    metric: Metric
    max_new_tokens: int
    length: int  # the context length in tokens the generator aimed at (0: as given)
    depth: float | None = None  # where the (first) needle starts, as a fraction of the context's characters
    needle_spans: tuple[tuple[int, int], ...] = ()  # context[start:end] is a needle
    first_line_only: bool = False  # score only the answer's first line (LongBench, a few datasets)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.metric != "none" and not self.references:
            raise ValueError(f"example {self.id} is scored by {self.metric} but has no references")
