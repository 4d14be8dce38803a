"""Typed messages that cross a process boundary: job specs, results, advertisements.

Each model is validated once where it enters a process (the client before it
enqueues, the worker when a message arrives) and travels as plain JSON.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field


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


class QuantizationSummary(BaseModel):
    """A quantized deployment's config read out: method, bits, quant type and the dtype it computes in.

    bitsandbytes 8-bit (LLM.int8) multiplies int8 by int8, with outlier columns
    in float16, and returns the activations' dtype: ``compute_dtype`` is then
    the deployment's loaded dtype. 4-bit dequantizes nf4 or fp4 weights to
    ``bnb_4bit_compute_dtype`` for each matmul.
    """

    method: str
    bits: int | None = None
    quant_type: str | None = None
    compute_dtype: str | None = None
    double_quant: bool | None = None

    @classmethod
    def of(cls, table: dict[str, Any], model_dtype: str | None) -> "QuantizationSummary":
        """Read a quantization config dict (``BitsAndBytesConfig.to_dict()``) of a model loaded in ``model_dtype``."""
        method = str(table.get("quant_method") or ("bitsandbytes" if table.get("load_in_8bit")
                                                    or table.get("load_in_4bit") else "unknown"))
        if table.get("load_in_8bit"):
            return cls(method=method, bits=8, quant_type="int8", compute_dtype=model_dtype)
        if table.get("load_in_4bit"):
            return cls(method=method, bits=4, quant_type=table.get("bnb_4bit_quant_type"),
                       compute_dtype=table.get("bnb_4bit_compute_dtype"),
                       double_quant=table.get("bnb_4bit_use_double_quant"))
        bits = table.get("bits")
        return cls(method=method, bits=bits if isinstance(bits, int) else None)


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

    @computed_field  # type: ignore[prop-decorator]
    @property
    def quantization_summary(self) -> QuantizationSummary | None:
        """``quantization`` read out (method, bits, quant type, compute dtype); ``None``: not quantized."""
        return None if self.quantization is None else QuantizationSummary.of(self.quantization, self.dtype)


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
    healthy: bool = True
    """False while one of the worker's threads is stalled or dead (``stalled`` names them)."""
    stalled: list[str] = Field(default_factory=list)


class DeploymentRegistration(DeploymentTerms):
    """A deployment known to the fleet whether or not a worker serves it now (``pipefleet:deployments``).

    Workers write it when they start, with their construction facts, and it
    stays after they stop, so jobs queue across a restart or a scale to zero.
    ``pipefleet deployments remove NAME`` deletes it.
    """

    model_config = ConfigDict(extra="ignore")

    registered_at: float = Field(default_factory=time.time)
    registered_by: str = ""
    """The worker that wrote it, or ``config`` for ``pipefleet worker --register-only``."""


class DeploymentInfo(DeploymentTerms):
    """A known deployment as a client sees it: what it serves and which workers serve it now (maybe none)."""

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
    queued: bool = False
    """True while no worker has taken the job yet (state PENDING, not cancelled, deadline not passed)."""
    live_workers: int | None = None
    """Workers serving the job's deployment now, when this handle knows the deployment (0: the job waits)."""
