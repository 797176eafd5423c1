"""A small HTTP client of our own API, for the CLI's `--url` mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx


class RemoteError(RuntimeError):
    """The server answered with an error; the message is the server's."""


class RemoteClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, path: Path, name: str | None = None) -> dict:
        with open(path, "rb") as f:
            data = {"name": name} if name else {}
            return self._json(self.http.post("/v1/documents", files={"file": (path.name, f)}, data=data))

    def document(self, doc_id: str) -> dict:
        return self._json(self.http.get(f"/v1/documents/{doc_id}"))

    def ask_events(self, doc_id: str, question: str, max_tokens: int | None,
                   temperature: float) -> Iterator[tuple[str, dict]]:
        """(event, data) of a streamed answer: `delta` events, then `answer` (or `error`)."""
        body = {"question": question, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
        with self.http.stream("POST", f"/v1/documents/{doc_id}/ask", json=body) as response:
            if response.is_error:
                response.read()
                self._json(response)
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    yield event, json.loads(line[len("data: "):])
                    event = "message"

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        if response.is_error:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise RemoteError(f"HTTP {response.status_code}: {message}")
        return response.json()
