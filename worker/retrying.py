"""Redis writes that must not be dropped: retried with a capped exponential backoff, for a bounded time.

A result or an ack that Redis refuses (a restart, a Sentinel failover) is tried
again through redis-py's :class:`~redis.retry.Retry` with an
:class:`~redis.backoff.ExponentialBackoff`: pauses of 0.1, 0.2, 0.4 … seconds,
never more than :data:`BACKOFF_CAP_S`. Past ``bound_s`` (the fleet's
``redis_write_retry_s``, 30 s by default, well past a Sentinel failover) the
write raises :class:`~producers.errors.WriteFailed` naming what it could not
write. The caller then leaves the job unacked and lets go of it: the worker's
next lease renewal puts it back on its queue (:mod:`worker.lease`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, TypeVar

import redis as redis_lib
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producers.constants import WRITE_RETRY_S
from producers.errors import WriteFailed
from producers.redis_clients import NO_WAIT, ReplicaWait

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_DELAY_S = 0.5
"""Pause of the claim and watch loops after Redis refused a read (they retry for as long as the worker runs)."""

BACKOFF_BASE_S = 0.05
"""The first pause is twice this; each later pause doubles."""

BACKOFF_CAP_S = 2.0
"""The longest pause between two tries of a write."""


def write_until_done(do: Callable[[], T], what: str, *, bound_s: float = WRITE_RETRY_S,
                     on_retry: Callable[[], None] = lambda: None) -> T:
    """``do()``, tried again after each Redis error for up to ``bound_s``; raises :class:`WriteFailed` past it.

    ``what`` names the write in the log lines and in the error; ``on_retry`` runs
    after each failed try (a supervised thread reports that it is alive).
    """
    deadline = time.monotonic() + bound_s

    def failed(error: Exception) -> None:
        logger.warning("cannot write %s (%s); retrying", what, error)
        on_retry()

    retry = Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), retries=-1,
                  supported_errors=(redis_lib.RedisError,))
    try:
        return retry.call_with_retry(do, failed, is_retryable=lambda _: time.monotonic() < deadline)
    except redis_lib.RedisError as error:
        raise WriteFailed(f"could not write {what}: Redis refused it for {bound_s:g} s "
                          f"(redis_write_retry_s); last error: {error}") from error


def pipeline_until_done(client: Any, fill: Callable[[Any], None], what: str, *,
                        wait: ReplicaWait = NO_WAIT, bound_s: float = WRITE_RETRY_S) -> list:
    """Run ``fill(pipe)`` then the pipeline through :func:`write_until_done`; returns its replies.

    Used for results: dropping one would lose a finished job's output. With
    ``wait`` the pipeline ends in ``WAIT``, so it returns once a replica holds
    the writes (results, before their jobs are acked).
    """
    def attempt() -> list:
        pipe = client.pipeline(transaction=False)
        fill(pipe)
        return wait.execute(pipe, what)

    return write_until_done(attempt, what, bound_s=bound_s)
