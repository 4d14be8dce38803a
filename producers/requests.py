"""What one job asks for, checked once before anything is sent: the same checks for ``submit()`` and ``submit_many()``.

:class:`JobRequest` is the typed form of ``submit()``'s keyword arguments, for
``client.submit_many([...])``; :func:`prepare` turns a request and the live
deployment it names into a :class:`PreparedJob` (its :class:`JobSpec` and how it
is sent), raising the :mod:`producers.errors` a bad request deserves.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from producers.chunking import wants_split
from producers.codec import encode_input
from producers.errors import InvalidInput, InvalidParams, PayloadTooLarge
from producers.schemas import DeploymentInfo, JobSpec

MAX_PRIORITY = 9
"""Priorities run from 0 (most urgent) to 9, as in Celery's Redis transport."""

class JobRequest(BaseModel):
    """One job for :meth:`FleetClient.submit_many`: the keyword arguments of :meth:`FleetClient.submit`.

        client.submit_many([JobRequest(deployment="sst2", inputs=text) for text in texts])

    Plain dicts with the same keys work too. Values are checked by the same
    rules, with the same errors, as ``submit()``'s.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    task: str | None = None
    model: str | None = None
    inputs: Any = None
    params: dict[str, Any] | None = None
    deployment: str | None = None
    revision: str | None = None
    priority: Any = None  # checked by prepare(), so the error is submit()'s own
    timeout_s: float | None = None
    chunk_size: int | None = None
    partial: bool = False
    job_id: Any = None  # likewise
    stream: bool = False
    webhook: str | None = None
    webhook_events: list[str] | None = None


@dataclass
class PreparedJob:
    """A checked job, ready to send: its spec, and whether it goes as one message, a chord or a split."""

    info: DeploymentInfo
    spec: JobSpec
    kind: str  # "plain", "chunked" or "split"
    n_inputs: int
    payload_bytes: int
    priority: int | None
    chunk_size: int | None


def is_single_input(inputs: Any, task: str) -> bool:
    """True when ``inputs`` is one input (as ``pipe(x)``), False for a list of inputs."""
    if isinstance(inputs, (list, tuple)):
        # A chat ([{"role": ..., "content": ...}, ...]) is one text-generation input.
        return bool(inputs) and all(isinstance(m, dict) and "role" in m for m in inputs) and \
            task in ("text-generation", "image-text-to-text")
    return True


def json_size(value: Any, what: str) -> int:
    """Bytes of ``value`` as JSON; NaN, infinity and non-JSON values are refused."""
    try:
        return len(json.dumps(value, allow_nan=False))
    except ValueError as error:
        raise InvalidParams(f"{what} must not contain NaN or infinity") from error
    except TypeError as error:
        raise InvalidInput(f"{what} is not JSON-serialisable: {error}") from error


def is_uuid4(value: Any) -> bool:
    """True for a random UUID4 string (what job ids must be: results are readable by id)."""
    try:
        return isinstance(value, str) and uuid.UUID(value).version == 4
    except ValueError:
        return False


def prepare(info: DeploymentInfo, *, inputs: Any, params: dict[str, Any] | None = None, priority: Any = None,
            timeout_s: float | None = None, chunk_size: int | None = None, partial: bool = False,
            job_id: Any = None, model: str | None = None, revision: str | None = None,
            stream: bool = False) -> PreparedJob:
    """Check one job against the deployment ``info`` and build its spec; raises JobRejected subclasses."""
    if inputs is None:
        raise InvalidInput("submit() needs inputs")
    single = is_single_input(inputs, info.task)
    items = [inputs] if single else list(inputs)
    if not items:
        raise InvalidInput("inputs is an empty list")
    if info.max_inputs_per_job is not None and len(items) > info.max_inputs_per_job:
        raise PayloadTooLarge(f"the job has {len(items)} inputs; deployment {info.name!r} accepts at most "
                              f"{info.max_inputs_per_job} per job")
    try:
        encoded = [encode_input(item) for item in items]
    except (TypeError, ValueError) as error:
        raise InvalidInput(str(error)) from error
    params = dict(params or {})
    if params:
        json_size(params, "params")
    size = json_size(encoded, "inputs")
    if info.max_payload_bytes is not None and size > info.max_payload_bytes:
        raise PayloadTooLarge(f"the job's inputs are {size} bytes; deployment {info.name!r} accepts at most "
                              f"{info.max_payload_bytes}")
    if priority is not None and not (isinstance(priority, int) and 0 <= priority <= MAX_PRIORITY):
        raise InvalidParams(f"priority must be an integer from 0 (most urgent) to {MAX_PRIORITY}")
    if job_id is not None and not is_uuid4(job_id):
        raise InvalidParams("job_id must be a random UUID4 string: results are readable by anyone who "
                            "knows the id, so it must be unguessable")
    deadline_ts = time.time() + timeout_s if timeout_s is not None else None
    spec = JobSpec(deployment=info.name, inputs=encoded, params=params, single=single,
                   job_id=job_id or str(uuid.uuid4()), partial=partial, deadline_ts=deadline_ts, model=model,
                   revision=revision, stream=stream)
    chunk = chunk_size or info.chunk_size
    if wants_split(info.task, params, single=single):
        kind = "split"
    elif not single and chunk is not None and len(encoded) > chunk:
        kind = "chunked"
    else:
        kind = "plain"
    return PreparedJob(info=info, spec=spec, kind=kind, n_inputs=len(encoded), payload_bytes=size,
                       priority=priority, chunk_size=chunk)
