"""Pydantic models of the fleet configuration (``config/fleet.toml``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from producers.constants import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, LEASE_TTL_S, WRITE_RETRY_S
from producers.redis_clients import RedisConnectionKeys

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class Limits(BaseModel):
    """Caps on what one job may ask; enforced by the client and again by the worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_inputs_per_job: int = Field(default=100_000, gt=0)
    max_payload_bytes: int = Field(default=64 * 2**20, gt=0)
    max_input_chars: int = Field(default=1_000_000, gt=0)
    max_new_tokens: int = Field(default=2048, gt=0)
    max_num_return_sequences: int = Field(default=16, gt=0)
    max_top_k: int = Field(default=1000, gt=0)
    claim_check_bytes: int = Field(default=256 * 1024, gt=0)
    """Inputs bigger than this are stored once in Redis and referenced (claim check)."""
    payload_ttl_s: int = Field(default=86_400, gt=0)


class MediaSettings(BaseModel):
    """Where image and audio inputs may come from, and how big they may be."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_hosts: list[str] = Field(default_factory=list)
    allow_private_hosts: list[str] = Field(default_factory=list)
    data_root: Path | None = None
    max_bytes: int = Field(default=20 * 2**20, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_audio_seconds: float = Field(default=4 * 3600.0, gt=0)


class FlowerSettings(BaseModel):
    """Flower's address and basic-auth credentials (``user:password`` pairs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = "127.0.0.1"
    port: int = 5555
    basic_auth: list[str] = Field(default_factory=list)


