"""The bookkeeping of :class:`producers.result_waiter.ResultWaiter`: which jobs are waited for, and what was read.

No I/O here. The book knows:

- every job id a wait names, or that the client submitted and still holds a
  ``Job`` for (tracked through a weak reference, so a dropped job costs nothing);
- the final Celery meta of each, once read, until its wait takes it;
- the open waits, each with the ids it needs and a callback for when all are in.

From that it plans each read: the channel of each wait's first missing job (the
one pub/sub subscription per wait) and the keys worth one MGET, namely every
wait's missing ids plus up to :data:`WINDOW` of the client's other unfinished
jobs, oldest first.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
"""Celery states after which a result never changes (``celery.states.READY_STATES``)."""

WINDOW = 256
"""Most keys one MGET reads beyond the ids being waited on (and most per wait)."""


@dataclass(eq=False)
class Entry:
    """One job id: who holds it, and its final meta once read."""

    job_id: str
    key: str
    owner: Any = None  # weakref to the Job (or stream) that submitted it, or None
    meta: dict[str, Any] | None = None
    waits: int = 0
    early: bool = False  # its channel was subscribed to before the job was published

    def wanted(self) -> bool:
        """True while a wait names the id or its owner is alive."""
        return self.waits > 0 or (self.owner is not None and self.owner() is not None)


@dataclass(eq=False)
class Wait:
    """One call waiting for some ids; ``notify`` runs once, when all are in or on error."""

    entries: list[Entry]
    notify: Callable[[], None]
    event: threading.Event | None = None  # a blocking caller's, set to hand it the lead
    error: BaseException | None = None
    finished: bool = False
    head: int = 0  # entries before this index have their meta

    def first_missing(self) -> Entry | None:
        """The first entry still without a result, or None."""
        while self.head < len(self.entries) and self.entries[self.head].meta is not None:
            self.head += 1
        return self.entries[self.head] if self.head < len(self.entries) else None


@dataclass
class ReadPlan:
    """What to do next: the channels to be subscribed to, and the keys to read (if a read is due)."""

    channels: set[str] = field(default_factory=set)
    keys: list[str] = field(default_factory=list)


class ResultBook:
    """Thread-safe record of a client's waits and results; ``prefix + job_id`` is a job's key and channel."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._unfinished: dict[str, Entry] = {}  # insertion (submission) order: the prefetch window
        self._waits: list[Wait] = []
        self._prune_at = 1024

    def _entry(self, job_id: str) -> Entry:
        entry = self._entries.get(job_id)
        if entry is None:
            entry = self._entries[job_id] = Entry(job_id, self.prefix + job_id)
            self._unfinished[job_id] = entry
        return entry

    def track(self, job_id: str, owner: Any) -> None:
        """Remember a submitted job while ``owner`` lives, so its result is read along with others'."""
        with self._lock:
            self._entry(job_id).owner = weakref.ref(owner)
            if len(self._entries) > self._prune_at:
                for entry in [e for e in self._entries.values() if not e.wanted()]:
                    self._forget(entry)
                self._prune_at = max(1024, 2 * len(self._entries))

    def alone(self, job_id: str) -> bool:
        """True when ``job_id`` is the only job of the client still without a result, and nobody waits."""
        with self._lock:
            return not self._waits and len(self._unfinished) == 1 and job_id in self._unfinished

    def mark_early(self, job_id: str) -> None:
        """Note that ``job_id``'s channel was subscribed to before the job was published."""
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is not None:
                entry.early = True

    def needs_read(self, wait: Wait, subscribed: set[str]) -> bool:
        """False when every missing job of ``wait`` was subscribed to before it was published: no read needed."""
        with self._lock:
            return any(e.meta is None and not (e.early and e.key in subscribed) for e in wait.entries)

    def open(self, job_ids: Iterable[str], notify: Callable[[], None], *,
             event: threading.Event | None = None, error: BaseException | None = None) -> Wait:
        """Register a wait; it is finished at once when every result is already in (or ``error`` is given)."""
        with self._lock:
            entries = [self._entry(job_id) for job_id in job_ids]
            for entry in entries:
                entry.waits += 1
            wait = Wait(entries, notify, event)
            if wait.first_missing() is None or error is not None:
                wait.error, wait.finished = error, True
            else:
                self._waits.append(wait)
            return wait

    def close(self, wait: Wait) -> dict[str, dict[str, Any]]:
        """Unregister a wait; returns the metas it got (the caller keeps them, the book lets go)."""
        with self._lock:
            if wait in self._waits:
                self._waits.remove(wait)
            metas = {}
            for entry in wait.entries:
                entry.waits -= 1
                if entry.meta is not None:
                    metas[entry.job_id] = entry.meta
                    self._forget(entry)
                elif not entry.wanted():
                    self._forget(entry)
            return metas

    def _forget(self, entry: Entry) -> None:
        if entry.waits <= 0 and self._entries.get(entry.job_id) is entry:
            del self._entries[entry.job_id]
            self._unfinished.pop(entry.job_id, None)

    def has_waits(self, *, blocking: bool | None = None) -> bool:
        """True while a wait is open (only blocking ones, or only async ones, when ``blocking`` says)."""
        with self._lock:
            return any(not w.finished and (blocking is None or (w.event is not None) == blocking)
                       for w in self._waits)

    def next_blocking_wait(self, skip: Wait | None = None) -> Wait | None:
        """The oldest unfinished wait of a blocked thread other than ``skip``, to hand the lead to."""
        with self._lock:
            return next((w for w in self._waits if not w.finished and w.event is not None and w is not skip), None)

    def plan(self, read: bool) -> ReadPlan:
        """The channels the waits need now and, if ``read``, the keys one MGET should read."""
        plan = ReadPlan()
        with self._lock:
            keys: dict[str, None] = {}
            for wait in self._waits:
                first = wait.first_missing()
                if first is None:
                    continue
                plan.channels.add(first.key)
                if read:
                    for entry in wait.entries[wait.head:wait.head + WINDOW]:
                        if entry.meta is None:
                            keys[entry.key] = None
            if read:
                budget, dead = len(keys) + WINDOW, []
                for entry in self._unfinished.values():
                    if len(keys) >= budget:
                        break
                    if entry.wanted():
                        keys[entry.key] = None
                    else:
                        dead.append(entry)
                for entry in dead:
                    self._forget(entry)
            plan.keys = list(keys)
        return plan

    def store(self, metas: Iterable[tuple[str, dict[str, Any]]]) -> bool:
        """Record final metas by key and notify the waits they finish; True if any was new."""
        done, new = [], False
        with self._lock:
            for key, meta in metas:
                entry = self._entries.get(key[len(self.prefix):])
                if entry is None or entry.meta is not None or meta.get("status") not in READY_STATES:
                    continue
                entry.meta, new = meta, True
                self._unfinished.pop(entry.job_id, None)
                if not entry.wanted():
                    self._forget(entry)
            for wait in self._waits:
                if not wait.finished and wait.first_missing() is None:
                    wait.finished = True
                    done.append(wait)
        for wait in done:
            wait.notify()
        return new

    def missing_unsubscribed(self, subscribed: set[str]) -> bool:
        """True when some job without its result (waited for, or tracked) is not among the ``subscribed`` channels:
        a read may find it, since no message will bring it."""
        with self._lock:
            return any(entry.key not in subscribed for entry in self._unfinished.values())

    def fail_all(self, error: BaseException) -> None:
        """Finish every open wait with ``error``."""
        with self._lock:
            failing = [wait for wait in self._waits if not wait.finished]
            for wait in failing:
                wait.error, wait.finished = error, True
        for wait in failing:
            wait.notify()
