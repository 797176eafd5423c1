"""What the service layer raises; `api.main` maps each to one HTTP status, the CLI prints the message."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client caused or can act on. `status` is the HTTP status it maps to."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParam(ServiceError):
    """A request field is out of range or unusable; `param` names the field."""

    status = 422

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}", param)


class NotFound(ServiceError):
    status = 404
    kind = "not_found_error"


class NotReady(ServiceError):
    """The document exists but cannot answer yet (still ingesting) or any more (failed)."""

    status = 409
    kind = "conflict_error"


class PayloadTooLarge(ServiceError):
    status = 413


class QueueFull(ServiceError):
    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GenerationTimeout(ServiceError):
    status = 504
    kind = "timeout_error"


class GenerationCancelled(ServiceError):
    """The request was cancelled (its client went away, or the server is shutting down)."""

    status = 503
    kind = "cancelled_error"


class IngestCancelled(Exception):
    """An ingest stopped because its document was deleted or the server is shutting down."""
