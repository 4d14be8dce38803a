"""Pydantic models of OpenAI's Files and Batch APIs, as the official ``openai`` package reads them."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BATCH_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
"""The routes a batch may run, as its ``endpoint`` and every line's ``url`` name them."""


class FilePurpose(str, enum.Enum):
    """What a file is for: uploads are ``batch``; the gateway writes ``batch_output``."""

    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"


class FileObject(BaseModel):
    """``/v1/files`` entries."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class FileDeleted(BaseModel):
    """The answer to ``DELETE /v1/files/{id}``."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchStatus(str, enum.Enum):
    """Where a batch stands, as OpenAI names it."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
"""Statuses after which a batch never changes."""


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: Literal["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: Any = None


class BatchError(BaseModel):
    """One reason a batch failed as a whole; ``line`` is 1-based, as OpenAI counts."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    """``errors`` of a failed batch."""

    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    """``request_counts``: lines in all, lines answered with 200, lines that ended in the error file."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    """The batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = BatchStatus.VALIDATING
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    metadata: dict[str, str] | None = None


class BatchRecord(Batch):
    """A batch as Redis keeps it: the object, plus how far its holder got (never shown to clients)."""

    lines: int = 0
    """Valid lines stored for submission (``…:lines``)."""
    cursor: int = 0
    """Lines of ``…:lines`` submitted so far."""

    def public(self) -> Batch:
        """The object clients see."""
        return Batch.model_validate(self.model_dump(exclude={"lines", "cursor"}))


class ListPage(BaseModel):
    """A cursor page (``/v1/files``, ``/v1/batches``)."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
