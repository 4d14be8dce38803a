"""Wait for a job's result on asyncio without holding a thread.

Celery's ``AsyncResult.get`` blocks the calling thread, so ``await
asyncio.to_thread(job.result)`` ties up one worker thread of the event loop's
executor for the whole wait; a server with a few dozen open waits starves
every other ``to_thread`` call. Here the wait is an asyncio Redis
subscription to the channel Celery's Redis backend publishes each stored
state on (the result key itself), plus a ``GET`` of that key after
subscribing and after every message, so a result stored before the
subscription is never missed. A periodic re-read covers a message lost to a
Redis restart.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producers.client import FleetClient

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
"""Celery states after which a task's result no longer changes."""

REREAD_INTERVAL_S = 1.0
"""Longest time between two reads of the result key while a wait is idle."""


def async_redis_for(url: str) -> Any:
    """An asyncio Redis client on ``url`` (connections are made lazily, in the running loop)."""
    import redis.asyncio as aredis_lib

    return aredis_lib.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


async def wait_ready_meta(client: "FleetClient", task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
    """The task's decoded Celery meta once it is ready; None if ``timeout_s`` passes first."""
    backend = client.celery.backend
    key = backend.get_key_for_task(task_id)
    redis = client.async_results_redis()
    deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(key)
        while True:
            raw = await redis.get(key)
            if raw is not None:
                meta = backend.decode_result(raw)
                if meta.get("status") in READY_STATES:
                    return meta
            wait_s = REREAD_INTERVAL_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    return None
            # Any message on the channel means the state changed: loop back and read it.
            await pubsub.get_message(timeout=wait_s)
    finally:
        try:
            await asyncio.shield(pubsub.aclose())
        except Exception:  # the connection is dropped either way
            pass
