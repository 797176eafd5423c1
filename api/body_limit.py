"""ASGI middleware refusing request bodies over a size limit with 413, before they are read whole.

A declared Content-Length over the limit is answered at once; a chunked body is counted as it
arrives and the read that crosses the limit raises (FastAPI turns it into the 413 answer).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.http_errors import error_body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> str:
        size_text = f"{size} bytes" if size is not None else f"over {self.max_bytes} bytes"
        return f"the request body is {size_text}; the limit is {self.max_bytes}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                body = error_body(400, "Content-Length is not a number")
                await JSONResponse(body, 400)(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                body = error_body(413, self._too_large(int(declared)))
                await JSONResponse(body, 413, headers={"Connection": "close"})(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large(None))
            return message

        await self.app(scope, limited_receive, send)
