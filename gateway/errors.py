"""How pipefleet's error tree, and the gateway's own refusals, become HTTP responses.

Two faces, one table of status codes. The jobs API answers
``{"error": "<ErrorClass>", "message": "..."}``; the OpenAI-compatible routes
answer OpenAI's ``{"error": {"message", "type", "param", "code"}}``, where
``code`` is the pipefleet error class.
"""

from __future__ import annotations

from typing import Any

from producers.errors import (FleetUnavailable, InvalidInput, InvalidParams, JobCancelled, JobError, JobRejected,
                              JobTimeout, MediaError, PayloadTooLarge, PipefleetError, UnknownDeployment)

#: Most specific first: the first class an error is an instance of gives its status.
STATUS_BY_ERROR: tuple[tuple[type[PipefleetError], int], ...] = (
    (UnknownDeployment, 404),
    (PayloadTooLarge, 413),
    (InvalidInput, 422),
    (InvalidParams, 422),
    (MediaError, 422),
    (JobRejected, 422),
    (JobTimeout, 504),
    (FleetUnavailable, 503),
    (JobCancelled, 409),
    (JobError, 500),
    (PipefleetError, 500),
)

#: The OpenAI-compatible face answers a refused request with 400, as OpenAI and its SDKs expect.
OPENAI_STATUS_OVERRIDES = {422: 400}

_JOBS_PATHS = ("/v1/jobs", "/v1/deployments")


class ApiError(Exception):
    """A refusal of the gateway itself (bad key, unsupported field), with its HTTP status."""

    def __init__(self, status: int, error_type: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.param = param


def is_openai_path(path: str) -> bool:
    """True for the OpenAI-compatible routes (their errors take OpenAI's shape)."""
    return path.startswith("/v1/") and not path.startswith(_JOBS_PATHS)


def status_for(error: PipefleetError) -> int:
    """The HTTP status of a pipefleet error."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return status
    return 500


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_response_parts(path: str, status: int, error_type: str, message: str,
                         param: str | None = None) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` of an error on ``path``, in the shape of that route's face."""
    if not is_openai_path(path):
        return status, {"error": error_type, "message": message}
    status = OPENAI_STATUS_OVERRIDES.get(status, status)
    return status, {"error": {"message": message, "type": _openai_type(status), "param": param,
                              "code": error_type}}


def describe(error: Exception) -> tuple[int, str, str, str | None]:
    """``(status, error class, message, param)`` of any error a route raised."""
    if isinstance(error, ApiError):
        return error.status, error.error_type, error.message, error.param
    if isinstance(error, PipefleetError):
        return status_for(error), type(error).__name__, str(error), None
    return 500, "JobError", f"internal error: {type(error).__name__}", None
