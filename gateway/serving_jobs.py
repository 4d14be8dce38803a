"""The jobs API: the HTTP twin of ``FleetClient`` (submit, status, result with a wait, cancel, events).

Bodies are JSON; a job's result is its outputs as the fleet stores them
(plain JSON, with arrays as ``{"__ndarray__": [...], "dtype": ...}``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any, AsyncIterator

from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import ServerSentEvent

from gateway.state import GatewayState
from producers.codec import encode_output
from producers.errors import InvalidInput, InvalidParams, JobTimeout, PayloadTooLarge, PipefleetError
from producers.job import Job
from producers.schemas import JobState, JobStatus
from producers.webhook_delivery import DeliveryPolicy

logger = logging.getLogger(__name__)

UNFINISHED = (JobState.PENDING, JobState.RUNNING)
"""States in which ``/result`` answers 202."""

RECONNECT_MS = 1000
"""The ``retry:`` an events stream suggests to the client for reconnecting after it ends early."""

_STREAM_ID = re.compile(r"^[0-9]{1,20}(-[0-9]{1,20})?$")


class JobRequest(BaseModel):
    """``POST /v1/jobs``: ``{"task", "model"}`` or ``{"deployment"}``, and what ``client.submit`` takes."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = None
    model: str | None = None
    deployment: str | None = None
    revision: str | None = None
    inputs: Any
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(default=None, ge=0, le=9)
    deadline_s: float | None = Field(default=None, gt=0)
    chunk_size: int | None = Field(default=None, gt=0)
    partial: bool = False
    stream: bool = False
    webhook: str | None = None
    """A URL that receives the job's terminal event, signed (``[webhooks]``; see docs/webhooks.md)."""
    webhook_events: list[str] | None = None
    """Which of ``job.succeeded``, ``job.failed``, ``job.cancelled`` to send (default: all three)."""


async def check_webhook(state: GatewayState, url: str) -> None:
    """Refuse a webhook URL now, as a delivery would: webhooks off, host not allowed, private address."""
    settings = state.config.webhooks
    if not settings.secret:
        raise InvalidParams("webhooks are off on this fleet: its config sets no [webhooks] secret")
    await asyncio.to_thread(DeliveryPolicy.from_settings(settings).check, url)


def job_for(state: GatewayState, job_id: str) -> Job:
    """A handle on job ``job_id``; refuses ids that are not UUIDs (InvalidInput, 422)."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise InvalidInput(f"{job_id!r} is not a job id (a UUID)") from None
    return state.client.job(job_id)


def status_body(status: JobStatus) -> dict[str, Any]:
    """``{"id", "state", "done", "total", "error", "error_type", "queued", "live_workers"}`` of a job."""
    return {"id": status.job_id, "state": status.state.value, "done": status.done, "total": status.total,
            "error": status.error, "error_type": status.error_type, "queued": status.queued,
            "live_workers": status.live_workers}


def _count_inputs(inputs: Any) -> int:
    if isinstance(inputs, list) and not all(isinstance(item, dict) and "role" in item for item in inputs):
        return len(inputs)
    return 1


async def submit(state: GatewayState, request: JobRequest, base_url: str) -> dict[str, Any]:
    """Enqueue the job; answers its id and where to follow it."""
    if request.inputs is None:
        raise InvalidInput("'inputs' is required")
    count = _count_inputs(request.inputs)
    if count > state.max_inputs:
        raise PayloadTooLarge(f"the job has {count} inputs; this gateway accepts at most {state.max_inputs}")
    if request.webhook is not None:
        await check_webhook(state, request.webhook)
    job = await state.client.asubmit(task=request.task, model=request.model, deployment=request.deployment,
                                     revision=request.revision, inputs=request.inputs, params=request.params,
                                     priority=request.priority, timeout_s=request.deadline_s,
                                     chunk_size=request.chunk_size, partial=request.partial,
                                     webhook=request.webhook, webhook_events=request.webhook_events, stream=request.stream)
    url = f"{base_url.rstrip('/')}/v1/jobs/{job.id}"
    return {"id": job.id, "state": JobState.PENDING.value, "status_url": url, "result_url": f"{url}/result",
            "events_url": f"{url}/events"}


async def status(state: GatewayState, job_id: str) -> dict[str, Any]:
    """The job's state and progress."""
    return status_body(await job_for(state, job_id).astatus())


async def result(state: GatewayState, job_id: str, wait_s: float | None) -> tuple[int, dict[str, Any]]:
    """``(200, {"id", "state", "result"})`` once done, within ``wait_s``; else ``(202, status)``.

    A failed job raises its error (mapped to its HTTP code).
    """
    job = job_for(state, job_id)
    try:
        output = await job.aresult(timeout=state.clamp_wait(wait_s))
    except JobTimeout:
        current = await job.astatus()
        if current.state in UNFINISHED:
            return 202, status_body(current)
        raise
    return 200, {"id": job.id, "state": JobState.SUCCESS.value, "result": encode_output(output)}


async def cancel(state: GatewayState, job_id: str) -> dict[str, Any]:
    """Cancel the job; answers its status afterwards."""
    job = job_for(state, job_id)
    await job.acancel()
    return status_body(await job.astatus())


async def deployments(state: GatewayState) -> list[dict[str, Any]]:
    """The live deployments, as ``pipefleet deployments`` prints them."""
    return [info.model_dump() for info in await state.client.adeployments()]


async def events(state: GatewayState, job_id: str, last_event_id: str | None) -> AsyncIterator[ServerSentEvent]:
    """The job's events as SSE (``id`` = stream entry id, ``event`` = kind, ``data`` = JSON), after ``last_event_id``.

    The stream ends after the ``done`` or ``error`` event. Past ``max_wait_s``
    it ends early; reconnecting with ``Last-Event-ID`` resumes where it stopped.
    """
    job = job_for(state, job_id)
    if last_event_id is not None and not _STREAM_ID.match(last_event_id):
        raise InvalidInput(f"Last-Event-ID {last_event_id!r} is not an event id of this stream")

    async def generate() -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent(comment="pipefleet job events", retry=RECONNECT_MS)
        try:
            async for event in job.aevents(last_event_id=last_event_id, timeout_s=state.settings.max_wait_s):
                yield ServerSentEvent(id=event.id, event=event.kind.value,
                                      data=json.dumps(event.data, separators=(",", ":")))
        except JobTimeout:
            return  # max_wait_s passed; the client resumes with Last-Event-ID
        except PipefleetError as error:
            logger.warning("events of job %s ended early: %s: %s", job_id, type(error).__name__, error)

    return generate()
