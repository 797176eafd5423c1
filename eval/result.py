"""One answer of one mode to one example, as written to the per-example JSONL file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rapid.metrics import SpecStats


@dataclass
class Result:
    example_id: str
    task: str
    length: int  # the context length the task aimed at (0: as given)
    depth: float | None
    mode: str
    prediction: str
    token_ids: list[int]
    references: list[str]
    metric: str
    score: float | None  # None for unscored (speed) prompts
    reference_mode: str | None  # the greedy mode this one must equal, if any
    identical: bool | None  # token ids equal to reference_mode's for this example
    document_tokens: int  # what the target read, after any middle truncation
    cut_tokens: int  # removed from the middle to fit the model
    rope_factor: float
    rag_tokens: int
    ingest_seconds: float  # ingest of this example's document for this mode's attention
    answer_seconds: float  # from the question to the last token: retrieval, prefills and decoding
    stats: SpecStats = field(default_factory=SpecStats)

    def to_json(self) -> str:
        record = asdict(self)
        record["acceptance_rate"] = round(self.stats.acceptance_rate, 4)
        record["mean_acceptance_length"] = round(self.stats.mean_acceptance_length, 4)
        record["tokens_per_second"] = round(self.stats.tokens_per_second, 3)
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Result:
        record = json.loads(line)
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        values["stats"] = SpecStats(**record["stats"])
        return cls(**values)


def read_results(path: Path) -> list[Result]:
    with open(path, encoding="utf-8") as lines:
        return [Result.from_json(line) for line in lines if line.strip()]


class ResultWriter:
    """Appends one JSON line per result and flushes it, so a crash loses nothing already answered."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", encoding="utf-8")

    def write(self, result: Result) -> None:
        self._file.write(result.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
