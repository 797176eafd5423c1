"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming).

A request may name an ingested document with `document_id` (the official client sends it through
`extra_body`); the answer is then grounded in it and carries `citations`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from api.auth import require_api_key
from api.backend import Final
from api.dependencies import GenerationDep, ServicesDep
from api.errors import ServiceError
from api.http_errors import error_body, service_error_body
from api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    citations_out,
    new_id,
    speculation_out,
    stop_tuple,
    timings_out,
    usage_out,
)
from api.service import Generation
from api.streaming import SSE_DONE, cancel_on_disconnect, sse, sse_response

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {}},
                         "description": "the result, or (stream: true) SSE chunks ending in `data: [DONE]`"}}


@router.get("/models")
def list_models(services: ServicesDep) -> ModelList:
    card = ModelCard(id=services.generation.model_name, created=int(services.started_at),
                     max_model_len=services.backend.max_context)
    return ModelList(data=[card])


@router.post("/completions", response_model=Completion, responses=STREAM_RESPONSE)
async def completions(body: CompletionRequest, request: Request, generation: GenerationDep):
    generation.check_model(body.model)
    params = generation.params(body.max_tokens, body.temperature, body.top_p, seed=body.seed,
                               stop=stop_tuple(body.stop))
    cancel = threading.Event()
    completion_id = new_id("cmpl")
    async with cancel_on_disconnect(request, cancel):
        started = await generation.complete(body.prompt_text, params, body.document_id, cancel)
        result = None if body.stream else await started.result()
    if result is None:
        events = _completion_events(started, completion_id, generation.model_name, body.include_usage)
        return sse_response(events, cancel)
    final = result.final
    return Completion(id=completion_id, model=generation.model_name,
                      choices=[CompletionChoice(text=result.text, finish_reason=final.finish_reason)],
                      usage=usage_out(final), **_extras(final), timings=timings_out(final))


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSE)
async def chat_completions(body: ChatCompletionRequest, request: Request, generation: GenerationDep):
    generation.check_model(body.model)
    max_tokens, field = body.token_limit
    params = generation.params(max_tokens, body.temperature, body.top_p, seed=body.seed,
                               stop=stop_tuple(body.stop), max_tokens_field=field)
    messages = [m.to_message() for m in body.messages]
    cancel = threading.Event()
    completion_id = new_id("chatcmpl")
    async with cancel_on_disconnect(request, cancel):
        started = await generation.complete(messages, params, body.document_id, cancel)
        result = None if body.stream else await started.result()
    if result is None:
        events = _chat_events(started, completion_id, generation.model_name, body.include_usage)
        return sse_response(events, cancel)
    final = result.final
    choice = ChatChoice(message=ChatMessageOut(content=result.text), finish_reason=final.finish_reason)
    return ChatCompletion(id=completion_id, model=generation.model_name, choices=[choice],
                          usage=usage_out(final), **_extras(final), timings=timings_out(final))


def _extras(final: Final) -> dict:
    """Our additions to OpenAI's bodies: citations (only for document requests) and speculation stats."""
    return {"citations": citations_out(final.citations) if final.citations else None,
            "speculation": speculation_out(final)}


def _chunk(model: BaseModel, include_usage: bool) -> bytes:
    """An SSE chunk without our unset additions; `usage` is present (null) exactly when asked for."""
    exclude = {name for name in ("citations", "speculation", "timings") if getattr(model, name, None) is None}
    if not include_usage and model.usage is None:
        exclude.add("usage")
    return sse(model, exclude=exclude)


async def _guarded(chunks: AsyncIterator[bytes], request_id: str) -> AsyncIterator[bytes]:
    """The chunks, then `data: [DONE]`; a failure after the response started becomes an error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except ServiceError as err:
        yield sse(service_error_body(err))
    except Exception:
        log.exception("stream %s failed", request_id)
        yield sse(error_body(500, "the generation failed; see the server log"))
    yield SSE_DONE


def _completion_events(started: Generation, completion_id: str, model: str,
                       include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())

    async def chunks() -> AsyncIterator[bytes]:
        async for piece in started:
            final = piece.final
            if piece.text or final is not None:
                reason = final.finish_reason if final is not None else None
                choice = CompletionChoice(text=piece.text, finish_reason=reason)
                extras = _extras(final) if final is not None else {}
                chunk = Completion(id=completion_id, created=created, model=model, choices=[choice], **extras)
                yield _chunk(chunk, include_usage)
            if final is not None and include_usage:
                usage = Completion(id=completion_id, created=created, model=model, choices=[],
                                   usage=usage_out(final))
                yield _chunk(usage, include_usage)

    return _guarded(chunks(), completion_id)


def _chat_events(started: Generation, completion_id: str, model: str,
                 include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: ChatDelta, finish_reason: str | None = None, **fields) -> bytes:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        body = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice], **fields)
        return _chunk(body, include_usage)

    async def chunks() -> AsyncIterator[bytes]:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for piece in started:
            if piece.text:
                yield chunk(ChatDelta(content=piece.text))
            final = piece.final
            if final is not None:
                yield chunk(ChatDelta(), final.finish_reason, **_extras(final))
                if include_usage:
                    usage = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[],
                                                usage=usage_out(final))
                    yield _chunk(usage, include_usage)

    return _guarded(chunks(), completion_id)
