"""Supervision of the threads a worker relies on: liveness per thread, and a non-zero exit when one is lost.

Every loop catches what one message or one round can throw and goes on (its
own ``except Exception``). What it cannot survive ends the process: a thread
started through :func:`guarded` that dies exits the worker with
:data:`EXIT_THREAD_DIED`, so an orchestrator restarts it and the lease hands
its jobs to the fleet. A thread that lives but stops making progress (its
loop has not ticked for ``stall_after_s``) makes the worker unhealthy: the
advertisement and ``pipefleet worker --check`` say which thread, the lease is
no longer renewed (the fleet takes its jobs back), and after
``exit_after_s`` more the worker exits with :data:`EXIT_STALLED`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

EXIT_THREAD_DIED = 70
"""Exit status when a supervised thread dies of an exception no loop could survive."""

EXIT_STALLED = 71
"""Exit status when a supervised thread stayed stalled past the grace period."""

STALL_AFTER_S = 60.0
"""A ticking loop silent this long is stalled (its waits are at most a few seconds)."""

EXIT_AFTER_S = 15.0
"""How long a worker stays up, reporting itself unhealthy, before it exits over a stalled thread."""


def guarded(name: str, target: Callable[..., Any]) -> Callable[..., Any]:
    """``target`` as a thread body that exits the worker non-zero if an exception escapes it."""

    def run(*args: Any, **kwargs: Any) -> None:
        try:
            target(*args, **kwargs)
        except BaseException:
            logger.critical("thread %s died; the worker exits so that it is restarted", name, exc_info=True)
            logging.shutdown()
            os._exit(EXIT_THREAD_DIED)

    return run


class Supervisor:
    """Liveness of the worker's threads: which are alive, when each ticking loop last went round."""

    def __init__(self, *, stall_after_s: float = STALL_AFTER_S, exit_after_s: float = EXIT_AFTER_S,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.stall_after_s = stall_after_s
        self.exit_after_s = exit_after_s
        self._exit = exit
        self._threads: dict[str, threading.Thread] = {}
        self._ticks: dict[str, float] = {}
        self._unhealthy_since: float | None = None
        self._stopping = False

    def stop(self) -> None:
        """The worker is shutting down: threads that end now are not stalled."""
        self._stopping = True

    def watch(self, name: str, thread: threading.Thread, *, ticks: bool = True) -> None:
        """Supervise ``thread``; with ``ticks`` its loop calls :meth:`tick` at least every few seconds."""
        self._threads[name] = thread
        if ticks:
            self._ticks[name] = time.monotonic()

    def tick(self, name: str) -> None:
        """The loop ``name`` went round (cheap: one dict write)."""
        self._ticks[name] = time.monotonic()

    def liveness(self) -> dict[str, float]:
        """Seconds since each supervised loop last ticked (0 for threads that do not tick; -1 if dead)."""
        now = time.monotonic()
        report = {}
        for name, thread in list(self._threads.items()):
            if not thread.is_alive():
                report[name] = -1.0
            else:
                report[name] = round(now - self._ticks[name], 3) if name in self._ticks else 0.0
        return report

    def stalled(self) -> list[str]:
        """Threads that started and died, or whose loop has not ticked within ``stall_after_s``."""
        if self._stopping:
            return []
        now = time.monotonic()
        return [name for name, thread in list(self._threads.items())
                if (thread.ident is not None and not thread.is_alive())
                or (thread.is_alive() and now - self._ticks.get(name, now) > self.stall_after_s)]

    def healthy(self) -> bool:
        """True when nothing is stalled; exits the worker once it has been unhealthy for ``exit_after_s``."""
        stalled = self.stalled()
        if not stalled:
            self._unhealthy_since = None
            return True
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
            logger.error("stalled threads: %s; the worker reports itself unhealthy and exits in %ss unless they "
                         "recover", ", ".join(stalled), self.exit_after_s)
        elif now - self._unhealthy_since > self.exit_after_s:
            logger.critical("threads %s stayed stalled; exiting so that the worker is restarted", ", ".join(stalled))
            logging.shutdown()
            self._exit(EXIT_STALLED)
        return False


def reliability_snapshot(runtime: Any) -> dict:
    """Ownership and health figures of a worker: recovered, orphaned and dead-lettered jobs, held jobs, thread
    liveness."""
    consumer = getattr(runtime, "consumer", None)
    supervisor = getattr(runtime, "supervisor", None)
    lease = consumer.lease if consumer is not None else None
    return {
        "recovered_jobs_total": lease.recovered if lease is not None else 0,
        "orphaned_claims_total": lease.orphans if lease is not None else 0,
        "held_jobs": lease.held if lease is not None else 0,
        "oldest_claim_age_s": round(lease.oldest_claim_age_s(), 3) if lease is not None else 0.0,
        "lease_lapses_total": lease.lapses if lease is not None else 0,
        "dead_lettered_total": consumer.dead_letters.count if consumer is not None else 0,
        "thread_liveness_s": supervisor.liveness() if supervisor is not None else {},
        "stalled_threads": supervisor.stalled() if supervisor is not None else [],
    }
