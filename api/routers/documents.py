"""/v1/documents: upload (JSON text or a file), list, status, delete, and questions about one document."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.auth import require_api_key
from api.dependencies import DocumentsDep, GenerationDep
from api.errors import InvalidParam, PayloadTooLarge, ServiceError
from api.http_errors import error_body, service_error_body
from api.schemas import (
    AskDelta,
    AskRequest,
    AskResponse,
    DocumentCreate,
    DocumentDeleted,
    DocumentList,
    DocumentOut,
    new_id,
    stop_tuple,
)
from api.service import Generation
from api.streaming import cancel_on_disconnect, sse, sse_response

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/documents", tags=["documents"], dependencies=[Depends(require_api_key)])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DocumentCreate.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}, "name": {"type": "string"}},
            }},
        },
    }
}


@router.post("", status_code=201, openapi_extra=UPLOAD_BODY)
async def create_document(request: Request, documents: DocumentsDep) -> DocumentOut:
    """Store a document and start ingesting it; poll `GET /v1/documents/{id}` for its progress."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InvalidParam("file", "send the document as a multipart file field named 'file'")
            if upload.size is not None and upload.size > documents.limits.max_document_bytes:
                raise PayloadTooLarge(f"the file is {upload.size} bytes; the limit is "
                                      f"{documents.limits.max_document_bytes}", "file")
            data = await upload.read()
            name = form.get("name")
            name = name if isinstance(name, str) and name else upload.filename
        record = await run_in_threadpool(documents.create_from_bytes, data, name)
    elif content_type == "application/json":
        try:
            body = DocumentCreate.model_validate_json(await request.body())
        except ValidationError as err:
            raise RequestValidationError(err.errors(include_url=False, include_input=False)) from None
        record = await run_in_threadpool(documents.create, body.text, body.name)
    else:
        raise HTTPException(415, f"send application/json or multipart/form-data, not {content_type}")
    return DocumentOut.from_record(record)


@router.get("")
def list_documents(documents: DocumentsDep) -> DocumentList:
    return DocumentList(data=[DocumentOut.from_record(r) for r in documents.list()])


@router.get("/{document_id}")
def get_document(document_id: str, documents: DocumentsDep) -> DocumentOut:
    return DocumentOut.from_record(documents.get(document_id))


@router.delete("/{document_id}")
def delete_document(document_id: str, documents: DocumentsDep) -> DocumentDeleted:
    documents.delete(document_id)
    return DocumentDeleted(id=document_id)


@router.post("/{document_id}/ask", response_model=AskResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the answer, or SSE events `delta` ({text}) then `answer` "
                                             "(the whole AskResponse) when stream is true"}})
async def ask(document_id: str, body: AskRequest, request: Request, generation: GenerationDep):
    """Answer a question about a ready document, with citations and speculation stats."""
    params = generation.params(body.max_tokens, body.temperature, body.top_p, body.top_k, body.seed,
                               stop_tuple(body.stop))
    cancel = threading.Event()
    answer_id = new_id("ask")
    async with cancel_on_disconnect(request, cancel):
        started = await generation.ask(document_id, body.question, params, cancel)
        result = None if body.stream else await started.result()
    if result is None:
        return sse_response(_ask_events(started, answer_id, document_id, generation.model_name), cancel)
    return AskResponse.build(answer_id, document_id, generation.model_name, result.text, result.final)


async def _ask_events(started: Generation, answer_id: str, document_id: str,
                      model: str) -> AsyncIterator[bytes]:
    texts = []
    try:
        async for piece in started:
            if piece.text:
                texts.append(piece.text)
                yield sse(AskDelta(text=piece.text), event="delta")
            if piece.final is not None:
                answer = AskResponse.build(answer_id, document_id, model, "".join(texts), piece.final)
                yield sse(answer, event="answer")
    except ServiceError as err:
        yield sse(service_error_body(err), event="error")
    except Exception:  # the response has started: report the failure inside the stream
        log.exception("streamed answer %s failed", answer_id)
        yield sse(error_body(500, "the generation failed; see the server log"), event="error")
