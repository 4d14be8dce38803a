"""A handle on one submitted job: status, result, cancel, and their async twins."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from producers.codec import decode_output
from producers.constants import CANCEL_KEY_PREFIX, JOB_KEY_PREFIX, PROGRESS_KEY_PREFIX
from producers.errors import ERRORS_BY_NAME, JobCancelled, JobError, JobTimeout, PipefleetError
from producers.schemas import FINAL_EVENT_KINDS, JobEvent, JobState, JobStatus

if TYPE_CHECKING:
    from producers.client import FleetClient

_CELERY_TO_STATE = {
    "PENDING": JobState.PENDING,
    "RECEIVED": JobState.PENDING,
    "STARTED": JobState.RUNNING,
    "PROGRESS": JobState.RUNNING,
    "RETRY": JobState.RUNNING,
    "SUCCESS": JobState.SUCCESS,
    "FAILURE": JobState.FAILURE,
    "REVOKED": JobState.CANCELLED,
}


DEADLINE_GRACE_S = 1.0
"""A job still unstarted this long after its deadline has missed it (a worker may be taking it right at the deadline)."""


def error_from_meta(result: Any) -> PipefleetError:
    """The pipefleet error a failed task's stored exception stands for."""
    if isinstance(result, PipefleetError):
        return result
    if isinstance(result, BaseException):
        name = type(result).__name__
        message = str(result.args[0]) if len(result.args) == 1 else str(result)
        if name in ERRORS_BY_NAME:
            return ERRORS_BY_NAME[name](message)
        if name in ("TaskRevokedError", "Terminated"):
            return JobCancelled(message or "the job was cancelled")
        return JobError(f"{name}: {message}")
    if isinstance(result, dict) and "exc_type" in result:
        cls = ERRORS_BY_NAME.get(result["exc_type"], JobError)
        message = result.get("exc_message")
        message = message[0] if isinstance(message, list) and len(message) == 1 else message
        return cls(str(message))
    return JobError(str(result))


def _expired(result: Any) -> bool:
    """True when Celery revoked the task because its ``expires`` (the job's deadline) passed."""
    if isinstance(result, BaseException):
        return "expired" in str(result)
    if isinstance(result, dict):
        return "expired" in str(result.get("exc_message", ""))
    return False


def _is_chord_error(result: Any) -> bool:
    """True when a chord callback failed because one of its chunks did (Celery's ChordError)."""
    if isinstance(result, dict):
        return result.get("exc_type") == "ChordError"
    return type(result).__name__ == "ChordError"


