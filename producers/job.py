"""A handle on one submitted job: status, result, cancel, and their async twins."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from celery.exceptions import TimeoutError as CeleryTimeoutError

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


def _reraise(error: BaseException) -> None:
    raise error


def _is_chord_error(result: Any) -> bool:
    """True when a chord callback failed because one of its chunks did (Celery's ChordError)."""
    if isinstance(result, dict):
        return result.get("exc_type") == "ChordError"
    return type(result).__name__ == "ChordError"


class Job:
    """A submitted job. ``job.id`` is enough to reattach with ``client.job(id)``."""

    def __init__(self, client: "FleetClient", job_id: str, *, total: int = 0, chunked: bool | None = None,
                 async_result: Any = None) -> None:
        self.client = client
        self.id = job_id
        self._total = total
        self._chunked = chunked
        # Celery subscribed to the result channel when the job was sent; keeping its handle
        # avoids an unsubscribe now and a resubscribe in result().
        self._async_result = async_result

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def _record(self) -> dict[str, Any] | None:
        raw = self.client.redis.get(f"{JOB_KEY_PREFIX}{self.id}")
        return json.loads(raw) if raw else None

    def status(self) -> JobStatus:
        """State, progress (``done``/``total`` items) and the error if it failed."""
        self.client._check_access()
        meta = self.client._redis_call(self.client.celery.backend.get_task_meta, self.id)
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
        return JobStatus(job_id=self.id, state=state, done=done, total=total, error=error, error_type=error_type)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the output; raises the worker's error, or JobTimeout after ``timeout`` seconds."""
        self.client._check_access()
        async_result = self._async_result or self.client.celery.AsyncResult(self.id)
        try:
            value = self.client._redis_call(async_result.get, timeout=timeout, propagate=False,
                                            disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise JobTimeout(f"job {self.id} did not finish within {timeout} s") from None
        return self._outcome(async_result.state, value)

    def _outcome(self, state: str, value: Any) -> Any:
        """The output of a ready task in ``state`` with stored ``value``, or its error raised."""
        if state == "SUCCESS":
            return decode_output(value["outputs"] if isinstance(value, dict) and "outputs" in value else value)
        if state == "REVOKED":
            if _expired(value):
                raise JobTimeout(f"job {self.id} passed its deadline (timeout_s) before a worker ran it")
            raise JobCancelled(f"job {self.id} was cancelled")
        raise self._error(value)

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
        self.client._cancel(self.id)

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
        """Async :meth:`result` for asyncio backends; the wait holds no thread (see producers.waiting)."""
        from producers.waiting import wait_ready_meta

        if not self.client._access_checked:
            await asyncio.to_thread(self.client._check_access)
        try:
            meta = await wait_ready_meta(self.client, self.id, timeout)
        except Exception as error:
            # The same mapping as the sync calls: a Redis outage is FleetUnavailable.
            self.client._redis_call(_reraise, error)
            raise
        if meta is None:
            raise JobTimeout(f"job {self.id} did not finish within {timeout} s")
        # Decoding a large output, and a chunked job's error lookup, are work for a thread.
        return await asyncio.to_thread(self._outcome, meta["status"], meta.get("result"))

    def usage(self) -> dict[str, int] | None:
        """Token counts the worker reported with the result (``prompt_tokens``…); None if none or not done."""
        meta = self.client._redis_call(self.client.celery.backend.get_task_meta, self.id)
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
