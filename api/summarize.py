"""Batch summarization: a JSONL file (one {"text": ..., "id": ...} object a line) or a folder of text
files in, one JSON line per row out, through the same `GenerationService` as the HTTP API.

Each row has a key: `line N` for JSONL (1-based, blank lines skipped), the relative path for a
folder. Every output line names its key and holds either the summary or the row's error, so a bad
row is recorded and the batch goes on. Resume: rows whose key is already in the output are skipped.
Each line is written with one `write` and fsynced before the next row starts, so a kill -9 loses at
most the row in flight; a torn last line (or any line that is not a complete record) is dropped
when the next run starts, and that row is done again. No row is lost or written twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from api.backend import GenerationParams
from api.errors import ServiceError
from api.service import GenerationService
from api.storage import write_atomic

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class Row:
    key: str
    text: str | None
    id: object = None  # the input row's own "id", echoed in the output
    error: str | None = None  # why the row cannot be summarized (bad JSON, no text, not UTF-8)


@dataclass
class SummaryReport:
    total: int = 0
    skipped: int = 0  # finished by an earlier run
    summarized: int = 0
    failed: int = 0


def _jsonl_row(number: int, line: bytes) -> Row:
    key = f"line {number}"
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return Row(key, None, error=f"not a JSON line: {err}")
    if not isinstance(value, dict):
        return Row(key, None, error="not a JSON object")
    text = value.get("text")
    if not isinstance(text, str) or not text.strip():
        return Row(key, None, value.get("id"), error="no non-empty string field 'text'")
    return Row(key, text, value.get("id"))


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def read_rows(source: Path) -> Iterator[Row]:
    """The rows of a JSONL file or of a folder's text files (sorted by path), in order."""
    if source.is_dir():
        for path in _text_files(source):
            key = path.relative_to(source).as_posix()
            try:
                yield Row(key, path.read_text(encoding="utf-8"), key)
            except (UnicodeDecodeError, OSError) as err:
                yield Row(key, None, key, error=f"cannot read it as UTF-8 text: {err}")
        return
    with open(source, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield _jsonl_row(number, line)


def count_rows(source: Path) -> int:
    if source.is_dir():
        return len(_text_files(source))
    with open(source, "rb") as f:
        return sum(1 for line in f if line.strip())


def finished_keys(out: Path) -> set[str]:
    """Keys already in `out`; lines that are not complete records (a kill mid-write) are removed."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep, keys = [], set()
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("key"), str) and record["key"] not in keys:
            keys.add(record["key"])
            keep.append(line)
    if sum(len(line) for line in keep) != len(data):
        log.warning("%s: dropping %d bytes of incomplete output", out, len(data) - sum(len(x) for x in keep))
        write_atomic(out, b"".join(keep))
    return keys


def summarize_row(generation: GenerationService, row: Row, params: GenerationParams) -> dict:
    """The output record of one row: its summary, or its error."""
    record = {"key": row.key, "id": row.id, "summary": None, "finish_reason": None, "usage": None, "error": row.error}
    if row.error is not None:
        return record
    try:
        result = generation.summarize(row.text, params)
    except ServiceError as err:
        return record | {"error": err.message}
    except Exception as err:  # a row must not end the batch; the message is in the output
        log.exception("row %s failed", row.key)
        return record | {"error": f"{type(err).__name__}: {err}"}
    usage = result.final.usage
    return record | {"summary": result.text, "finish_reason": result.final.finish_reason,
                     "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}}


def _append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def summarize(generation: GenerationService, source: Path, out: Path, params: GenerationParams,
              show_progress: bool = True) -> SummaryReport:
    """Summarize every row of `source` not yet in `out`, appending one line per row."""
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    done = finished_keys(out)
    report = SummaryReport(total=count_rows(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with tqdm(total=report.total, unit="row", desc="summarize", disable=not show_progress) as bar:
            for row in read_rows(source):
                if row.key in done:
                    report.skipped += 1
                    bar.update()
                    continue
                record = summarize_row(generation, row, params)
                _append(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                done.add(row.key)
                if record["error"] is None:
                    report.summarized += 1
                else:
                    report.failed += 1
                bar.update()
                bar.set_postfix(failed=report.failed)
    finally:
        os.close(fd)
    return report