class Job:
    """A submitted job. ``job.id`` is enough to reattach with ``client.job(id)``."""

    def __init__(self, client: "FleetClient", job_id: str, *, total: int = 0, chunked: bool | None = None,
                 deployment: str | None = None, deadline_ts: float | None = None) -> None:
        self.client = client
        self.id = job_id
        self.deployment = deployment
        """The deployment the job was sent to (None on a handle reattached by id)."""
        self.deadline_ts = deadline_ts
        """Unix time after which a job no worker has started fails with JobTimeout (None: no deadline)."""
        self._total = total
        self._chunked = chunked
        self._meta: dict[str, Any] | None = None  # the final Celery meta, once read

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def _record(self) -> dict[str, Any] | None:
        raw = self.client.redis.get(f"{JOB_KEY_PREFIX}{self.id}")
        return json.loads(raw) if raw else None

    def status(self) -> JobStatus:
        """State, progress (``done``/``total`` items) and the error if it failed."""
        self.client.access.check()
        meta = self.client.access.call(self.client.celery.backend.get_task_meta, self.id)
        state = _CELERY_TO_STATE.get(meta.get("status"), JobState.PENDING)
        total, done = self._total, 0
        record = self._record() if self._chunked is not False else None
        if record is not None:
            total = record.get("total", total)
            done = int(self.client.redis.get(f"{PROGRESS_KEY_PREFIX}{self.id}") or 0)
            if state is JobState.PENDING and done:
                state = JobState.RUNNING
            if state is JobState.PENDING and self.client.redis.exists(f"{CANCEL_KEY_PREFIX}{self.id}"):
                state = JobState.CANCELLED
        result = meta.get("result")
        if state is JobState.RUNNING and isinstance(result, dict) and "done" in result:
            done, total = result["done"], result.get("total", total)
        error = error_type = None
        if state is JobState.SUCCESS:
            if isinstance(result, dict):
                total = total or result.get("n_items", 0)
            done = total
        elif state in (JobState.FAILURE, JobState.CANCELLED):
            if state is JobState.FAILURE:
                exc = self._error(result)
                if isinstance(exc, JobCancelled):
                    state = JobState.CANCELLED
            elif _expired(result):
                state, exc = JobState.FAILURE, JobTimeout("the job passed its deadline before a worker ran it")
            else:
                exc = JobCancelled("the job was cancelled")
            error, error_type = str(exc), type(exc).__name__
        if state is JobState.PENDING and self._past_deadline():
            exc = self._deadline_error()
            state, error, error_type = JobState.FAILURE, str(exc), type(exc).__name__
        live = self._live_workers()
        return JobStatus(job_id=self.id, state=state, done=done, total=total, error=error, error_type=error_type,
                         queued=state is JobState.PENDING and meta.get("status") == "PENDING", live_workers=live)

    def _live_workers(self) -> int | None:
        """Workers serving this job's deployment now; None when the handle does not know the deployment."""
        if self.deployment is None:
            return None
        return self.client.live_workers(self.deployment)

    def _past_deadline(self) -> bool:
        return self.deadline_ts is not None and time.time() > self.deadline_ts + DEADLINE_GRACE_S

    def _deadline_error(self) -> JobTimeout:
        live = self._live_workers()
        served = "" if live is None else f" ({live} live worker(s) serve deployment {self.deployment!r})"
        return JobTimeout(f"job {self.id} passed its deadline (timeout_s) before a worker ran it{served}")

    def _deadline_wait_s(self, timeout: float | None) -> float | None:
        """How long to wait before checking whether the job missed its deadline unstarted; None: no check."""
        if self.deadline_ts is None:
            return None
        until_deadline = max(0.0, self.deadline_ts + DEADLINE_GRACE_S - time.time())
        return until_deadline if timeout is None or until_deadline < timeout else None

    def _still_unstarted(self) -> bool:
        meta = self.client.access.call(self.client.celery.backend.get_task_meta, self.id)
        return meta.get("status") == "PENDING"

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the output; raises the worker's error, or JobTimeout after ``timeout`` seconds."""
        if self._meta is None:
            self.client.access.check()
            started = time.monotonic()
            first_wait = self._deadline_wait_s(timeout)
            self._meta = self.client.waiter.wait([self.id], timeout if first_wait is None else first_wait).get(self.id)
            if self._meta is None and first_wait is not None:
                # Nobody ran the job by its deadline (no worker, or all busy): it fails now, as a worker
                # would fail it on receipt, rather than waiting out the caller's whole timeout.
                if self._still_unstarted():
                    raise self._deadline_error()
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
                self._meta = self.client.waiter.wait([self.id], left).get(self.id)
        return self._outcome(self._meta, timeout)

    def _outcome(self, meta: dict[str, Any] | None, timeout: float | None) -> Any:
        """The output a final Celery meta holds, or the error it stands for."""
        if meta is None:
            raise JobTimeout(f"job {self.id} did not finish within {timeout} s")
        state, value = meta.get("status"), meta.get("result")
        if state == "SUCCESS":
            return decode_output(value["outputs"] if isinstance(value, dict) and "outputs" in value else value)
        if state == "REVOKED":
            if _expired(value):
                raise JobTimeout(f"job {self.id} passed its deadline (timeout_s) before a worker ran it")
            raise JobCancelled(f"job {self.id} was cancelled")
        raise self.client.access.call(self._error, value)

    def _error(self, result: Any) -> PipefleetError:
        """The job's error; for a chunked job, the failing chunk's own error (ChunkFailed naming it)."""
        if not _is_chord_error(result):
            return error_from_meta(result)
        if self.client.redis.exists(f"{CANCEL_KEY_PREFIX}{self.id}"):
            return JobCancelled(f"job {self.id} was cancelled")
        record = self._record() or {}
        backend = self.client.celery.backend
        revoked = False
        for chunk_id in record.get("chunk_ids", []):
            meta = backend.get_task_meta(chunk_id)
            if meta.get("status") == "FAILURE":
                return error_from_meta(meta.get("result"))
            revoked = revoked or meta.get("status") == "REVOKED"
        if revoked:
            return JobCancelled(f"job {self.id} was cancelled")
        return error_from_meta(result)

    def cancel(self) -> None:
        """Cancel the job: queued parts never run, parts waiting in a batcher are skipped."""
        self.client.cancel(self.id)

    def wait_until(self, predicate, *, timeout: float = 10.0, interval: float = 0.05) -> JobStatus:
        """Poll :meth:`status` until ``predicate(status)`` holds; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status) or time.monotonic() > deadline:
                return status
            time.sleep(interval)

    def events(self, last_event_id: str | None = None, timeout_s: float | None = None) -> Iterator[JobEvent]:
        """The job's events (progress, text, restart, done, error) from the start, or after ``last_event_id``.

        Ends after the ``done`` or ``error`` event (an error is yielded, not
        raised). ``timeout_s`` bounds the whole wait: JobTimeout after it.
        """
        from producers.events import iter_events

        return iter_events(self, last_event_id, timeout_s)

    def stream(self, sequence: int | None = 0, timeout_s: float | None = None) -> Iterator[str]:
        """Generated text as it comes, in pieces (one per generation step), from the first piece.

        ``sequence`` picks one output sequence (input ``i``, return sequence
        ``j`` is ``i * num_return_sequences + j``); None yields the pieces of all
        of them as they come. The pieces of one sequence concatenated equal its
        ``generated_text`` with ``return_full_text=False``. Raises the job's
        error when it fails or is cancelled.
        """
        from producers.events import iter_text

        return iter_text(self.events(timeout_s=timeout_s), sequence)

    def aevents(self, last_event_id: str | None = None, timeout_s: float | None = None) -> AsyncIterator[JobEvent]:
        """Async :meth:`events`; waits on Redis without holding a thread."""
        from producers.events import aiter_events

        return aiter_events(self, last_event_id, timeout_s)

    def astream(self, sequence: int | None = 0, timeout_s: float | None = None) -> AsyncIterator[str]:
        """Async :meth:`stream`."""
        from producers.events import aiter_text

        return aiter_text(self.aevents(timeout_s=timeout_s), sequence)

    async def aresult(self, timeout: float | None = None) -> Any:
        """Async :meth:`result` for asyncio backends; waits without holding a thread."""
        if self._meta is None:
            if not self.client.access.checked:
                await asyncio.to_thread(self.client.access.check)
            started = time.monotonic()
            first_wait = self._deadline_wait_s(timeout)
            self._meta = (await self.client.waiter.wait_async(
                [self.id], timeout if first_wait is None else first_wait)).get(self.id)
            if self._meta is None and first_wait is not None:
                if await asyncio.to_thread(self._still_unstarted):
                    raise await asyncio.to_thread(self._deadline_error)
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
                self._meta = (await self.client.waiter.wait_async([self.id], left)).get(self.id)
        if self._meta is not None and self._meta.get("status") == "SUCCESS":
            return self._outcome(self._meta, timeout)
        # An error may need Redis reads (a chord's failing chunk): off the event loop.
        return await asyncio.to_thread(self._outcome, self._meta, timeout)

    def usage(self) -> dict[str, int] | None:
        """Token counts the worker reported with the result (``prompt_tokens``…); None if none or not done."""
        meta = self.client.access.call(self.client.celery.backend.get_task_meta, self.id)
        result = meta.get("result")
        return result.get("usage") if meta.get("status") == "SUCCESS" and isinstance(result, dict) else None

    async def ausage(self) -> dict[str, int] | None:
        """Async :meth:`usage`."""
        return await asyncio.to_thread(self.usage)

    async def afinal_event(self, grace_s: float = 0.0) -> JobEvent | None:
        """The job's ``done``/``error`` event as its worker wrote it, read without replaying the stream.

        Call it once the job is over: workers write events in the background, so
        the final one may land just after the result; it is awaited up to
        ``grace_s``. None if the stream holds no final event by then (a task whose
        worker writes no events).
        """
        from producers.events import FIRST_ID, decode_entry, events_key

        redis, key = self.client.aredis, events_key(self.id)
        entries = await redis.xrevrange(key, count=1)
        last = decode_entry(*entries[0]) if entries else None
        deadline = time.monotonic() + grace_s
        while last is None or last.kind not in FINAL_EVENT_KINDS:
            block_ms = int((deadline - time.monotonic()) * 1000)
            if block_ms <= 0:
                return None
            reply = await redis.xread({key: last.id if last else FIRST_ID}, block=block_ms)
            for _, stream_entries in reply or []:
                for entry_id, fields in stream_entries:
                    last = decode_entry(entry_id, fields)
        return last

    async def astatus(self) -> JobStatus:
        """Async :meth:`status`."""
        return await asyncio.to_thread(self.status)

    async def acancel(self) -> None:
        """Async :meth:`cancel`."""
        await asyncio.to_thread(self.cancel)


def _outcomes(jobs: list[Job], metas: dict[str, dict[str, Any]], timeout: float | None,
              return_exceptions: bool) -> list[Any]:
    outputs = []
    for job in jobs:
        job._meta = job._meta or metas.get(job.id)
        try:
            outputs.append(job._outcome(job._meta, timeout))
        except PipefleetError as error:
            if not return_exceptions:
                raise
            outputs.append(error)
    return outputs


def gather(jobs: list[Job], timeout: float | None = None, *, return_exceptions: bool = False) -> list[Any]:
    """Outputs of ``jobs`` in order, waiting for all of them at once (see ``FleetClient.results``)."""
    metas: dict[str, dict[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    for client, ids in _pending_by_client(jobs).items():
        client.access.check()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        metas.update(client.waiter.wait(ids, left))
    return _outcomes(jobs, metas, timeout, return_exceptions)


async def gather_async(jobs: list[Job], timeout: float | None = None, *,
                       return_exceptions: bool = False) -> list[Any]:
    """Async :func:`gather`: awaits the waiter's future, holding no thread."""
    metas: dict[str, dict[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    for client, ids in _pending_by_client(jobs).items():
        if not client.access.checked:
            await asyncio.to_thread(client.access.check)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        metas.update(await client.waiter.wait_async(ids, left))
    if all((job._meta or metas.get(job.id) or {}).get("status") == "SUCCESS" for job in jobs):
        return _outcomes(jobs, metas, timeout, return_exceptions)
    # Errors may need Redis reads (a chord's failing chunk): off the event loop.
    return await asyncio.to_thread(_outcomes, jobs, metas, timeout, return_exceptions)


def _pending_by_client(jobs: list[Job]) -> dict[Any, list[str]]:
    by_client: dict[Any, list[str]] = {}
    for job in jobs:
        if job._meta is None:
            by_client.setdefault(job.client, []).append(job.id)
    return by_client
