"""``FleetClient``: submit jobs to the fleet and read their results.

    client = FleetClient.from_env()
    job = client.submit(task="text-classification", model="distilbert/...", inputs=["great!", "awful"])
    print(job.result(timeout=30))
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any, Iterator

import redis as redis_lib
from kombu.exceptions import OperationalError

from producers.celery_app import make_celery
from producers.codec import encode_input
from producers.construction import ConstructionRequest
from producers.constants import (CANCEL_KEY_PREFIX, DEFAULT_BROKER_URL, DEFAULT_PRIORITY, DEFAULT_RESULT_BACKEND,
                                 INFER_TASK, JOB_KEY_PREFIX)
from producers.discovery import DeploymentCache
from producers.errors import FleetUnavailable, InvalidInput, InvalidParams, PayloadTooLarge
from producers.job import Job
from producers.payloads import store_payload
from producers.schemas import DeploymentInfo, JobSpec

logger = logging.getLogger(__name__)

MAX_PRIORITY = 9
"""Priorities run from 0 (most urgent) to 9, as in Celery's Redis transport."""


def is_single_input(inputs: Any, task: str) -> bool:
    """True when ``inputs`` is one input (as ``pipe(x)``), False for a list of inputs."""
    if isinstance(inputs, (list, tuple)):
        # A chat ([{"role": ..., "content": ...}, ...]) is one text-generation input.
        return bool(inputs) and all(isinstance(m, dict) and "role" in m for m in inputs) and \
            task in ("text-generation", "image-text-to-text")
    return True


def _json_size(value: Any, what: str) -> int:
    try:
        return len(json.dumps(value, allow_nan=False))
    except ValueError as error:
        raise InvalidParams(f"{what} must not contain NaN or infinity") from error
    except TypeError as error:
        raise InvalidInput(f"{what} is not JSON-serialisable: {error}") from error


def _spec_summary(spec: JobSpec, n_inputs: int) -> str:
    """A short, readable description of a job for Flower: never the whole payload."""
    if isinstance(spec.inputs, list):
        first = json.dumps(spec.inputs[0])[:80] if spec.inputs else ""
        inputs = f"{n_inputs} input(s), first: {first}"
    else:
        inputs = f"payload {spec.inputs.key}[{spec.inputs.start}:{spec.inputs.stop}]"
    return (f"{{'deployment': {spec.deployment!r}, 'inputs': {inputs!r}, "
            f"'params': {json.dumps(spec.params)[:200]}}}")


def _is_uuid4(value: Any) -> bool:
    try:
        return isinstance(value, str) and uuid.UUID(value).version == 4
    except ValueError:
        return False


