"""A job's event stream: text pieces, progress, restart, done and error, through a Redis Stream.

Workers append entries to ``pipefleet:events:<job_id>`` (a bounded stream that
expires with the result); any process reads it from the first entry, or after
an entry id it already saw, so a client that reattaches replays what it missed.
Each entry has two fields: ``kind`` (an :class:`~producers.schemas.EventKind`)
and ``data`` (a JSON object).

Every job ends its event sequence with one ``done`` or ``error`` event. Jobs
whose worker writes no events of its own (tasks other than text generation,
jobs cancelled or expired while queued) get that final event from their result:
a reader blocked on an idle stream checks the job's status every
``EVENTS_POLL_S`` seconds and, once it is final, yields the event the status
stands for (its ``id`` is the last real entry's id, or ``"0-0"``).

Text pieces of a job that restarted (its worker died and another ran it
again) start over after the ``restart`` event. :class:`TextFollower` hides
that from ``job.stream()``: it skips the text it already handed out and raises
:class:`~producers.errors.JobError` if the new run's text differs (sampling
without a seed).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Iterator

from producers.constants import EVENTS_FINAL_GRACE_S, EVENTS_KEY_PREFIX, EVENTS_POLL_S
from producers.errors import ERRORS_BY_NAME, JobError, JobTimeout, PipefleetError
from producers.schemas import FINAL_EVENT_KINDS, EventKind, JobEvent, JobState, JobStatus

if TYPE_CHECKING:
    from producers.job import Job

READ_COUNT = 256
"""Entries fetched per XREAD round trip."""

FIRST_ID = "0-0"
"""Stream id before the first entry: reading after it replays the whole stream."""


def events_key(job_id: str) -> str:
    """The Redis key of a job's event stream."""
    return f"{EVENTS_KEY_PREFIX}{job_id}"


def event_fields(kind: EventKind, data: dict[str, Any]) -> dict[str, str]:
    """The XADD fields of one event (the writer's half of the encoding)."""
    return {"kind": EventKind(kind).value, "data": json.dumps(data, separators=(",", ":"))}


def decode_entry(entry_id: Any, fields: dict[Any, Any]) -> JobEvent:
    """One stream entry (as redis-py returns it, bytes or str) as a :class:`JobEvent`."""

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    by_name = {text(k): text(v) for k, v in fields.items()}
    return JobEvent(id=text(entry_id), kind=EventKind(by_name["kind"]), data=json.loads(by_name.get("data") or "{}"))


def event_error(event: JobEvent) -> PipefleetError:
    """The pipefleet error an ``error`` event stands for (same class and message as ``job.result()``)."""
    cls = ERRORS_BY_NAME.get(str(event.data.get("type")), JobError)
    return cls(str(event.data.get("message", "")))


def final_event_from_status(status: JobStatus, last_id: str) -> JobEvent | None:
    """The ``done``/``error`` event a final job status stands for; None while the job still runs."""
    if status.state is JobState.SUCCESS:
        return JobEvent(id=last_id, kind=EventKind.DONE, data={"state": status.state.value})
    if status.state in (JobState.FAILURE, JobState.CANCELLED):
        error_type = status.error_type or ("JobCancelled" if status.state is JobState.CANCELLED else "JobError")
        return JobEvent(id=last_id, kind=EventKind.ERROR,
                        data={"type": error_type, "message": status.error or "", "state": status.state.value})
    return None


