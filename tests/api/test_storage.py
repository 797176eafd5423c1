"""Documents on disk: SQLite rows, atomic files, and what a restart or a crash leaves behind."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from api.backend import IngestInfo, IngestStep
from api.main import create_app
from api.storage import DocumentStatus, Storage, publish_dir, write_atomic


def test_rows_and_folders(tmp_path):
    storage = Storage(tmp_path)
    record = storage.create("a", "héllo")
    assert record.status == DocumentStatus.QUEUED and record.num_bytes == 6 and record.num_chars == 5
    assert storage.read_text(record.id) == "héllo"
    info = IngestInfo(3, 1, (IngestStep("chunks", "done", 0.5), IngestStep("kv", "skipped", detail="later")))
    storage.mark_ready(record.id, info)
    again = Storage(tmp_path).get(record.id)
    assert again.status == DocumentStatus.READY and again.info == info and again.progress == 1.0
    assert storage.count() == {"queued": 0, "ingesting": 0, "ready": 1, "failed": 0}
    assert storage.get("../etc") is None and storage.get("doc-" + "0" * 24) is None
    with pytest.raises(ValueError):
        storage.document_dir("../../etc")
    assert storage.delete(record.id) and not storage.document_dir(record.id).exists()
    assert not storage.delete(record.id)


def test_orphan_folders_are_removed(tmp_path):
    storage = Storage(tmp_path)
    kept = storage.create("a", "text")
    orphan = storage.documents_dir / "doc-0123456789abcdef01234567"
    orphan.mkdir()
    (orphan / "text.txt").write_text("half stored")
    assert storage.remove_orphans() == [orphan.name]
    assert not orphan.exists() and storage.document_dir(kept.id).exists()


def test_write_atomic_and_publish_dir(tmp_path):
    target = tmp_path / "f.txt"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    partial, final = tmp_path / "part.partial", tmp_path / "part"
    for content in ("old", "new"):
        partial.mkdir()
        (partial / "x").write_text(content)
        publish_dir(partial, final)
    assert (final / "x").read_text() == "new" and not partial.exists()


def test_restart_keeps_documents(settings, backend, wait):
    with TestClient(create_app(settings, backend)) as client:
        doc_id = client.post("/v1/documents", json={"text": "kept across restarts"}).json()["id"]
        assert wait(client, doc_id)["status"] == "ready"
    with TestClient(create_app(settings, backend)) as client:
        doc = client.get(f"/v1/documents/{doc_id}").json()
        assert doc["status"] == "ready" and doc["num_tokens"] == 3
        assert client.post(f"/v1/documents/{doc_id}/ask", json={"question": "q"}).status_code == 200


def test_interrupted_ingest_resumes(settings, backend, wait):
    """A row left `ingesting` by a crash is resumed at startup and counted as one crash."""
    storage = Storage(settings.data_dir)
    record = storage.create("crashed", "left behind mid ingest")
    storage.mark_ingesting(record.id)
    (storage.document_dir(record.id) / "index.partial").mkdir()
    storage.close()
    with TestClient(create_app(settings, backend)) as client:
        doc = wait(client, record.id)
        assert doc["status"] == "ready"
    assert Storage(settings.data_dir).get(record.id).crashes == 1


def test_ingest_that_keeps_crashing_is_failed(settings, backend):
    storage = Storage(settings.data_dir)
    record = storage.create("poison", "kills the server every time")
    storage.mark_queued(record.id, crashes=settings.max_ingest_attempts - 1)
    storage.mark_ingesting(record.id)
    storage.close()
    with TestClient(create_app(settings, backend)) as client:
        doc = client.get(f"/v1/documents/{record.id}").json()
        assert doc["status"] == "failed" and "interrupted 3 times" in doc["error"]
        assert client.post(f"/v1/documents/{record.id}/ask", json={"question": "q"}).status_code == 409


def test_shutdown_during_ingest_requeues_without_counting_a_crash(settings, fake_backend, wait):
    backend = fake_backend()
    backend.ingest_gate.clear()
    with TestClient(create_app(settings, backend)) as client:
        doc_id = client.post("/v1/documents", json={"text": "slow to ingest"}).json()["id"]
        assert wait(client, doc_id, statuses=("ingesting",))["status"] == "ingesting"
    record = Storage(settings.data_dir).get(doc_id)
    assert record.status == DocumentStatus.QUEUED and record.crashes == 0
    backend.ingest_gate.set()
    with TestClient(create_app(settings, backend)) as client:
        assert wait(client, doc_id)["status"] == "ready"


def test_delete_during_ingest(settings, fake_backend, wait):
    backend = fake_backend()
    backend.ingest_gate.clear()
    with TestClient(create_app(settings, backend)) as client:
        doc_id = client.post("/v1/documents", json={"text": "deleted while ingesting"}).json()["id"]
        wait(client, doc_id, statuses=("ingesting",))
        assert client.delete(f"/v1/documents/{doc_id}").status_code == 200
        services = client.app.state.services
        deadline = threading.Event()
        while services.jobs.pending and not deadline.wait(0.01):
            pass
        assert client.get(f"/v1/documents/{doc_id}").status_code == 404
        assert not (services.storage.documents_dir / doc_id).exists()
