"""End to end over real HTTP: uvicorn on 127.0.0.1, the official openai client, the tiny model."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from api.local_backend import LocalBackend
from api.main import create_app
from api.settings import Settings

DOCUMENT = "\n\n".join(
    f"Section {i}. The harbour master of Port {name} records {i * 7} ships and a {weather} sky."
    for i, (name, weather) in enumerate([("Alder", "grey"), ("Birch", "clear"), ("Cedar", "stormy"),
                                         ("Dogwood", "pale"), ("Elm", "red")] * 4))


def e2e_settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_tokens_limit=64, default_max_tokens=8, queue_size=32)


def fresh(backend: LocalBackend) -> LocalBackend:
    """A new backend over the same loaded models (nothing cached about documents), as after a restart."""
    return LocalBackend(backend.lm, backend.embedder, backend.config)


def wait_ready(http: httpx.Client, doc_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while (doc := http.get(f"/v1/documents/{doc_id}").json())["status"] not in ("ready", "failed"):
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)
    return doc


def sse_events(lines) -> list[tuple[str | None, str]]:
    events, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((event, line[len("data: "):]))
            event = None
    return events


def test_end_to_end(tmp_path, tiny_backend, Server):
    app = create_app(e2e_settings(tmp_path), fresh(tiny_backend))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        created = http.post("/v1/documents", files={"file": ("ports.txt", DOCUMENT.encode(), "text/plain")})
        assert created.status_code == 201, created.text
        doc_id = created.json()["id"]
        doc = wait_ready(http, doc_id)
        assert doc["status"] == "ready" and doc["num_chunks"] == -(-len(DOCUMENT) // 128)
        steps = [(s["name"], s["status"]) for s in doc["steps"]]
        assert steps[3:] == [("target_prefill", "done"), ("kv_clustering", "done")]

        answer = http.post(f"/v1/documents/{doc_id}/ask", json={"question": "How many ships at Cedar?",
                                                                "max_tokens": 6}).json()
        assert answer["usage"]["completion_tokens"] <= 6 and answer["citations"]
        assert answer["target_context"] == "document" and answer["speculation"]["num_drafts"] > 0
        for citation in answer["citations"]:
            assert DOCUMENT[citation["char_start"]:citation["char_end"]].startswith(citation["snippet"])

        with http.stream("POST", f"/v1/documents/{doc_id}/ask",
                         json={"question": "Which sky?", "max_tokens": 6, "stream": True}) as response:
            events = sse_events(response.iter_lines())
        assert events[-1][0] == "answer"
        streamed = "".join(json.loads(data)["text"] for kind, data in events if kind == "delta")
        assert streamed == json.loads(events[-1][1])["answer"]

        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        assert model == "preset:tiny"
        completion = client.completions.create(model=model, prompt="Port Alder", max_tokens=5, temperature=0)
        assert completion.usage.completion_tokens <= 5 and completion.choices[0].finish_reason in ("stop", "length")
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Which sky?"}],
                                              max_tokens=5, extra_body={"document_id": doc_id})
        assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > len(DOCUMENT)
        assert chat.model_extra["citations"]

        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens <= 5 and chunks[-1].choices == []
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, temperature=0)
        assert text == plain.choices[0].message.content  # greedy: streamed and not streamed agree
        streamed_completion = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="Port Alder", max_tokens=5, temperature=0, stream=True))
        assert streamed_completion == completion.choices[0].text

        with pytest.raises(Exception) as info:
            client.completions.create(model=model, prompt="x", max_tokens=-1)
        assert info.value.status_code == 422 and "max_tokens" in str(info.value)
        with pytest.raises(Exception) as info:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                           extra_body={"document_id": "doc-missing"})
        assert info.value.status_code == 404

        def one(i: int) -> str:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=3)
            return response.choices[0].finish_reason

        with ThreadPoolExecutor(20) as pool:
            reasons = list(pool.map(one, range(20)))
        assert len(reasons) == 20 and set(reasons) <= {"stop", "length"}
        metrics = http.get("/metrics").text
        assert 'vllm:request_success_total{finished_reason="length",model_name="preset:tiny"}' in metrics \
            or 'vllm:request_success_total{finished_reason="stop",model_name="preset:tiny"}' in metrics
        assert "vllm:e2e_request_latency_seconds_bucket" in metrics
        counters = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("vllm:spec_decode_num_") and "per_pos" not in line}
        assert counters["vllm:spec_decode_num_drafts_total"] > 0  # the engine's counters reach /metrics
        assert counters["vllm:spec_decode_num_draft_tokens_total"] >= counters["vllm:spec_decode_num_drafts_total"]

    # a restart (new app, new backend state, same data dir) keeps the ready document and its indexes
    restarted = fresh(tiny_backend)
    with Server(create_app(e2e_settings(tmp_path), restarted)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        listed = http.get("/v1/documents").json()["data"]
        assert [(d["id"], d["status"]) for d in listed] == [(doc_id, "ready")]
        assert [(s["name"], s["status"]) for s in listed[0]["steps"]] == steps  # the KV cache was kept
        again = http.post(f"/v1/documents/{doc_id}/ask", json={"question": "How many ships at Cedar?",
                                                               "max_tokens": 6}).json()
        assert again["answer"] == answer["answer"] and again["citations"] == answer["citations"]
        assert [state.kv is not None for state in restarted._documents.values()] == [True]  # loaded, not redone


def test_client_disconnect_cancels_generation(tmp_path, fake_backend, Server):
    backend = fake_backend(delay_s=0.05)
    settings = Settings(data_dir=tmp_path / "data", max_tokens_limit=1000)
    request = {"model": "fake-model", "prompt": "a", "max_tokens": 200}
    with Server(create_app(settings, backend)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=request | {"stream": True}) as response:
                assert next(response.iter_lines()).startswith("data: ")
            assert backend.cancelled.wait(5), "the streamed generation went on after the client left"
            backend.cancelled.clear()
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=request, timeout=0.5)
            assert backend.cancelled.wait(5), "the generation went on after the client left"
            assert http.get("/healthz").json()["queue_depth"] == 0


@pytest.mark.slow
def test_kill_9_during_ingest_then_restart_resumes(tmp_path):
    """A real server process killed mid-ingest: the document is not ready after the kill, and the
    restarted server resumes it (reusing the finished chunks) to ready."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from api.storage import Storage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2]), "RAPID_DATA_DIR": str(tmp_path / "data"),
                        "RAPID_MODEL": "tiny", "RAPID_DEVICE": "cpu", "RAPID_CHUNK_TOKENS": "64"}
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.main:app_from_env", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return process
            except httpx.TransportError:
                time.sleep(0.2)

    text = "\n".join(f"Line {i}: the archive holds ledger {i * 13 % 997} in box {i % 89}." for i in range(600))
    process = start()
    try:
        doc_id = httpx.post(f"{url}/v1/documents", json={"text": text}, timeout=30).json()["id"]
        deadline = time.monotonic() + 120
        while (doc := httpx.get(f"{url}/v1/documents/{doc_id}").json())["stage"] != "embed":
            assert doc["status"] != "ready" and time.monotonic() < deadline, "ingest finished before the kill"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    storage = Storage(tmp_path / "data")
    record = storage.get(doc_id)
    assert record.status == "ingesting" and not (storage.document_dir(doc_id) / "index").exists()
    storage.close()

    process = start()
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            doc = wait_ready(http, doc_id, timeout_s=300)
            assert doc["status"] == "ready"
            assert [(s["name"], s["status"]) for s in doc["steps"][:3]] == [
                ("chunks", "reused"), ("index", "done"), ("datastore", "done")]
            # ~30K tokens: past the tiny model's window, so no document KV cache, and the answer reads chunks
            assert [s["status"] for s in doc["steps"][3:]] == ["skipped", "skipped"]
            answer = http.post(f"/v1/documents/{doc_id}/ask", json={"question": "ledger in box 7?",
                                                                    "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["citations"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
