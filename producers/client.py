"""``FleetClient``: submit jobs to the fleet and read their results.

    client = FleetClient.from_env()
    job = client.submit(task="text-classification", model="distilbert/...", inputs=["great!", "awful"])
    print(job.result(timeout=30))
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Iterable, Iterator

from pydantic import ValidationError

from producers import chunking, client_map
from producers.celery_app import make_celery, producer_backend_url
from producers.celery_internals import finished_task_meta
from producers.construction import ConstructionRequest
from producers.constants import (CANCEL_KEY_PREFIX, DEFAULT_BROKER_URL, DISCOVERY_TTL_S, DEFAULT_PRIORITY, DEFAULT_RESULT_BACKEND,
                                 INFER_TASK, JOB_KEY_PREFIX)
from producers.discovery import DeploymentCache
from producers.errors import InvalidParams
from producers.job import Job, gather, gather_async
from producers.payloads import store_payload
from producers.publishing import Publisher, TaskMessage
from producers.redis_access import RedisAccess
from producers.redis_clients import RedisOptions, ReplicaWait, async_redis_pool, redis_client
from producers.requests import JobRequest, PreparedJob, prepare
from producers.result_waiter import ResultWaiter
from producers.schemas import DeploymentInfo, JobSpec
from producers.settings import ClientSettings
from producers.webhooks import job_webhook, watch_job

logger = logging.getLogger(__name__)

def _spec_summary(spec: JobSpec, n_inputs: int) -> str:
    """A short, readable description of a job for Flower: never the whole payload."""
    if isinstance(spec.inputs, list):
        first = json.dumps(spec.inputs[0])[:80] if spec.inputs else ""
        inputs = f"{n_inputs} input(s), first: {first}"
    else:
        inputs = f"payload {spec.inputs.key}[{spec.inputs.start}:{spec.inputs.stop}]"
    params = json.dumps(spec.params)[:200] if spec.params else "{}"
    return f"{{'deployment': {spec.deployment!r}, 'inputs': {inputs!r}, 'params': {params}}}"


AREDIS_MAX_CONNECTIONS = 512
"""Connections of one client's asyncio Redis pool (event streams hold one each while they wait)."""


