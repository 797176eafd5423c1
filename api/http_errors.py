"""Every error leaves the server as OpenAI's error body, `{"error": {message, type, param, code}}`.

Validation errors name the field in `param` and in the message ("max_tokens: Input should be
greater than or equal to 1"); a body that is not UTF-8 says so instead of FastAPI's generic 400.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.errors import QueueFull, ServiceError
from api.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 503: "unavailable_error", 504: "timeout_error"}


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> dict:
    kind = kind or KINDS.get(status, "server_error")
    detail = ErrorDetail(message=message, type=kind, param=param, code=status)
    return ErrorResponse(error=detail).model_dump()


def service_error_body(err: ServiceError) -> dict:
    return error_body(err.status, err.message, err.param, err.kind)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message naming every bad field, and the first field's name."""
    parts, first = [], None
    for error in errors:
        # field names and list indices; not pydantic's tags of union members ("list[str]", "function-after[...]")
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and (isinstance(p, int) or p.isidentifier())]
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", error.get("msg"))
            part = f"the body is not valid JSON ({reason})"
        else:
            first = first or (loc[0] if loc else None)
            part = f"{'.'.join(loc) or 'body'}: {error.get('msg', 'is invalid')}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request", first


async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)} if isinstance(err, QueueFull) else None
    return JSONResponse(service_error_body(err), status_code=err.status, headers=headers)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(err.errors()))
    return JSONResponse(error_body(422, message, param), status_code=422)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    message = str(err.detail)
    if isinstance(err.__cause__, UnicodeDecodeError):
        message = f"the body is not valid UTF-8 (invalid byte at offset {err.__cause__.start})"
    return JSONResponse(error_body(err.status_code, message), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(500, "internal server error; see the server log"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
