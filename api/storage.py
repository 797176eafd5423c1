"""Documents on disk: SQLite metadata plus one folder per document under `data_dir`, written atomically.

    data_dir/metadata.sqlite3        one row per document (status, progress, ingest steps, error)
    data_dir/documents/<id>/text.txt the document, UTF-8
    data_dir/documents/<id>/...      whatever the backend builds at ingest (indexes, datastore, caches)

Crash safety: a file is written to a temporary name, fsynced and renamed; a folder of parts is
built under a temporary name, every file fsynced, then renamed (`publish_dir`). A document row is
inserted only after its text is on disk, and marked `ready` only after the backend returned, i.e.
after all its parts were published. A folder without a row (a crash between the two) is removed
at startup; a row still `queued`/`ingesting` at startup is resumed or failed by `api.jobs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from api.backend import IngestInfo, IngestStep

TEXT_FILE = "text.txt"
SCHEMA_VERSION = 1
DOCUMENT_ID = re.compile(r"^doc-[0-9a-f]{24}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    num_bytes INTEGER NOT NULL,
    num_chars INTEGER NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    info TEXT
)
"""


class DocumentStatus(StrEnum):
    QUEUED = "queued"
    INGESTING = "ingesting"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class DocumentRecord:
    id: str
    name: str
    status: DocumentStatus
    created_at: float
    updated_at: float
    num_bytes: int
    num_chars: int
    stage: str  # the ingest step running now (or the last one)
    progress: float  # fraction of the ingest done, 0..1
    crashes: int  # ingests of this document interrupted by a crash or kill
    error: str | None
    info: IngestInfo | None  # set once ready


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def publish_dir(partial: Path, final: Path) -> None:
    """Make the folder `partial` durable and rename it to `final` (replacing an old `final`)."""
    for file in partial.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)


def info_to_json(info: IngestInfo) -> str:
    return json.dumps(dataclasses.asdict(info))


def info_from_json(raw: str) -> IngestInfo:
    data = json.loads(raw)
    steps = tuple(IngestStep(**step) for step in data.pop("steps"))
    return IngestInfo(steps=steps, **data)


class Storage:
    """Thread-safe: one SQLite connection behind a lock (every statement is short)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.documents_dir = self.data_dir / "documents"
        self.documents_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data_dir / "metadata.sqlite3", check_same_thread=False,
                                   isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{self.data_dir}: metadata schema version {version}; this code reads "
                                   f"{SCHEMA_VERSION}")
            self._db.execute(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def document_dir(self, doc_id: str) -> Path:
        if not DOCUMENT_ID.match(doc_id):
            raise ValueError(f"not a document id: {doc_id!r}")
        return self.documents_dir / doc_id

    def create(self, name: str, text: str) -> DocumentRecord:
        """Store a new document's text, then its row (status queued)."""
        doc_id = f"doc-{uuid.uuid4().hex[:24]}"
        data = text.encode("utf-8")
        folder = self.document_dir(doc_id)
        folder.mkdir()
        fsync_dir(self.documents_dir)
        write_atomic(folder / TEXT_FILE, data)
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO documents (id, name, status, created_at, updated_at, num_bytes, num_chars) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (doc_id, name, DocumentStatus.QUEUED, now, now, len(data), len(text)))
        return self.get(doc_id)

    def read_text(self, doc_id: str) -> str:
        return (self.document_dir(doc_id) / TEXT_FILE).read_text(encoding="utf-8")

    def get(self, doc_id: str) -> DocumentRecord | None:
        if not DOCUMENT_ID.match(doc_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return _record(row) if row is not None else None

    def list(self) -> list[DocumentRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM documents ORDER BY created_at, id").fetchall()
        return [_record(row) for row in rows]

    def count(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM documents GROUP BY status").fetchall()
        return {status.value: 0 for status in DocumentStatus} | {row[0]: row[1] for row in rows}

    def delete(self, doc_id: str) -> bool:
        """Remove the row first (the document disappears at once), then its folder."""
        if not DOCUMENT_ID.match(doc_id):
            return False
        with self._lock:
            deleted = self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount > 0
        if deleted:
            shutil.rmtree(self.document_dir(doc_id), ignore_errors=True)
        return deleted

    def _update(self, doc_id: str, **fields) -> None:
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE documents SET {assignments} WHERE id = ?", (*fields.values(), doc_id))

    def mark_ingesting(self, doc_id: str) -> None:
        self._update(doc_id, status=DocumentStatus.INGESTING, error=None)

    def mark_queued(self, doc_id: str, crashes: int) -> None:
        self._update(doc_id, status=DocumentStatus.QUEUED, crashes=crashes)

    def update_progress(self, doc_id: str, stage: str, progress: float) -> None:
        self._update(doc_id, stage=stage, progress=min(max(progress, 0.0), 1.0))

    def mark_ready(self, doc_id: str, info: IngestInfo) -> None:
        self._update(doc_id, status=DocumentStatus.READY, stage="", progress=1.0, error=None,
                     info=info_to_json(info))

    def mark_failed(self, doc_id: str, error: str) -> None:
        self._update(doc_id, status=DocumentStatus.FAILED, error=error)

    def unfinished(self) -> list[DocumentRecord]:
        """Documents whose ingest had not finished (queued, or interrupted while ingesting)."""
        return [r for r in self.list() if r.status in (DocumentStatus.QUEUED, DocumentStatus.INGESTING)]

    def remove_orphans(self) -> list[str]:
        """Delete folders that have no row (a crash between storing the text and the row, or a delete)."""
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT id FROM documents")}
        removed = []
        for folder in self.documents_dir.iterdir():
            if folder.name in known:
                continue
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
            removed.append(folder.name)
        return removed


def _record(row: sqlite3.Row) -> DocumentRecord:
    return DocumentRecord(
        id=row["id"], name=row["name"], status=DocumentStatus(row["status"]), created_at=row["created_at"],
        updated_at=row["updated_at"], num_bytes=row["num_bytes"], num_chars=row["num_chars"],
        stage=row["stage"], progress=row["progress"], crashes=row["crashes"], error=row["error"],
        info=info_from_json(row["info"]) if row["info"] else None,
    )
