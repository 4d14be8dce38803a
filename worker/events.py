"""The worker's half of job event streams: a background writer that pipelines XADDs.

Generation loops call :meth:`EventWriter.emit` (a queue put, never a Redis
round trip) and go on with the next step. One writer thread drains the queue
and sends everything pending in one pipeline: ``XADD MAXLEN ~`` per event and
one ``EXPIRE`` per stream touched, so streams expire with the results.

A job's first event on this worker is preceded by a check of its stream: if it
already holds entries, an earlier run (a worker that died, a redelivery)
wrote them, and a ``restart`` event goes first so readers know text starts over.

Chunk progress goes the same way (:meth:`EventWriter.progress`): a finished chunk's
items are added to its job's counter once per chunk, and the new count becomes a
``progress`` event, in the writer's round trips rather than the chunk's.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Callable

from producers.constants import EVENTS_MAXLEN, JOB_KEY_PREFIX, PROGRESS_KEY_PREFIX
from producers.events import event_fields, events_key
from producers.schemas import EventKind

logger = logging.getLogger(__name__)

MAX_EVENTS_PER_FLUSH = 2048
"""Events sent in one pipeline at most."""

DONE_CHUNKS_SUFFIX = ":chunks"
"""``pipefleet:progress:<job_id>:chunks``: the set of chunk indexes already counted."""


class EventWriter:
    """Appends job events to Redis Streams from one background thread; see the module docstring.

    Work is queued as operations and runs in order on the writer thread:
    ``begin`` (restart check), ``emit`` (one event), ``progress`` (a finished
    chunk) and ``call`` (a function run on the writer thread that returns
    ``(job_id, kind, data)`` events to add; decoding tokens happens there, off
    the generation loop).
    """

    def __init__(self, redis: Any, *, ttl_s: int, maxlen: int = EVENTS_MAXLEN) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.events_written = 0
        self._queue: "queue.SimpleQueue[tuple[str, Any] | None]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="pipefleet-events", daemon=True)
        self._thread.start()

    def begin(self, job_id: str) -> None:
        """A run of ``job_id`` starts here: a ``restart`` event goes first if an earlier run left entries."""
        self._queue.put(("begin", job_id))

    def emit(self, job_id: str, kind: EventKind, data: dict[str, Any]) -> None:
        """Queue one event; returns at once."""
        self._queue.put(("emit", (job_id, kind, data)))

    def progress(self, job_id: str, chunk_index: int, n_items: int) -> None:
        """Count a finished chunk's items towards its job's progress, once per chunk; returns at once.

        A redelivered chunk (its worker died after the forward pass) must not count twice, or ``done``
        would pass ``total``: the set of counted chunks guards that. Progress is advisory (a finished
        job reports ``done == total`` from its result), so a count lost with its worker is harmless.
        """
        self._queue.put(("progress", (job_id, chunk_index, n_items)))

    def call(self, function: Callable[[], list]) -> None:
        """Run ``function`` on the writer thread, in order; it returns events to add."""
        self._queue.put(("call", function))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written (tests and shutdown)."""
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(5.0)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_EVENTS_PER_FLUSH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._write(batch)
            if stop:
                return

    def _write(self, batch: list) -> None:
        try:
            self._write_once(batch)
        except Exception:  # events are advisory next to the result; the loop must survive a Redis outage
            logger.warning("could not write a batch of %d job event operations", len(batch), exc_info=True)
        for op, value in batch:
            if op == "flush":
                value.set()

    def _write_once(self, batch: list) -> None:
        beginning = [value for op, value in batch if op == "begin"]
        restarted: set[str] = set()
        if beginning:
            pipe = self.redis.pipeline(transaction=False)
            for job_id in beginning:
                pipe.exists(events_key(job_id))
            restarted = {job_id for job_id, exists in zip(beginning, pipe.execute()) if exists}
        events: list[tuple[str, EventKind, dict]] = self._count_progress(
            [value for op, value in batch if op == "progress"])
        for op, value in batch:
            if op == "begin" and value in restarted:
                events.append((value, EventKind.RESTART,
                               {"reason": "the job runs again: its worker stopped before it finished"}))
            elif op == "emit":
                events.append(value)
            elif op == "call":
                try:
                    events.extend(value() or [])
                except Exception:  # one bad stream must not stop the others
                    logger.warning("a job event function failed", exc_info=True)
        if not events:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id, kind, data in events:
            pipe.xadd(events_key(job_id), event_fields(kind, data), maxlen=self.maxlen, approximate=True)
        for job_id in {job_id for job_id, _, _ in events}:
            pipe.expire(events_key(job_id), self.ttl_s)
        pipe.execute()
        self.events_written += len(events)

    def _count_progress(self, chunks: list[tuple[str, int, int]]) -> list[tuple[str, EventKind, dict]]:
        """Add each newly finished chunk to its job's counter; returns the ``progress`` events to write."""
        if not chunks:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id, chunk_index, _ in chunks:
            pipe.sadd(f"{PROGRESS_KEY_PREFIX}{job_id}{DONE_CHUNKS_SUFFIX}", chunk_index)
            pipe.expire(f"{PROGRESS_KEY_PREFIX}{job_id}{DONE_CHUNKS_SUFFIX}", self.ttl_s)
        added = pipe.execute()[::2]
        counted = [chunk for chunk, new in zip(chunks, added) if new]
        if not counted:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id, _, n_items in counted:
            pipe.incrby(f"{PROGRESS_KEY_PREFIX}{job_id}", n_items)
            pipe.expire(f"{PROGRESS_KEY_PREFIX}{job_id}", self.ttl_s)
            pipe.get(f"{JOB_KEY_PREFIX}{job_id}")
        replies = pipe.execute()
        events = []
        for (job_id, _, _), done, record in zip(counted, replies[::3], replies[2::3]):
            total = json.loads(record).get("total", 0) if record else 0
            events.append((job_id, EventKind.PROGRESS, {"done": done, "total": total}))
        return events
