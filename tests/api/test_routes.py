"""HTTP routing, validation and error answers, on the fake backend (no models)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event, data) pairs of an SSE body."""
    events = []
    for block in text.strip().split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        events.append((event, "\n".join(data)))
    return events


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_health_and_models(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "fake-model" and health["queue_depth"] == 0
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert models["data"][0]["max_model_len"] == 512


def test_document_lifecycle(client, wait):
    created = client.post("/v1/documents", json={"text": "one two three", "name": "numbers"})
    assert created.status_code == 201
    doc = created.json()
    assert doc["name"] == "numbers" and doc["num_bytes"] == 13 and doc["status"] in ("queued", "ingesting", "ready")
    ready = wait(client, doc["id"])
    assert ready["status"] == "ready" and ready["progress"] == 1.0 and ready["num_tokens"] == 3
    assert [s["name"] for s in ready["steps"]] == ["fake_index", "kv_clustering"]
    assert ready["steps"][1]["status"] == "skipped"
    assert [d["id"] for d in client.get("/v1/documents").json()["data"]] == [doc["id"]]
    assert client.delete(f"/v1/documents/{doc['id']}").json() == {"id": doc["id"], "object": "document",
                                                                  "deleted": True}
    assert client.get(f"/v1/documents/{doc['id']}").status_code == 404
    assert client.delete(f"/v1/documents/{doc['id']}").status_code == 404
    assert client.get("/v1/documents").json()["data"] == []


def test_file_upload(client, wait):
    files = {"file": ("notes.txt", "éclair and crème".encode(), "text/plain")}
    response = client.post("/v1/documents", files=files)
    assert response.status_code == 201, response.text
    doc = wait(client, response.json()["id"])
    assert doc["name"] == "notes.txt" and doc["num_chars"] == 16 and doc["status"] == "ready"


def test_failed_ingest_is_reported(settings, fake_backend, wait):
    with TestClient(create_app(settings, fake_backend(fail_ingest=True))) as client:
        doc_id = client.post("/v1/documents", json={"text": "anything"}).json()["id"]
        doc = wait(client, doc_id)
        assert doc["status"] == "failed" and "cannot be ingested" in doc["error"]
        response = client.post(f"/v1/documents/{doc_id}/ask", json={"question": "q"})
        assert response.status_code == 409 and "failed to ingest" in error_of(response)["message"]


def test_ask(client, ready_doc, backend):
    response = client.post(f"/v1/documents/{ready_doc}/ask", json={"question": "what is alpha?", "max_tokens": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "w0 w1 w2 " and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 13, "completion_tokens": 3, "total_tokens": 16}
    assert body["citations"][0]["snippet"] == "the snippet" and body["citations"][0]["char_end"] == 12
    spec = body["speculation"]
    assert spec["num_drafts"] == 1 and spec["num_accepted_tokens"] == 2 and spec["mean_acceptance_length"] == 3.0
    assert spec["accepted_per_position"] == [1, 1]
    assert body["timings"]["total_s"] >= body["timings"]["ttft_s"] >= 0
    assert backend.calls[-1][:3] == ("ask", ready_doc, "what is alpha?")


def test_ask_stream(client, ready_doc):
    response = client.post(f"/v1/documents/{ready_doc}/ask",
                           json={"question": "q", "max_tokens": 3, "stream": True, "stop": ["w2"]})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    deltas = [json.loads(data)["text"] for event, data in events if event == "delta"]
    assert "".join(deltas) == "w0 w1 "
    kind, data = events[-1]
    assert kind == "answer"
    answer = json.loads(data)
    assert answer["answer"] == "w0 w1 " and answer["finish_reason"] == "stop"


def test_ask_default_max_tokens_from_settings(client, ready_doc, backend):
    client.post(f"/v1/documents/{ready_doc}/ask", json={"question": "q"})
    assert backend.calls[-1][3].max_tokens == 8


def test_ask_unknown_and_not_ready(client, backend, wait):
    response = client.post("/v1/documents/doc-000000000000000000000000/ask", json={"question": "q"})
    assert response.status_code == 404 and error_of(response)["param"] == "document_id"
    assert client.post("/v1/documents/../../etc/ask", json={"question": "q"}).status_code == 404
    backend.ingest_gate.clear()
    doc_id = client.post("/v1/documents", json={"text": "slow"}).json()["id"]
    response = client.post(f"/v1/documents/{doc_id}/ask", json={"question": "q"})
    assert response.status_code == 409 and "retry when its status is ready" in error_of(response)["message"]
    backend.ingest_gate.set()
    assert wait(client, doc_id)["status"] == "ready"


@pytest.mark.parametrize("body, field", [
    ({"question": "q", "max_tokens": -1}, "max_tokens"),
    ({"question": "q", "max_tokens": 0}, "max_tokens"),
    ({"question": "q", "max_tokens": 10**30}, "max_tokens"),
    ({"question": "q", "max_tokens": 101}, "max_tokens"),
    ({"question": "q", "temperature": -0.5}, "temperature"),
    ({"question": "q", "top_p": 0}, "top_p"),
    ({"question": ""}, "question"),
    ({}, "question"),
    ({"question": "q", "surprise": 1}, "surprise"),
    ({"question": "\ud800"}, "question"),
])
def test_ask_validation_names_the_field(client, ready_doc, body, field):
    response = client.post(f"/v1/documents/{ready_doc}/ask", content=json.dumps(body),
                           headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_context_overflow_from_the_backend_is_a_422(client, ready_doc):
    response = client.post(f"/v1/documents/{ready_doc}/ask", json={"question": "q " * 500, "max_tokens": 50})
    assert response.status_code == 422 and error_of(response)["param"] == "max_tokens"


def test_bad_bodies(client, settings):
    def post(content: bytes, content_type="application/json", path="/v1/documents"):
        return client.post(path, content=content, headers={"content-type": content_type})

    response = post(b'{"text": ')
    assert response.status_code == 422 and "not valid JSON" in error_of(response)["message"]
    response = post(b'{"text": "\xff\xfe"}')
    assert response.status_code == 422 and "not valid JSON" in error_of(response)["message"]
    response = post(b'{"model": "fake-model", "prompt": "\xff"}', path="/v1/completions")
    assert response.status_code == 400 and "not valid UTF-8" in error_of(response)["message"]
    response = post(b'{"model": "fake-model", "prompt": ', path="/v1/completions")
    assert response.status_code == 422 and "not valid JSON" in error_of(response)["message"]
    response = post(b"[1, 2]")
    assert response.status_code == 422
    response = post(json.dumps({"text": "   "}).encode())
    assert response.status_code == 422 and error_of(response)["param"] == "text"
    response = post(json.dumps({"text": "fine", "name": "n" * 300}).encode())
    assert response.status_code == 422 and error_of(response)["param"] == "name"
    response = post(b"plain text", content_type="text/plain")
    assert response.status_code == 415
    too_big = json.dumps({"text": "x" * (settings.max_document_bytes + 1)}).encode()
    response = post(too_big)
    assert response.status_code == 413 and "limit" in error_of(response)["message"]
    files = {"file": ("big.txt", b"x" * (settings.max_document_bytes + 1), "text/plain")}
    assert client.post("/v1/documents", files=files).status_code == 413
    files = {"file": ("bad.txt", b"ok \xff\xfe not utf-8", "text/plain")}
    response = client.post("/v1/documents", files=files)
    assert response.status_code == 422 and error_of(response)["param"] == "file"
    assert "offset 3" in error_of(response)["message"]
    response = client.post("/v1/documents", files={"other": ("a.txt", b"text", "text/plain")})
    assert response.status_code == 422 and error_of(response)["param"] == "file"
    huge = b"x" * (settings.max_document_bytes + (1 << 20) + 1)
    response = post(huge, path="/v1/completions")
    assert response.status_code == 413
    assert client.get("/v1/documents").json()["data"] == []  # nothing was stored
    assert client.get("/healthz").status_code == 200  # and the server is fine


def test_chunked_body_over_the_limit(client, settings):
    def chunks():
        for _ in range(12):
            yield b"x" * ((settings.max_document_bytes + (1 << 20)) // 10)

    response = client.post("/v1/documents", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_completions(client, backend):
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "a b", "max_tokens": 2})
    body = response.json()
    assert response.status_code == 200, body
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "w0 w1 "
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2
    assert "citations" not in body or body["citations"] is None
    assert backend.calls[-1][2].temperature == 1.0  # OpenAI's default
    default = client.post("/v1/completions", json={"model": "fake-model", "prompt": "a"}).json()
    assert default["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens for completions


def test_completion_with_document(client, ready_doc, backend):
    body = client.post("/v1/completions", json={"model": "fake-model", "prompt": ["a"], "max_tokens": 1,
                                                "document_id": ready_doc}).json()
    assert body["citations"][0]["snippet"] == "cited" and backend.calls[-1][3] == ready_doc
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "a",
                                                     "document_id": "doc-nope"})
    assert response.status_code == 404


def test_completions_stream_with_usage(client):
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "a", "max_tokens": 3,
                                                     "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "w0 w1 w2 "
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_completions(client, backend):
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    body = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": messages,
                                                     "max_completion_tokens": 2, "stop": "w1"}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "w0 "}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = backend.calls[-1][1]
    assert [(m.role, m.content) for m in prompt] == [("system", "be brief"), ("user", "hi there")]


