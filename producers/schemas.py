"""Typed messages that cross a process boundary: job specs, results, advertisements.

Each model is validated once where it enters a process (the client before it
enqueues, the worker when a message arrives) and travels as plain JSON.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobState(str, enum.Enum):
    """Where a job stands, as ``job.status().state`` reports it."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"


class PayloadRef(BaseModel):
    """A claim check: inputs stored once in Redis, referenced by key and slice."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    start: int = 0
    stop: int | None = None


class JobSpec(BaseModel):
    """What a job asks a deployment to do; the body of every ``infer`` message.

    ``inputs`` is a list of JSON inputs, or a :class:`PayloadRef` to them.
    ``single`` records whether the caller passed one input (not a list), so the
    result has the same shape as the in-process call.
    """

    model_config = ConfigDict(extra="forbid")

    deployment: str = Field(min_length=1, max_length=200)
    inputs: list[Any] | PayloadRef
    params: dict[str, Any] = Field(default_factory=dict)
    single: bool = False
    job_id: str | None = None
    chunk_index: int | None = None
    offset: int = 0
    partial: bool = False
    deadline_ts: float | None = None
    model: str | None = None
    revision: str | None = None
    stream: bool = False
    """Somebody reads this text-generation job's tokens as they come: the worker sends them step by step.

    Without it a continuous batching worker sends the text in one piece when the sequence ends (events and
    ``job.stream()`` still work), and its engine skips the per-step outputs (docs/sampling.md)."""


class ItemError(BaseModel):
    """One item's failure, returned in place when a job asks for partial results."""

    model_config = ConfigDict(extra="forbid")

    error: str
    type: str
    index: int


class ResultEnvelope(BaseModel):
    """What an ``infer`` task returns: outputs in input order, plus provenance."""

    model_config = ConfigDict(extra="forbid")

    outputs: Any
    deployment: str
    worker: str = ""
    n_items: int = 0
    offset: int = 0
    chunk_index: int | None = None
    usage: dict[str, int] | None = None
    """Token counts where the worker knows them exactly (feature-extraction: ``prompt_tokens``)."""


class Construction(BaseModel):
    """How a deployment's pipeline was built: the ``transformers.pipeline(...)`` options a client can match.

    ``dtype`` is the dtype the weights were loaded in and ``auto_dtype`` the one
    ``dtype="auto"`` gives for this checkpoint; ``quantization`` is the model's
    quantization config as a dict (``None``: not quantized). ``None`` elsewhere
    means the worker could not tell.
    """

    model_config = ConfigDict(extra="ignore")

    dtype: str | None = None
    auto_dtype: str | None = None
    quantization: dict[str, Any] | None = None
    device_map: str | dict[str, Any] | None = None
    trust_remote_code: bool = False
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pipeline_class: str | None = None
    batch_size: int | None = None


class DeploymentTerms(BaseModel):
    """What a deployment serves and the limits it accepts jobs under."""

    name: str
    task: str
    model: str
    revision: str | None = None
    queue: str
    max_batch_size: int = 1
    chunk_size: int | None = None
    max_inputs_per_job: int | None = None
    max_payload_bytes: int | None = None
    claim_check_bytes: int | None = None
    payload_ttl_s: int = 86_400
    construction: Construction | None = None
    """``None`` from workers older than construction matching."""


class DeploymentAd(DeploymentTerms):
    """A worker's advertisement of one deployment it serves, refreshed by heartbeat."""

    model_config = ConfigDict(extra="ignore")

    worker: str
    device: str
    pid: int = 0
    in_flight: int = 0
    pending_items: int = 0
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time)


class DeploymentInfo(DeploymentTerms):
    """A live deployment as a client sees it: what it serves and which workers serve it."""

    model_config = ConfigDict(extra="forbid")

    workers: list[str]
    devices: list[str]


class EventKind(str, enum.Enum):
    """What one entry of a job's event stream says."""

    PROGRESS = "progress"
    """``{"done": int, "total": int}``: items finished so far (chunked jobs)."""
    TEXT = "text"
    """``{"text": str, "index": int}``: new text of output sequence ``index``, one generation step's worth."""
    RESTART = "restart"
    """``{"reason": str}``: the job runs again (redelivered after its worker died); text starts over."""
    DONE = "done"
    """``{"state": "SUCCESS", ...}``; text generation adds ``usage`` and ``finish_reasons``. Last event."""
    ERROR = "error"
    """``{"type": str, "message": str}``: the job failed or was cancelled; ``type`` names the error class. Last event."""


FINAL_EVENT_KINDS = frozenset({EventKind.DONE, EventKind.ERROR})
"""Kinds after which a job's event stream has nothing more to say."""


class JobEvent(BaseModel):
    """One entry of a job's event stream; ``id`` is the Redis stream entry id (resume after it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    kind: EventKind
    data: dict[str, Any] = Field(default_factory=dict)


class JobStatus(BaseModel):
    """A snapshot of one job: state, progress counts and the error if it failed."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    state: JobState
    done: int = 0
    total: int = 0
    error: str | None = None
    error_type: str | None = None
