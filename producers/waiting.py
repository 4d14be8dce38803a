"""Wait for a job's result on asyncio without holding a thread or a connection per wait.

Celery's ``AsyncResult.get`` blocks the calling thread, so ``await
asyncio.to_thread(job.result)`` ties up one executor thread for the whole
wait; a server with a few dozen open waits starves every other
``to_thread`` call. Here each client (per event loop) keeps one
:class:`ResultListener`: a single Redis pub/sub connection subscribed to the
channels Celery's Redis backend publishes each stored state on (the result
key itself), waking the waits of that key. A wait subscribes first, then
reads the key, and reads it again after every wake-up, so a result stored
before the subscription is never missed; a periodic re-read covers a message
lost to a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from producers.client import FleetClient

logger = logging.getLogger(__name__)

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
"""Celery states after which a task's result no longer changes."""

REREAD_INTERVAL_S = 1.0
"""Longest time between two reads of the result key while a wait is idle."""

MAX_CONNECTIONS = 64
"""Connections of a client's asyncio pool; more concurrent commands wait for one rather than fail."""

RECONNECT_DELAY_S = 0.5
"""Pause of the listener after its pub/sub connection failed, before it reads again."""


_thread_state = threading.local()
_install_lock = threading.Lock()


def _install_switch(backend: Any) -> None:
    with _install_lock:
        if getattr(backend, "_pipefleet_switch", False):
            return
        subscribe = backend.on_task_call

        def on_task_call(producer: Any, task_id: str) -> None:
            if not getattr(_thread_state, "detached", False):
                subscribe(producer, task_id)

        backend.on_task_call = on_task_call
        backend._pipefleet_switch = True


@contextlib.contextmanager
def without_result_subscription(celery_app: Any) -> Iterator[None]:
    """Tasks this thread sends inside skip Celery's early subscription to their result channel.

    Celery subscribes its shared pub/sub connection to each task it sends so a
    later ``AsyncResult.get`` finds the result fast. Async waits never read
    that connection, and unread subscriptions and messages would pile up
    there; a sync ``get`` still subscribes on demand.
    """
    _install_switch(celery_app.backend)
    _thread_state.detached = True
    try:
        yield
    finally:
        _thread_state.detached = False


def async_redis_for(url: str) -> Any:
    """An asyncio Redis client on ``url`` whose pool makes bursts wait for a connection.

    No periodic health check: on a pub/sub connection it reads a PONG from
    whatever coroutine happens to send, racing the listener's own read.
    """
    import redis.asyncio as aredis_lib

    pool = aredis_lib.BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=30,
                                                      socket_connect_timeout=5)
    return aredis_lib.Redis(connection_pool=pool)


class ResultListener:
    """One pub/sub connection shared by every result wait of a client in one event loop.

    Only the reader task reads from the connection; subscribes and
    unsubscribes only write, one at a time. When the connection fails, the
    reader replaces it with a new one, resubscribes every watched key and
    wakes every wait, so each reads its key again.
    """

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self._lock = asyncio.Lock()
        self._broken = False
        self._reader: asyncio.Task | None = None

    async def watch(self, key: str) -> asyncio.Event:
        """An event set whenever ``key``'s channel carries a message; pair with :meth:`unwatch`."""
        event = asyncio.Event()
        async with self._lock:
            waiters = self.waiters.setdefault(key, set())
            waiters.add(event)
            if len(waiters) == 1 and not self._broken:
                try:
                    await self.pubsub.subscribe(key)
                except Exception:  # the reader reconnects and resubscribes; the wait re-reads meanwhile
                    logger.warning("result listener could not subscribe; reconnecting", exc_info=True)
                    self._broken = True
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return event

    async def unwatch(self, key: str, event: asyncio.Event) -> None:
        """Stop waking ``event``; unsubscribe once nobody watches ``key``."""
        async with self._lock:
            waiters = self.waiters.get(key)
            if waiters is None:
                return
            waiters.discard(event)
            if waiters:
                return
            del self.waiters[key]
            if not self._broken:
                try:
                    await self.pubsub.unsubscribe(key)
                except Exception:  # the reader replaces the connection, without this key
                    self._broken = True

    async def _read(self) -> None:
        while self.waiters:
            if self._broken:
                await self._reconnect()
                continue
            try:
                message = await self.pubsub.get_message(timeout=REREAD_INTERVAL_S)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.waiters:
                    logger.warning("result listener lost its Redis connection; reconnecting", exc_info=True)
                    self._broken = True
                continue
            if message is None:
                continue
            channel = message.get("channel")
            channel = channel.decode() if isinstance(channel, bytes) else str(channel)
            for event in self.waiters.get(channel, ()):
                event.set()

    async def _reconnect(self) -> None:
        await asyncio.sleep(RECONNECT_DELAY_S)
        async with self._lock:
            old, self.pubsub = self.pubsub, self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await old.aclose()
            except Exception:  # it is being thrown away
                pass
            try:
                if self.waiters:
                    await self.pubsub.subscribe(*self.waiters)
                self._broken = False
            except Exception:
                logger.warning("result listener could not reconnect; retrying", exc_info=True)
            # Results stored while the connection was down were published to nobody.
            for events in self.waiters.values():
                for event in events:
                    event.set()

    async def aclose(self) -> None:
        """Stop reading and drop the connection."""
        if self._reader is not None:
            self._reader.cancel()
        await self.pubsub.aclose()


async def wait_ready_meta(client: "FleetClient", task_id: str, timeout_s: float | None) -> dict[str, Any] | None:
    """The task's decoded Celery meta once it is ready; None if ``timeout_s`` passes first."""
    backend = client.celery.backend
    key = backend.get_key_for_task(task_id)
    key = key.decode() if isinstance(key, bytes) else key
    redis, listener = client.async_results()
    deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
    event = await listener.watch(key)
    try:
        while True:
            event.clear()
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
            try:
                await asyncio.wait_for(event.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await asyncio.shield(listener.unwatch(key, event))
