"""HTTP streaming plumbing: Server-Sent Events and cancelling a generation when its client leaves."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Request
from fastapi.sse import format_sse_event
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: BaseModel | dict, event: str | None = None, exclude: set[str] | None = None) -> bytes:
    """One SSE event whose data is `data` as one line of JSON."""
    if isinstance(data, BaseModel):
        text = data.model_dump_json(exclude=exclude)
    else:
        text = json.dumps(data, separators=(",", ":"))
    return format_sse_event(data_str=text, event=event)


def sse_response(events: AsyncIterator[bytes], cancel: threading.Event) -> StreamingResponse:
    """Stream `events`; `cancel` is set when the stream ends for any reason, a disconnect included
    (Starlette cancels the stream on `http.disconnect`, then runs the background task)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(cancel.set))


@asynccontextmanager
async def cancel_on_disconnect(request: Request, cancel: threading.Event) -> AsyncIterator[None]:
    """While inside, a client disconnect sets `cancel` (for answers that are not streamed)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel.set()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