class GatewaySettings(BaseModel):
    """``[gateway]``: the HTTP gateway's keys, CORS origins, request caps and longest wait.

    ``api_keys`` are bearer keys (env ``PIPEFLEET_GATEWAY__API_KEYS='["k1","k2"]'``, or
    ``k1,k2``). Caps left unset take their ``[limits]`` values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int | None = Field(default=None, gt=0)
    """Largest request body; default ``[limits].max_payload_bytes``."""
    max_inputs_per_request: int | None = Field(default=None, gt=0)
    """Most inputs in one request; default ``[limits].max_inputs_per_job``."""
    max_wait_s: float = Field(default=60.0, gt=0)
    """The longest a request may hold its connection (``result?wait=``, non-streamed completions, SSE)."""
    default_max_tokens: int = Field(default=256, gt=0)
    """``max_tokens`` of a chat completion that does not say (completions default to 16, as OpenAI's)."""

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # An environment override is a JSON list or a plain "k1,k2" (NoDecode: pydantic-settings leaves it a string).
        if isinstance(value, str) and value.lstrip().startswith("["):
            return json.loads(value)
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        if any(len(key) < 16 for key in value):
            raise ValueError("each API key must be at least 16 characters")
        return value


class WebhookSettings(BaseModel):
    """``[webhooks]``: how job and batch events are signed, where they may go, and how long they are retried.

    Read by workers and gateways alike: whichever process sees an event first
    queues its delivery in Redis, and any of them delivers it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str | None = None
    """The Standard Webhooks signing secret, ``whsec_`` + base64; None: deliveries are not sent."""
    endpoints: list[str] = Field(default_factory=list)
    """URLs that receive every batch event (``batch.completed``, ``.failed``, ``.cancelled``, ``.expired``)."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts a webhook URL may name (exact, or ``*.example.com``); the hosts of ``endpoints`` are added."""
    allow_private_hosts: list[str] = Field(default_factory=list)
    """Hosts that may resolve to loopback or private addresses (a receiver inside the cluster)."""
    timeout_s: float = Field(default=10.0, gt=0)
    """How long one delivery attempt may take."""
    max_retry_s: float = Field(default=86_400.0, gt=0)
    """How long a failing delivery is retried (exponential backoff) before it is dropped."""
    initial_backoff_s: float = Field(default=5.0, gt=0)
    """The pause after the first failed attempt; each later pause doubles, up to ``max_backoff_s``."""
    max_backoff_s: float = Field(default=3600.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    """How often a process looks for due deliveries and for finished jobs that have a webhook."""

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        import base64
        import binascii

        if value is None:
            return value
        if not value.startswith("whsec_"):
            raise ValueError("must be a Standard Webhooks secret: 'whsec_' followed by base64")
        try:
            if len(base64.b64decode(value[len("whsec_"):], validate=True)) < 16:
                raise ValueError("the secret must hold at least 16 bytes")
        except binascii.Error as error:
            raise ValueError(f"the part after 'whsec_' is not base64: {error}") from None
        return value


class BatchSettings(BaseModel):
    """``[batches]``: limits of the OpenAI Batch API on the gateway (OpenAI's by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_lines: int = Field(default=50_000, gt=0)
    """Lines per input file."""
    max_file_bytes: int = Field(default=200 * 2**20, gt=0)
    """Bytes per uploaded file."""
    file_ttl_s: int = Field(default=30 * 86_400, gt=0)
    """How long uploaded and output files stay in Redis."""
    completion_window_s: float = Field(default=86_400.0, gt=0)
    """What ``completion_window="24h"`` means here: an unfinished batch expires this long after it was created."""
    priority: int = Field(default=9, ge=0, le=9)
    """Priority of batch lines (9, the least urgent: interactive requests overtake them)."""
    max_in_flight: int | None = Field(default=None, gt=0)
    """Lines of one batch queued or running at once; None: the ``max_batch_size`` of the deployment its lines
    run on, so a worker holds at most one batch of batch lines and an online request waits behind at most one
    forward pass of them."""
    poll_interval_s: float = Field(default=0.5, gt=0)
    """How often a gateway advances the batches it holds."""
    lease_s: float = Field(default=10.0, gt=0)
    """How long a gateway's claim on a batch lasts without renewal: a dead gateway's batches move on after it."""


class ContinuousBatchingOptions(BaseModel):
    """Tuning of transformers' continuous batching engine (``ContinuousBatchingConfig``) for one deployment.

    Unset fields keep the engine's own defaults, except the KV cache on the CPU:
    the engine would size it from the machine's free RAM, so a CPU deployment
    gets ``num_blocks = 64`` (64 x ``page_size`` tokens) unless one is given.
    ``do_sample``, ``temperature``, ``top_k`` and ``top_p`` are this deployment's
    defaults for the requests that leave them out (over the pipeline's and the
    model's own); every request samples or decodes greedily on its own, in one
    running batch (docs/sampling.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_tokens: int | None = Field(default=None, gt=0)
    """Tokens one forward step may process (prefill chunks plus decodes)."""
    num_blocks: int | None = Field(default=None, gt=0)
    """KV-cache pages; None lets the engine size them from free device memory (``max_memory_percent``)."""
    page_size: int | None = Field(default=None, ge=4)
    """Tokens per KV-cache page."""
    max_memory_percent: float | None = Field(default=None, gt=0, le=1)
    """Share of free device memory the KV cache may take."""
    max_requests_per_batch: int | None = Field(default=None, gt=0)
    """Requests one step may carry."""
    scheduler: Literal["fifo", "prefill_first"] | None = None
    """The engine's request scheduler."""
    allow_block_sharing: bool | None = None
    """Share KV pages between requests with a common prompt prefix (prefix caching; the engine's default: on)."""
    do_sample: bool | None = None
    """Default of requests that do not say whether to sample (None: the pipeline's and model's default)."""
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    """Seeds the seeds of requests that send none, so a worker's unseeded sampling is reproducible run to run."""


class Deployment(BaseModel):
    """One pipeline (task + model) behind one Celery queue.

    Construction options map one-to-one onto ``transformers.pipeline(...)``:
    ``device``, ``device_map``, ``dtype``, ``batch_size``, ``model_kwargs``
    (a ``quantization_config`` table becomes a ``BitsAndBytesConfig``),
    ``pipeline_kwargs`` and ``trust_remote_code``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    task: str = Field(min_length=1)
    model: str = Field(min_length=1)
    revision: str | None = None
    device: int | Literal["cpu", "cuda", "mps"] | None = None
    device_map: str | dict[str, Any] | None = None
    dtype: str | None = None
    batch_size: int | None = Field(default=None, gt=0)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    pipeline_kwargs: dict[str, Any] = Field(default_factory=dict)
    trust_remote_code: bool = False
    max_batch_size: int = Field(default=32, gt=0, le=4096)
    max_batch_wait_ms: float = Field(default=5.0, ge=0, le=60_000)
    length_aware: bool = True
    max_batch_tokens: int | None = Field(default=None, gt=0)
    chunk_size: int | None = Field(default=None, gt=0)
    allowed_hosts: list[str] = Field(default_factory=list)
    warmup: bool = True
    embedding_pool: Literal["mean", "cls"] = "mean"
    """How the gateway's ``/v1/embeddings`` pools token vectors (feature-extraction)."""
    embedding_normalize: bool = True
    """Whether ``/v1/embeddings`` L2-normalises the pooled vector."""
    continuous_batching: bool = False
    """Run text generation through transformers' continuous batching engine instead of static batches."""
    continuous_batching_options: ContinuousBatchingOptions = Field(default_factory=ContinuousBatchingOptions)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _check_continuous_batching(self) -> "Deployment":
        if self.continuous_batching and self.task != "text-generation":
            raise ValueError(f"continuous_batching = true needs task = \"text-generation\"; deployment "
                             f"{self.name!r} has task {self.task!r}")
        if self.continuous_batching and self.device_map is not None:
            raise ValueError("continuous_batching = true runs on one device: drop device_map")
        return self

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}")
        return value


class FleetConfig(RedisConnectionKeys):
    """The whole fleet: broker, result store, deployments, limits and security.

    Its Sentinel and TLS keys, and ``redis_options()``, come from :class:`RedisConnectionKeys`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    result_ttl_s: int = Field(default=86_400, gt=0)
    visibility_timeout_s: int = Field(default=3600, gt=0)
    """Last-resort bound: kombu's sweep requeues a job whose worker renewed nothing for this long.

    Live workers renew every held job's score with their lease, so this never
    cuts a long job short; dead workers' jobs come back with the lease instead.
    """
    lease_ttl_s: float = Field(default=LEASE_TTL_S, gt=0)
    """A worker's jobs go back to their queues this long after its lease thread last renewed."""
    worker_metrics_port: int | None = None
    task_events: bool = False
    """Send Celery task events from the start; Flower switches them on by itself while it watches."""
    log_json: bool = False
    shutdown_timeout_s: float = Field(default=30.0, gt=0)
    """After SIGTERM, running batches get this long to finish before the worker exits anyway (unstarted jobs
    are handed back at once). Keep it under Kubernetes' ``terminationGracePeriodSeconds``."""
    heartbeat_interval_s: float = Field(default=HEARTBEAT_INTERVAL_S, gt=0)
    """How often a worker refreshes its advertisements."""
    heartbeat_ttl_s: int = Field(default=HEARTBEAT_TTL_S, gt=0)
    """A worker silent this long vanishes from discovery and ``pipefleet fleet``."""
    redis_write_retry_s: float = Field(default=WRITE_RETRY_S, gt=0)
    """How long a worker retries a result or ack write Redis refuses (capped exponential backoff) before it logs
    WriteFailed and leaves the job unacked, held by its lease; keep it well past a Sentinel failover."""
    limits: Limits = Field(default_factory=Limits)
    media: MediaSettings = Field(default_factory=MediaSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    deployments: list[Deployment] = Field(default_factory=list)
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> "FleetConfig":
        names = [d.name for d in self.deployments]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"deployment names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def deployment(self, name: str) -> Deployment:
        """The deployment called ``name``; raises KeyError listing the known ones."""
        for deployment in self.deployments:
            if deployment.name == name:
                return deployment
        raise KeyError(f"no deployment {name!r}; configured: {', '.join(d.name for d in self.deployments)}")
