"""A batch input file read line by line, and the lines of its output and error files.

Input lines are OpenAI's: ``{"custom_id", "method": "POST", "url", "body"}``. A
line that is wrong on its own (bad JSON, a URL other than the batch's endpoint,
a body the route refuses) becomes an error-file line, and the batch goes on. A
file wrong as a whole (no lines, too many, a line without a ``custom_id``, a
``custom_id`` used twice) fails the batch, and :class:`FileInvalid` names the line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from gateway.batch_protocol import BatchError
from gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
"""The request body model of each batch endpoint (the online route's own)."""


class FileInvalid(Exception):
    """The input file cannot run as a batch at all; ``errors`` say why, naming lines."""

    def __init__(self, errors: list[BatchError]) -> None:
        super().__init__("; ".join(error.message for error in errors))
        self.errors = errors


@dataclass
class ParsedFile:
    """The valid lines (``{"line", "custom_id", "body"}``) and the error-file lines of the invalid ones."""

    valid: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Lines in the file (blank lines aside)."""
        return len(self.valid) + len(self.errors)


def answer_id(batch_id: str, line: int) -> str:
    """The ``id`` of a line's answer: the same whoever writes it."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}/{line}".encode()).hexdigest()[:32]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def output_line(batch_id: str, line: int, custom_id: str | None, body: Any, request_id: str) -> str:
    """An output-file line: the route's 200 answer."""
    return _dumps({"id": answer_id(batch_id, line), "custom_id": custom_id,
                   "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None})


def response_error_line(batch_id: str, line: int, custom_id: str | None, status: int, body: Any,
                        request_id: str | None) -> str:
    """An error-file line for a request the route answered with an error (``body`` is that error)."""
    return _dumps({"id": answer_id(batch_id, line), "custom_id": custom_id,
                   "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None})


def error_line(batch_id: str, line: int, custom_id: str | None, code: str, message: str) -> str:
    """An error-file line for a line that never ran (invalid, cancelled, expired)."""
    return _dumps({"id": answer_id(batch_id, line), "custom_id": custom_id, "response": None,
                   "error": {"code": code, "message": message}})


def request_for(endpoint: str, body: Any) -> BaseModel:
    """The body as the online route's request model; raises ValueError with the route's complaint."""
    try:
        request = REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in p['loc']) or 'body'}: {p['msg']}"
                             for p in error.errors()[:5])
        raise ValueError(problems) from None
    if getattr(request, "stream", False):
        raise ValueError("stream: a batch line cannot stream; drop 'stream'")
    return request


def parse_file(batch_id: str, content: bytes, endpoint: str, *, max_lines: int) -> ParsedFile:
    """Read every line of an input file; raises FileInvalid when the file as a whole cannot run."""
    parsed = ParsedFile()
    seen: dict[str, int] = {}
    number = 0
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if parsed.total >= max_lines:
            raise FileInvalid([BatchError(code="too_many_lines", line=number, message=(
                f"line {number}: the file has more than {max_lines} requests, the most one batch takes"))])
        try:
            entry = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            parsed.errors[number] = error_line(batch_id, number, None, "invalid_json",
                                               f"line {number} is not valid JSON: {error}")
            continue
        if not isinstance(entry, dict):
            parsed.errors[number] = error_line(batch_id, number, None, "invalid_request",
                                               f"line {number} is not a JSON object")
            continue
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise FileInvalid([BatchError(code="missing_required_parameter", param="custom_id", line=number,
                                          message=f"line {number} has no custom_id (a non-empty string)")])
        if custom_id in seen:
            raise FileInvalid([BatchError(code="duplicate_custom_id", param="custom_id", line=number, message=(
                f"line {number} repeats custom_id {custom_id!r} of line {seen[custom_id]}; each must be unique"))])
        seen[custom_id] = number
        problem = _line_problem(entry, endpoint, number)
        if problem is not None:
            parsed.errors[number] = error_line(batch_id, number, custom_id, *problem)
            continue
        parsed.valid.append({"line": number, "custom_id": custom_id, "body": entry["body"]})
    if parsed.total == 0:
        raise FileInvalid([BatchError(code="empty_file", line=None, message="the input file has no requests")])
    return parsed


def _line_problem(entry: dict[str, Any], endpoint: str, number: int) -> tuple[str, str] | None:
    unknown = sorted(set(entry) - {"custom_id", "method", "url", "body"})
    if unknown:
        return "invalid_request", f"line {number}: unknown field(s) {', '.join(unknown)}"
    if entry.get("method") != "POST":
        return "invalid_method", f"line {number}: method must be \"POST\", not {entry.get('method')!r}"
    if entry.get("url") != endpoint:
        return "invalid_url", (f"line {number}: url {entry.get('url')!r} is not this batch's endpoint "
                               f"{endpoint!r}")
    if not isinstance(entry.get("body"), dict):
        return "invalid_request", f"line {number}: 'body' must be a JSON object"
    try:
        request_for(endpoint, entry["body"])
    except ValueError as error:
        return "invalid_request", f"line {number}: {error}"
    return None
