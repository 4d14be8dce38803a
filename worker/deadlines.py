"""Job deadlines, one mechanism: a wall-clock ``deadline_ts`` from the client, one monotonic instant here.

:func:`monotonic_deadline` turns the client's deadline into this process's clock once, when a job is prepared;
that instant travels with each of the job's items, so the batcher drops an item whose deadline passed before
its forward pass and the continuous engine stops one that passes while it generates. What waits for a job's
items ends the wait at the same instant, with the same error (:func:`passed_deadline`):

- the hot path's many jobs share one :class:`DeadlineWatch` thread;
- a job in Celery's own task (a chunk, a split window) waits in :func:`wait_for_items`.

:class:`DeadlineWatch` keeps deadlines in a heap, earliest first; its thread sleeps until the earliest one (at
most :data:`TICK_S`, so its supervisor sees it go round) and hands each passed job id to ``on_expired``. A job
that finished first leaves its entry behind; the heap drops such entries before it outgrows the live jobs.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from concurrent.futures import Future, wait
from typing import Any, Callable, Mapping

from producers.errors import JobTimeout
from worker.supervision import Supervisor, guarded

logger = logging.getLogger(__name__)

TICK_S = 1.0
"""Longest wait of the hot path's deadline and commit loops, so their supervisor sees them go round."""


def monotonic_deadline(deadline_ts: float | None) -> float | None:
    """The client's deadline (epoch seconds) on this process's ``time.monotonic()`` clock; None for none."""
    if deadline_ts is None:
        return None
    return time.monotonic() + (deadline_ts - time.time())


def passed_deadline(unfinished: int, total: int) -> JobTimeout:
    """The error of a job whose deadline passed with ``unfinished`` of its ``total`` items not done."""
    return JobTimeout(f"job passed its deadline with {unfinished} of {total} items unfinished")


def wait_for_items(futures: list[Future], deadline_mono: float | None) -> None:
    """Block until every future is done, or raise :func:`passed_deadline` (cancelling the rest) at the deadline."""
    timeout = None if deadline_mono is None else max(0.0, deadline_mono - time.monotonic())
    _, not_done = wait(futures, timeout=timeout)
    if not_done:
        for future in not_done:
            future.cancel()
        raise passed_deadline(len(not_done), len(futures))


class DeadlineWatch:
    """Calls ``on_expired(job_id)`` once each added deadline passes; ``live`` holds the jobs still running."""

    def __init__(self, on_expired: Callable[[str], None], *, live: Mapping[str, Any], supervisor: Supervisor,
                 name: str = "deadlines") -> None:
        self._on_expired = on_expired
        self._live = live
        self._supervisor = supervisor
        self._name = name
        self._deadlines: list[tuple[float, int, str]] = []
        self._cv = threading.Condition()
        self._sequence = 0
        self._stopping = False
        self.thread = threading.Thread(target=guarded(name, self._loop), name=f"pipefleet-{name}", daemon=True)
        supervisor.watch(name, self.thread)

    def start(self) -> None:
        """Start the watch thread."""
        self.thread.start()

    def stop(self) -> None:
        """Let the watch thread end (it expires nothing more)."""
        self._stopping = True
        with self._cv:
            self._cv.notify()

    def add(self, deadline_mono: float, job_id: str) -> None:
        """Watch ``job_id``, whose deadline is ``deadline_mono`` (``time.monotonic()`` clock)."""
        with self._cv:
            self._sequence += 1
            heapq.heappush(self._deadlines, (deadline_mono, self._sequence, job_id))
            if len(self._deadlines) > 2 * len(self._live) + 1024:
                self._deadlines = [entry for entry in self._deadlines if entry[2] in self._live]
                heapq.heapify(self._deadlines)
            self._cv.notify()

    def _loop(self) -> None:
        while not self._stopping:
            self._supervisor.tick(self._name)
            try:
                self._expire_next()
            except Exception:  # one job's expiry must not end the watch over every other deadline
                logger.exception("deadline watch failed one round")

    def _expire_next(self) -> None:
        with self._cv:
            if not self._stopping and (not self._deadlines or self._deadlines[0][0] > time.monotonic()):
                timeout = TICK_S if not self._deadlines else min(TICK_S, self._deadlines[0][0] - time.monotonic())
                self._cv.wait(max(0.0, timeout))
                return
            if self._stopping:
                return
            _, _, job_id = heapq.heappop(self._deadlines)
        self._on_expired(job_id)