class FleetClient:
    """Submits jobs to deployments that live workers advertise, and tracks them."""

    def __init__(self, broker_url: str = DEFAULT_BROKER_URL, result_backend: str = DEFAULT_RESULT_BACKEND, *,
                 result_ttl_s: int = 86_400, visibility_timeout_s: int = 3600, discovery_ttl_s: float = 2.0) -> None:
        self.broker_url = broker_url
        self.result_backend = result_backend
        self.celery = make_celery("pipefleet-client", broker_url=broker_url, result_backend=result_backend,
                                  result_ttl_s=result_ttl_s, visibility_timeout_s=visibility_timeout_s)
        self.celery.conf.task_publish_retry_policy = {
            "max_retries": 20, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}
        self.redis = redis_lib.Redis.from_url(broker_url, socket_connect_timeout=5, health_check_interval=30)
        self._aredis: Any = None
        self._access_checked = False
        self._async_results: tuple[Any, Any, Any] | None = None
        self._deployments = DeploymentCache(self.redis, discovery_ttl_s)

    @classmethod
    def from_env(cls, **overrides: Any) -> "FleetClient":
        """A client for ``PIPEFLEET_BROKER_URL`` / ``PIPEFLEET_RESULT_BACKEND`` (or the defaults)."""
        settings: dict[str, Any] = {
            "broker_url": os.environ.get("PIPEFLEET_BROKER_URL", DEFAULT_BROKER_URL),
            "result_backend": os.environ.get("PIPEFLEET_RESULT_BACKEND", DEFAULT_RESULT_BACKEND),
        }
        if "PIPEFLEET_VISIBILITY_TIMEOUT_S" in os.environ:
            settings["visibility_timeout_s"] = int(os.environ["PIPEFLEET_VISIBILITY_TIMEOUT_S"])
        settings.update(overrides)
        return cls(**settings)

    @property
    def aredis(self) -> Any:
        """An asyncio Redis client on the broker (for async event streams), one per running event loop."""
        import redis.asyncio as aredis_lib

        loop = asyncio.get_running_loop()
        # Connections of redis.asyncio belong to the loop that opened them.
        if self._aredis is None or self._aredis[0] is not loop:
            self._aredis = (loop, aredis_lib.Redis.from_url(self.broker_url, socket_connect_timeout=5))
        return self._aredis[1]

    def close(self) -> None:
        """Release connections."""
        self.redis.close()
        self.celery.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _redis_call(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except redis_lib.AuthenticationError as error:
            raise FleetUnavailable(f"Redis at {self._safe_url()} refused the credentials: {error}") from error
        except redis_lib.ResponseError as error:
            if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
                raise FleetUnavailable(f"Redis at {self._safe_url()} needs a password: {error}") from error
            raise
        except (redis_lib.ConnectionError, redis_lib.TimeoutError, OperationalError) as error:
            raise FleetUnavailable(f"cannot reach Redis at {self._safe_url()}: {error}") from error

    def _check_access(self) -> None:
        """Raise FleetUnavailable if Redis refuses our credentials; an outage is left to the retries.

        Celery retries result-backend errors (so waits survive a Redis restart), and redis-py counts a
        refused password as a connection error, so without this check a wrong password would be
        retried for minutes instead of reported. Once Redis has accepted us, the check is skipped:
        it would cost a round trip per job.
        """
        if self._access_checked:
            return
        try:
            self._redis_call(self.redis.ping)
        except FleetUnavailable as error:
            if isinstance(error.__cause__, (redis_lib.AuthenticationError, redis_lib.ResponseError)):
                raise
            return
        self._access_checked = True

    def _safe_url(self) -> str:
        url = self.broker_url
        if "@" in url:
            scheme, _, rest = url.partition("://")
            url = f"{scheme}://***@{rest.rpartition('@')[2]}"
        return url

    def deployments(self) -> list[DeploymentInfo]:
        """Live deployments, as workers advertise them right now."""
        return self._redis_call(self._deployments.get, fresh=True)

    def resolve(self, *, task: str | None = None, model: str | None = None, deployment: str | None = None,
                revision: str | None = None, construction: ConstructionRequest | None = None) -> DeploymentInfo:
        """The live deployment a request names (with ``construction``: built that way); raises UnknownDeployment."""
        return self._redis_call(self._deployments.match, task=task, model=model, deployment=deployment,
                                revision=revision, construction=construction)

    def submit(self, task: str | None = None, model: str | None = None, inputs: Any = None,
               params: dict[str, Any] | None = None, *, deployment: str | None = None, revision: str | None = None,
               priority: int | None = None, timeout_s: float | None = None, chunk_size: int | None = None,
               partial: bool = False, job_id: str | None = None) -> Job:
        """Validate and enqueue one job; returns its :class:`Job` at once.

        ``inputs`` is one input or a list of inputs, as for ``pipe(inputs)``.
        ``priority`` runs from 0 (most urgent) to 9; ``timeout_s`` is a deadline
        after which the job fails with JobTimeout. A list longer than
        ``chunk_size`` (or the deployment's default) runs as a chord of chunks.
        """
        info = self.resolve(task=task, model=model, deployment=deployment, revision=revision)
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
        _json_size(params, "params")
        size = _json_size(encoded, "inputs")
        if info.max_payload_bytes is not None and size > info.max_payload_bytes:
            raise PayloadTooLarge(f"the job's inputs are {size} bytes; deployment {info.name!r} accepts at most "
                                  f"{info.max_payload_bytes}")
        if priority is not None and not (isinstance(priority, int) and 0 <= priority <= MAX_PRIORITY):
            raise InvalidParams(f"priority must be an integer from 0 (most urgent) to {MAX_PRIORITY}")
        if job_id is not None and not _is_uuid4(job_id):
            raise InvalidParams("job_id must be a random UUID4 string: results are readable by anyone who "
                                "knows the id, so it must be unguessable")
        job_id = job_id or str(uuid.uuid4())
        deadline_ts = time.time() + timeout_s if timeout_s is not None else None
        chunk = chunk_size or info.chunk_size
        spec = JobSpec(deployment=info.name, inputs=encoded, params=params, single=single, job_id=job_id,
                       partial=partial, deadline_ts=deadline_ts, model=model, revision=revision)
        from producers.chunking import submit_chunked, submit_split, wants_split

        if wants_split(info.task, params, single=single):
            return self._redis_call(submit_split, self, info, spec, priority=priority, payload_bytes=size)
        if not single and chunk is not None and len(encoded) > chunk:

            return self._redis_call(submit_chunked, self, info, spec, chunk_size=chunk, priority=priority,
                                    payload_bytes=size)
        if info.claim_check_bytes is not None and size > info.claim_check_bytes:
            spec.inputs = self._redis_call(store_payload, self.redis, encoded, ttl_s=info.payload_ttl_s)
        sent = self._send(info, spec, job_id=job_id, priority=priority, deadline_ts=deadline_ts,
                          n_inputs=len(encoded))
        return Job(self, job_id, total=len(encoded), chunked=False, async_result=sent)

    def _send(self, info: DeploymentInfo, spec: JobSpec, *, job_id: str, priority: int | None,
              deadline_ts: float | None, n_inputs: int) -> Any:
        options: dict[str, Any] = {
            "queue": info.queue,
            "task_id": job_id,
            "priority": DEFAULT_PRIORITY if priority is None else priority,
            "shadow": f"infer:{info.name}",
            # What Flower shows; written here so Celery need not repr every payload.
            "argsrepr": "()",
            "kwargsrepr": _spec_summary(spec, n_inputs),
        }
        if deadline_ts is not None:
            options["expires"] = deadline_ts - time.time()
        return self._redis_call(self.celery.send_task, INFER_TASK,
                                kwargs={"spec": spec.model_dump(exclude_defaults=True)}, **options)

    def map(self, iterable: Any, task: str | None = None, model: str | None = None, *, deployment: str | None = None,
            params: dict[str, Any] | None = None, chunk_size: int | None = None, max_in_flight: int = 4,
            progress: bool = False, timeout_s: float | None = None, column: str | None = None,
            revision: str | None = None, priority: int | None = None) -> Iterator[Any]:
        """Stream ``iterable`` through a deployment; yields one output per input, in input order.

        Inputs are sent in jobs of ``chunk_size`` (default 64) with at most
        ``max_in_flight`` jobs outstanding, so a generator of any length never
        sits in memory or in Redis at once. ``iterable`` may be a list, a
        generator, or a ``datasets.Dataset`` (pass ``column=``, or a KeyDataset).
        ``progress=True`` shows a tqdm bar; ``timeout_s`` bounds each chunk's wait.
        """
        from producers.streaming import stream

        return stream(self, iterable, task=task, model=model, deployment=deployment, revision=revision,
                      params=params, chunk_size=chunk_size, max_in_flight=max_in_flight, progress=progress,
                      timeout_s=timeout_s, column=column, priority=priority)

    def job(self, job_id: str) -> Job:
        """Reattach to a job by id (from any process)."""
        return Job(self, job_id)

    def _cancel(self, job_id: str) -> None:
        record_raw = self._redis_call(self.redis.get, f"{JOB_KEY_PREFIX}{job_id}")
        ids = [job_id]
        if record_raw:
            ids += json.loads(record_raw).get("chunk_ids", [])
        self._redis_call(self.redis.set, f"{CANCEL_KEY_PREFIX}{job_id}", "1", ex=86_400)
        self.celery.control.revoke(ids)
        backend = self.celery.backend
        from celery.exceptions import TaskRevokedError

        for task_id in ids:
            if backend.get_task_meta(task_id).get("status") not in ("SUCCESS", "FAILURE", "REVOKED"):
                backend.store_result(task_id, TaskRevokedError("cancelled by the client"), "REVOKED")

    async def asubmit(self, *args: Any, **kwargs: Any) -> Job:
        """Async :meth:`submit` for asyncio backends (FastAPI and friends)."""
        from producers.waiting import without_result_subscription

        def submit() -> Job:
            # Its result is awaited by Job.aresult, which listens on its own connection.
            with without_result_subscription(self.celery):
                return self.submit(*args, **kwargs)

        return await asyncio.to_thread(submit)

    async def adeployments(self) -> list[DeploymentInfo]:
        """Async :meth:`deployments`."""
        return await asyncio.to_thread(self.deployments)

    def async_results(self) -> tuple[Any, Any]:
        """``(redis, listener)`` on the result backend for this event loop: asyncio Redis and the
        :class:`~producers.waiting.ResultListener` every ``aresult`` wait shares (made on first use)."""
        from producers.waiting import ResultListener, async_redis_for

        loop = asyncio.get_running_loop()
        if self._async_results is None or self._async_results[0] is not loop:
            redis = async_redis_for(self.result_backend)
            self._async_results = (loop, redis, ResultListener(redis))
        return self._async_results[1], self._async_results[2]

    async def aclose(self) -> None:
        """Release connections, the asyncio ones included."""
        if self._async_results is not None:
            await self._async_results[2].aclose()
        for held in (self._async_results, self._aredis):
            if held is not None:
                await held[1].aclose()
        self._async_results = self._aredis = None
        await asyncio.to_thread(self.close)