class FleetClient:
    """Submits jobs to registered deployments (they queue while no worker runs), and tracks them."""

    def __init__(self, broker_url: str = DEFAULT_BROKER_URL, result_backend: str = DEFAULT_RESULT_BACKEND, *,
                 result_ttl_s: int = 86_400, visibility_timeout_s: int = 3600, discovery_ttl_s: float = DISCOVERY_TTL_S,
                 redis_options: RedisOptions | None = None) -> None:
        self.broker_url = broker_url
        self.result_backend = result_backend
        self.redis_options = redis_options or RedisOptions()
        """Sentinel master name and credentials, TLS files, replica acknowledgements: for every connection."""
        self.celery = make_celery("pipefleet-client", broker_url=broker_url,
                                  result_backend=producer_backend_url(result_backend), result_ttl_s=result_ttl_s,
                                  visibility_timeout_s=visibility_timeout_s, redis_options=self.redis_options)
        self.celery.conf.task_publish_retry_policy = {
            "max_retries": 20, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}
        self.redis = redis_client(broker_url, self.redis_options, socket_connect_timeout=5, health_check_interval=30)
        self._aredis: Any = None
        self.access = RedisAccess(self.redis, broker_url)
        """Runs this client's Redis calls, mapping refusals and outages onto FleetUnavailable."""
        self.publisher = Publisher(self.celery, self.redis, wait=ReplicaWait(
            self.redis_options.replicas_to_wait_for(broker_url), self.redis_options.wait_timeout_ms))
        """Builds Celery task messages and pushes many in one round trip."""
        self.waiter = ResultWaiter(self.celery.backend, result_backend, self.redis_options)
        """Waits for the results of every job of this client, with one thread and MGETs."""
        self._deployments = DeploymentCache(self.redis, discovery_ttl_s)

    @classmethod
    def from_env(cls, **overrides: Any) -> "FleetClient":
        """A client for ``PIPEFLEET_BROKER_URL`` / ``PIPEFLEET_RESULT_BACKEND`` (or the defaults).

        ``sentinel://`` URLs take their master's name from ``PIPEFLEET_SENTINEL_MASTER_NAME``; TLS files
        and replica acknowledgements come from the other variables :class:`~producers.settings.ClientSettings`
        reads. ``overrides`` are keyword arguments of the constructor and win over the environment.
        """
        return cls(**{**ClientSettings().client_kwargs(), **overrides})

    @property
    def aredis(self) -> Any:
        """An asyncio Redis client on the broker (for async event streams), one per running event loop."""
        import redis.asyncio as aredis_lib

        loop = asyncio.get_running_loop()
        # Connections of redis.asyncio belong to the loop that opened them.
        if self._aredis is None or self._aredis[0] is not loop:
            # Each open event stream holds a connection in XREAD BLOCK: a blocking pool makes the
            # stream past the pool's size wait for a connection instead of failing.
            pool = async_redis_pool(self.broker_url, self.redis_options, max_connections=AREDIS_MAX_CONNECTIONS,
                                    socket_connect_timeout=5)
            self._aredis = (loop, aredis_lib.Redis(connection_pool=pool))
        return self._aredis[1]

    def close(self) -> None:
        """Release connections and stop the result waiter's thread."""
        self.waiter.close()
        self.redis.close()
        self.celery.close()

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def deployments(self) -> list[DeploymentInfo]:
        """Known deployments (registered, or advertised by a live worker), each with the workers serving it now."""
        return self.access.call(self._deployments.get, fresh=True)

    def live_workers(self, deployment: str) -> int:
        """How many workers serve ``deployment`` now (0 while its jobs wait for one), as last read."""
        infos = self.access.call(self._deployments.get)
        return next((len(info.workers) for info in infos if info.name == deployment), 0)

    def resolve(self, *, task: str | None = None, model: str | None = None, deployment: str | None = None,
                revision: str | None = None, construction: ConstructionRequest | None = None) -> DeploymentInfo:
        """The known deployment a request names (with ``construction``: built that way); raises UnknownDeployment."""
        return self.access.call(self._deployments.match, task=task, model=model, deployment=deployment,
                                revision=revision, construction=construction)

    def submit(self, task: str | None = None, model: str | None = None, inputs: Any = None,
               params: dict[str, Any] | None = None, *, deployment: str | None = None, revision: str | None = None,
               priority: int | None = None, timeout_s: float | None = None, chunk_size: int | None = None,
               partial: bool = False, job_id: str | None = None, webhook: str | None = None,
               webhook_events: list[str] | None = None, stream: bool = False) -> Job:
        """Validate and enqueue one job; returns its :class:`Job` at once.

        ``inputs`` is one input or a list of inputs, as for ``pipe(inputs)``.
        ``priority`` runs from 0 (most urgent) to 9; ``timeout_s`` is a deadline
        after which the job fails with JobTimeout. A list longer than
        ``chunk_size`` (or the deployment's default) runs as a chord of chunks.
        ``webhook`` is a URL that receives the job's ``job.succeeded``,
        ``job.failed`` or ``job.cancelled`` event (``webhook_events`` picks
        which), signed with the fleet's ``[webhooks] secret`` (docs/webhooks.md).
        ``stream=True`` says the caller reads the generated text as it comes
        (``job.stream()``): a text-generation worker then sends it token by token.
        """
        info = self.resolve(task=task, model=model, deployment=deployment, revision=revision)
        prepared = prepare(info, inputs=inputs, params=params, priority=priority, timeout_s=timeout_s,
                           chunk_size=chunk_size, partial=partial, job_id=job_id, model=model, revision=revision,
                           stream=stream)
        if webhook is not None or webhook_events is not None:
            self._watch(prepared, webhook, webhook_events)
        return self._send([prepared])[0]

    def _watch(self, prepared: PreparedJob, webhook: str | None, events: list[str] | None) -> None:
        """Register the job's webhook before it is sent, so no outcome can come first."""
        if webhook is None:
            raise InvalidParams("webhook_events needs a webhook URL")
        target = job_webhook(webhook, events)
        ttl_s = int(self.celery.conf.result_expires.total_seconds()) if hasattr(
            self.celery.conf.result_expires, "total_seconds") else int(self.celery.conf.result_expires or 86_400)
        self.access.call(watch_job, self.redis, prepared.spec.job_id, target, ttl_s=ttl_s)

    def submit_many(self, requests: Iterable[JobRequest | dict[str, Any]]) -> list[Job]:
        """Validate and enqueue many jobs, publishing them in one Redis round trip; returns their Jobs in order.

        Each request is a :class:`JobRequest` or a dict of :meth:`submit`'s keyword
        arguments. Every request is checked first, with ``submit()``'s rules and
        errors (the error's note names the request's index), so a bad request
        sends nothing. The messages are ordinary Celery task messages, with the
        same queue, priority and headers as ``submit()``'s.
        """
        prepared = []
        webhooks: list[tuple[PreparedJob, Any, Any]] = []
        for index, request in enumerate(requests):
            try:
                if not isinstance(request, JobRequest):
                    if not isinstance(request, dict):
                        raise InvalidParams(f"a request must be a JobRequest or a dict, not {type(request).__name__}")
                    request = JobRequest(**request)
                info = self.resolve(task=request.task, model=request.model, deployment=request.deployment,
                                    revision=request.revision)
                prepared.append(prepare(info, inputs=request.inputs, params=request.params,
                                        priority=request.priority, timeout_s=request.timeout_s,
                                        chunk_size=request.chunk_size, partial=request.partial,
                                        job_id=request.job_id, model=request.model, revision=request.revision,
                                        stream=request.stream))
                if request.webhook is not None or request.webhook_events is not None:
                    webhooks.append((prepared[-1], request.webhook, request.webhook_events))
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                raise InvalidParams(f"request {index}: {problems}") from None
            except Exception as error:
                error.add_note(f"in request {index} of submit_many()")
                raise
        for job, url, events in webhooks:
            self._watch(job, url, events)
        return self._send(prepared)

    def _send(self, prepared: list[PreparedJob]) -> list[Job]:
        """Publish prepared jobs: plain ones pipelined together, chunked and split ones through Celery."""
        jobs: list[Job] = []
        batch: list[TaskMessage] = []
        for job in prepared:
            info, spec = job.info, job.spec
            if job.kind == "plain":
                if info.claim_check_bytes is not None and job.payload_bytes > info.claim_check_bytes:
                    spec.inputs = self.access.call(store_payload, self.redis, spec.inputs, ttl_s=info.payload_ttl_s)
                batch.append(self._message(job))
                jobs.append(self._track(Job(self, spec.job_id, total=job.n_inputs, chunked=False,
                                            deployment=info.name, deadline_ts=spec.deadline_ts)))
                continue
            # Chords and splits go out in order with the plain jobs around them.
            self.access.call(self.publisher.publish, batch)
            batch = []
            if job.kind == "split":
                handle = self._track(Job(self, spec.job_id, total=0, chunked=True, deployment=info.name,
                                         deadline_ts=spec.deadline_ts))
                self.access.call(chunking.submit_split, self.celery, self.redis, info, spec, priority=job.priority,
                                 payload_bytes=job.payload_bytes)
            else:
                handle = self._track(Job(self, spec.job_id, total=job.n_inputs, chunked=True, deployment=info.name,
                                         deadline_ts=spec.deadline_ts))
                self.access.call(chunking.submit_chunked, self.celery, self.redis, info, spec,
                                 chunk_size=job.chunk_size, priority=job.priority, payload_bytes=job.payload_bytes)
            jobs.append(handle)
            self.access.call(self.publisher.replicated)
        self.access.call(self.publisher.publish, batch)
        return jobs

    def _track(self, job: Job) -> Job:
        # Before publishing: the waiter may subscribe to the job's result channel first.
        self.waiter.track(job.id, job)
        return job

    def _message(self, job: PreparedJob) -> TaskMessage:
        spec = job.spec
        deadline_ts = spec.deadline_ts
        return self.publisher.message(
            INFER_TASK, task_id=spec.job_id, kwargs={"spec": spec.model_dump(exclude_defaults=True)},
            queue=job.info.queue, priority=DEFAULT_PRIORITY if job.priority is None else job.priority,
            shadow=f"infer:{job.info.name}", expires_s=None if deadline_ts is None else deadline_ts - time.time(),
            # What Flower shows; written here so Celery need not repr every payload.
            argsrepr="()", kwargsrepr=_spec_summary(spec, job.n_inputs))

    def results(self, jobs: Iterable[Job], timeout: float | None = None, *,
                return_exceptions: bool = False) -> list[Any]:
        """Outputs of many jobs, in order, read together: one wait, a few MGETs, not one wait per job.

        ``timeout`` bounds the whole wait. Each job's error is raised as
        ``job.result()`` raises it (the first failing job's, in order), or, with
        ``return_exceptions=True``, returned in its place.
        """
        return gather(list(jobs), timeout, return_exceptions=return_exceptions)

    async def aresults(self, jobs: Iterable[Job], timeout: float | None = None, *,
                       return_exceptions: bool = False) -> list[Any]:
        """Async :meth:`results`: awaits without holding a thread."""
        return await gather_async(list(jobs), timeout, return_exceptions=return_exceptions)

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
        Chunks that can go out together are published in one round trip.
        """
        chunk_size = client_map.check_window(chunk_size, max_in_flight)
        info = self.resolve(task=task, model=model, deployment=deployment, revision=revision)
        return client_map.stream(self.publisher, self.waiter, self.access, info, iterable, params=dict(params or {}),
                                chunk_size=chunk_size, max_in_flight=max_in_flight, progress=progress,
                                timeout_s=timeout_s, column=column, priority=priority, model=model,
                                revision=revision)

    def job(self, job_id: str) -> Job:
        """Reattach to a job by id (from any process)."""
        return Job(self, job_id)

    def cancel(self, job_id: str) -> None:
        """Cancel a job by id: queued parts never run, parts waiting in a batcher are skipped."""
        self.cancel_many([job_id])

    def cancel_many(self, job_ids: Iterable[str]) -> None:
        """Cancel many jobs as :meth:`cancel` does, with one revoke broadcast and a few round trips in all."""
        job_ids = list(job_ids)
        if not job_ids:
            return
        records = self.access.call(self.redis.mget, [f"{JOB_KEY_PREFIX}{job_id}" for job_id in job_ids])
        ids = list(job_ids)
        for record_raw in records:
            if record_raw:
                ids += json.loads(record_raw).get("chunk_ids", [])

        def flag() -> None:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.set(f"{CANCEL_KEY_PREFIX}{job_id}", "1", ex=86_400)
                pipe.execute()

        self.access.call(flag)
        self.celery.control.revoke(ids)
        self.access.call(self._store_revoked, ids)

    def _store_revoked(self, ids: list[str]) -> None:
        """Record every unfinished id as REVOKED, as Celery's backend would, in two round trips in all."""
        from celery.exceptions import TaskRevokedError

        backend = self.celery.backend
        keys = [backend.get_key_for_task(task_id) for task_id in ids]
        stored = backend.client.mget(keys)
        pipe = backend.client.pipeline(transaction=False)
        error = backend.prepare_exception(TaskRevokedError("cancelled by the client"))
        for task_id, key, raw in zip(ids, keys, stored):
            if raw is not None and backend.decode(raw).get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                continue
            value = backend.encode(finished_task_meta(backend, task_id, result=error, state="REVOKED"))
            pipe.setex(key, backend.expires, value)
            pipe.publish(key, value)
        pipe.execute()

    async def asubmit(self, *args: Any, **kwargs: Any) -> Job:
        """Async :meth:`submit` for asyncio backends (FastAPI and friends)."""
        return await asyncio.to_thread(self.submit, *args, **kwargs)

    async def asubmit_many(self, requests: Iterable[JobRequest | dict[str, Any]]) -> list[Job]:
        """Async :meth:`submit_many`: one thread hop for the whole burst."""
        return await asyncio.to_thread(self.submit_many, list(requests))

    async def adeployments(self) -> list[DeploymentInfo]:
        """Async :meth:`deployments`."""
        return await asyncio.to_thread(self.deployments)

    async def aclose(self) -> None:
        """Release connections, the asyncio ones included."""
        if self._aredis is not None:
            await self._aredis[1].aclose()
        self._aredis = None
        await asyncio.to_thread(self.close)
