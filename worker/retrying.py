"""Redis writes that must not be dropped: retried until Redis takes them (a restart, a failover)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis as redis_lib

from producers.redis_clients import NO_WAIT, ReplicaWait

logger = logging.getLogger(__name__)

RETRY_DELAY_S = 0.5
"""Pause between two tries of a write Redis refused."""


def pipeline_until_done(client: Any, fill: Callable[[Any], None], what: str, *,
                        wait: ReplicaWait = NO_WAIT) -> list:
    """Run ``fill(pipe)`` then the pipeline, again after each Redis error, until it succeeds; returns its replies.

    Used for results and acks: dropping either would lose a finished job's output or make
    kombu deliver it again. With ``wait`` the pipeline ends in ``WAIT``, so it returns
    once a replica holds the writes (results, before their jobs are acked).
    """
    while True:
        try:
            pipe = client.pipeline(transaction=False)
            fill(pipe)
            return wait.execute(pipe, what)
        except redis_lib.RedisError as error:
            logger.warning("cannot write %s (%s); retrying", what, error)
            time.sleep(RETRY_DELAY_S)