def test_chat_stream(client):
    response = client.post("/v1/chat/completions", json={"model": "fake-model", "max_tokens": 2, "stream": True,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(response.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == "w0 w1 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]


@pytest.mark.parametrize("path, body, status, field", [
    ("/v1/completions", {"model": "other", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": "fake-model", "prompt": "a", "n": 2}, 422, "n"),
    ("/v1/completions", {"model": "fake-model", "prompt": "a", "echo": True}, 422, "echo"),
    ("/v1/completions", {"model": "fake-model", "prompt": ["a", "b"]}, 422, "prompt"),
    ("/v1/completions", {"model": "fake-model", "prompt": "a", "max_tokens": -5}, 422, "max_tokens"),
    ("/v1/completions", {"model": "fake-model", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 422, "stop"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "system", "content": "x"}]}, 422,
     "messages"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}, 422,
     "messages"),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 1000}, 422, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 422, "model"),
])
def test_openai_errors(client, path, body, status, field):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == field


def test_api_keys(settings, backend):
    settings = settings.model_copy(update={"api_keys": ("k1", "k2")})
    with TestClient(create_app(settings, backend)) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/v1/models")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert error_of(response)["type"] == "authentication_error"
        assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/documents", headers={"Authorization": "Basic k1"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_queue_full_is_429_with_retry_after(settings, fake_backend):
    backend = fake_backend()
    backend.gate.clear()  # the worker holds the first request until the gate opens
    settings = settings.model_copy(update={"queue_size": 1})
    request = {"model": "fake-model", "prompt": "a", "max_tokens": 1}
    with TestClient(create_app(settings, backend)) as client:
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=request)))]
        threads[0].start()
        assert backend.started.wait(5)
        threads.append(threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=request))))
        threads[1].start()
        deadline = time.monotonic() + 5
        while client.get("/healthz").json()["queue_depth"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = client.post("/v1/completions", json=request)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert error_of(response)["type"] == "rate_limit_error"
        backend.gate.set()
        for thread in threads:
            thread.join(10)
        assert [r.status_code for r in results] == [200, 200]


def test_metrics(client, ready_doc):
    client.post(f"/v1/documents/{ready_doc}/ask", json={"question": "q", "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'vllm:spec_decode_num_drafts_total{model_name="fake-model"} 1.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="fake-model"} 4.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="fake-model"} 2.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="fake-model",position="1"} 1.0' in text
    assert 'vllm:e2e_request_latency_seconds_count{model_name="fake-model"} 1.0' in text
    assert 'vllm:num_requests_waiting{model_name="fake-model"} 0.0' in text
    assert 'rapid:ingest_jobs_total{model_name="fake-model",outcome="ready"} 1.0' in text


def test_openapi_schema_builds(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/documents/{document_id}/ask" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/v1/documents"]["post"]["requestBody"]["content"]