class _Reader:
    """The cursor and end-of-stream rule shared by the sync and async readers.

    Each loop reads with ``block_ms()`` after ``cursor``, hands out ``take(reply)``, or ``on_idle(status)``
    when the read was empty, until ``done``.
    """

    def __init__(self, job_id: str, last_event_id: str | None, timeout_s: float | None) -> None:
        self.key = events_key(job_id)
        self.cursor = last_event_id or FIRST_ID
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.final_seen_at: float | None = None
        self.seen_any = last_event_id is not None
        self.done = False
        """True once the stream's final event was handed out: the reader reads no more."""

    def block_ms(self) -> int:
        wait_s = EVENTS_POLL_S
        if self.deadline is not None:
            wait_s = min(wait_s, max(0.001, self.deadline - time.monotonic()))
        return max(1, int(wait_s * 1000))

    def take(self, reply: Any) -> list[JobEvent]:
        """The events of one XREAD ``reply`` up to the first final one (which ends the stream); advances the cursor."""
        events = [decode_entry(entry_id, fields) for _, entries in (reply or []) for entry_id, fields in entries]
        if events:
            self.cursor = events[-1].id
            self.seen_any = True
        for position, event in enumerate(events):
            if event.kind in FINAL_EVENT_KINDS:
                self.done = True
                return events[:position + 1]
        return events

    def on_idle(self, status: JobStatus) -> list[JobEvent]:
        """After an empty read: the synthesized final event once the job is over (which ends the stream), else []."""
        final = final_event_from_status(status, self.cursor)
        if final is not None:
            # A worker that streams writes its final event after the last piece; the result may land first.
            now = time.monotonic()
            if self.seen_any and final.kind is EventKind.DONE:
                if self.final_seen_at is None:
                    self.final_seen_at = now
                if now - self.final_seen_at < EVENTS_FINAL_GRACE_S:
                    return []
            self.done = True
            return [final]
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise JobTimeout(f"no event from job {self.key[len(EVENTS_KEY_PREFIX):]} within the timeout")
        return []


def iter_events(job: "Job", last_event_id: str | None = None, timeout_s: float | None = None) -> Iterator[JobEvent]:
    """Implementation of :meth:`producers.job.Job.events`."""
    client = job.client
    reader = _Reader(job.id, last_event_id, timeout_s)
    while not reader.done:
        reply = client.access.call(client.redis.xread, {reader.key: reader.cursor}, count=READ_COUNT,
                                   block=reader.block_ms())
        yield from reader.take(reply) or reader.on_idle(job.status())


async def aiter_events(job: "Job", last_event_id: str | None = None,
                       timeout_s: float | None = None) -> AsyncIterator[JobEvent]:
    """Implementation of :meth:`producers.job.Job.aevents`: blocks on Redis without holding a thread."""
    redis = job.client.aredis
    reader = _Reader(job.id, last_event_id, timeout_s)
    while not reader.done:
        reply = await redis.xread({reader.key: reader.cursor}, count=READ_COUNT, block=reader.block_ms())
        for event in reader.take(reply) or reader.on_idle(await asyncio.to_thread(job.status)):
            yield event


class TextFollower:
    """Turns a job's events into the text pieces of one sequence (or all), across restarts.

    ``feed(event)`` returns the pieces to hand out; it raises the job's error on
    an ``error`` event.
    """

    def __init__(self, sequence: int | None = 0) -> None:
        self.sequence = sequence
        self.emitted: dict[int, str] = {}
        self.rerun: dict[int, str] | None = None

    def feed(self, event: JobEvent) -> list[str]:
        """Pieces ``event`` adds to the output; raises the job's error on an ``error`` event."""
        if event.kind is EventKind.ERROR:
            raise event_error(event)
        if event.kind is EventKind.RESTART:
            self.rerun = {}
            return []
        if event.kind is not EventKind.TEXT:
            return []
        index = int(event.data.get("index", 0))
        if self.sequence is not None and index != self.sequence:
            return []
        piece = str(event.data.get("text", ""))
        if self.rerun is None:
            self.emitted[index] = self.emitted.get(index, "") + piece
            return [piece] if piece else []
        # A rerun: swallow what this sequence already showed, hand out only what is new.
        before = self.emitted.get(index, "")
        text = self.rerun[index] = self.rerun.get(index, "") + piece
        if len(text) <= len(before):
            if not before.startswith(text):
                raise JobError(self._diverged(index))
            return []
        if not text.startswith(before):
            raise JobError(self._diverged(index))
        new = text[len(before):]
        self.emitted[index] = text
        return [new]

    @staticmethod
    def _diverged(index: int) -> str:
        return (f"the job restarted on another worker and sequence {index} came out different from the text "
                "already streamed (sampling without a seed); follow job.events() to see the restart")


def iter_text(events: Iterable[JobEvent], sequence: int | None = 0) -> Iterator[str]:
    """Text pieces of ``events`` (see :class:`TextFollower`)."""
    follower = TextFollower(sequence)
    for event in events:
        yield from follower.feed(event)


async def aiter_text(events: AsyncIterator[JobEvent], sequence: int | None = 0) -> AsyncIterator[str]:
    """Async :func:`iter_text`."""
    follower = TextFollower(sequence)
    async for event in events:
        for piece in follower.feed(event):
            yield piece
