"""One shared waiter per client: many jobs' results for a few Redis round trips, sync or async.

Celery's ``AsyncResult.get`` subscribes to a pub/sub channel per job and parses
every message through its result consumer, and an asyncio backend needs a
thread per waiting job. This waiter reads the very same results, Celery's
``celery-task-meta-<id>`` keys, decoded by the client's Celery backend, so every
result stays readable through ``AsyncResult`` and every error maps as before.

- **MGET, not one GET per job.** Each read takes the keys of every job being
  waited on plus up to :data:`~producers.result_book.WINDOW` of the client's
  other unfinished jobs, oldest first: jobs submitted together finish together,
  in one batch. A result read early is kept until its ``Job`` asks for it.
- **Woken by pub/sub, one channel per wait, not per job.** Each wait subscribes
  only to the channel of its first missing job (Celery's backend publishes each
  stored result there); when that result comes, the rest of the window is read
  in one MGET. A subscription is confirmed before the read that follows it, so
  no result slips between the two. A slow poll (:data:`MIN_POLL_S` doubling to
  :data:`MAX_POLL_S`) is the safety net for a result stored without a publish.
- **Whoever waits does the I/O.** A blocked thread leads the reads itself (no
  hand-off between threads on the single-caller path, which a profile showed
  to cost more than the reads); other blocked threads sleep on an ``Event``
  until their results are in or the lead is handed to them. Coroutines hold no
  thread: a background thread leads while only they wait, and resolves their futures.
- **Outages.** Through a Redis restart, waits go on (reconnect, resubscribe,
  re-read) until their own timeout; a refused password, or an outage longer
  than :data:`OUTAGE_GRACE_S`, fails them with :class:`FleetUnavailable`.

Measured by ``benchmarks/ceiling.py``: see the client section of the README.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterable

import redis as redis_lib

from producers.redis_clients import RedisOptions, redis_client
from producers.errors import FleetUnavailable
from producers.redis_access import as_fleet_unavailable, is_refusal
from producers.redis_internals import pubsub_socket
from producers.result_book import ResultBook, Wait

logger = logging.getLogger(__name__)

MIN_POLL_S = 0.05
"""First safety re-read of a wait that heard nothing; it doubles while nothing happens."""

MAX_POLL_S = 1.0
"""Longest pause between two safety re-reads."""

OUTAGE_GRACE_S = 60.0
"""How long waits ride out an unreachable Redis before they fail with FleetUnavailable."""

STALE_CHANNELS = 64
"""Subscriptions no wait needs any more are dropped once there are this many, in one command."""

CONFIRM_TIMEOUT_S = 10.0
"""How long Redis may take to confirm a subscription before the connection counts as broken."""


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ResultWaiter:
    """Waits for the Celery results of many jobs with one pub/sub connection and MGETs."""

    def __init__(self, backend: Any, url: str, redis_options: RedisOptions | None = None) -> None:
        self.backend = backend
        self.url = url
        key = backend.get_key_for_task("x")
        self.book = ResultBook((key.decode() if isinstance(key, bytes) else key)[:-1])
        self._redis = redis_client(url, redis_options, socket_connect_timeout=5, health_check_interval=30)
        self._lead = threading.Lock()
        self._thread_lock = threading.Lock()
        self._thread_alive = False
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # The leader's state (only the thread holding the lead touches it).
        self._pubsub: Any = None
        self._subscribed: set[str] = set()
        self._poll_s = MIN_POLL_S
        self._down_since: float | None = None
        self._last_error = ""
        # A channel nobody publishes on keeps the connection subscribed at all times, so a read
        # never skips the socket while (un)subscribe confirmations are still on their way.
        self._idle_channel = f"pipefleet:waiter:{uuid.uuid4()}"

    def track(self, job_id: str, owner: Any) -> None:
        """Remember a job about to be published while ``owner`` (its Job) lives, so its result is read with others'.

        A job submitted while nothing else is pending (a ``submit()`` then
        ``result()`` loop) has its channel subscribed to right away, before it
        is published: its wait then needs neither a confirmed subscription nor a
        first read, which saves two round trips per job.
        """
        self.book.track(job_id, owner)
        if self.book.alone(job_id) and self._lead.acquire(blocking=False):
            try:
                self._connect()
                key = self.book.prefix + job_id
                if key not in self._subscribed:
                    self._pubsub.subscribe(key)
                    self._subscribed.add(key)
                self.book.mark_early(job_id)
            except Exception:  # the wait will subscribe and read as usual
                self._drop_pubsub()
            finally:
                self._lead.release()

    def wait(self, job_ids: Iterable[str], timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Block until every id has a final result or ``timeout`` passes; returns the final metas read."""
        event = threading.Event()
        wait = self.book.open(job_ids, event.set, event=event, error=self._closed_error())
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not wait.finished and _left(deadline) != 0.0:
                if self._lead.acquire(blocking=False):
                    try:
                        self._lead_until(lambda: wait.finished, deadline,
                                         read=self.book.needs_read(wait, self._subscribed))
                    finally:
                        self._hand_over(skip=wait)
                else:
                    self._wake()  # the leader must plan for this wait too
                    event.wait(_left(deadline))
                    event.clear()
            if not wait.finished:
                self._last_look(wait)
        finally:
            metas = self.book.close(wait)
        return self._result(wait, metas)

    async def wait_async(self, job_ids: Iterable[str], timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """:meth:`wait` for asyncio: awaits a future resolved by the reading thread; holds no thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        wait = self.book.open(job_ids, lambda: loop.call_soon_threadsafe(resolve), error=self._closed_error())
        try:
            if not wait.finished:
                self._wake()
                self._ensure_thread()
                try:
                    await asyncio.wait_for(future, timeout)
                except asyncio.TimeoutError:
                    await asyncio.to_thread(self._last_look, wait)
        finally:
            metas = self.book.close(wait)
        return self._result(wait, metas)

    def close(self) -> None:
        """Stop reading and release the connections."""
        self._closed = True
        self.book.fail_all(FleetUnavailable("the client is closed"))
        self._wake()
        with self._lead:  # the current leader finishes its pass first
            self._drop_pubsub()
        for resource in (self._wake_r, self._wake_w, self._redis):
            try:
                resource.close()
            except Exception:  # closing is best effort
                pass

    def _last_look(self, wait: Wait) -> None:
        """At the timeout, read the missing results once more: one stored in time is never a timeout."""
        keys = [entry.key for entry in wait.entries if entry.meta is None]
        try:
            self._store(zip(keys, self._redis.mget(keys)))
        except Exception:  # Redis is away: the timeout stands
            logger.debug("no last look at %d results", len(keys), exc_info=True)

    @staticmethod
    def _result(wait: Wait, metas: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if wait.error is not None:
            raise wait.error
        return metas

    def _closed_error(self) -> FleetUnavailable | None:
        return FleetUnavailable("the client is closed") if self._closed else None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the pipe is full (a wake-up is pending already) or closed
            pass

    # ----------------------------------------------------------------- leading

    def _hand_over(self, skip: Wait | None = None) -> None:
        """Release the lead to the oldest blocked waiter, or to the thread that serves coroutines."""
        self._lead.release()
        waiting = self.book.next_blocking_wait(skip)
        if waiting is not None:
            waiting.event.set()
        elif self.book.has_waits(blocking=False):
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if not self._thread_alive and not self._closed:
                self._thread_alive = True
                threading.Thread(target=self._serve_coroutines, name="pipefleet-results", daemon=True).start()

    def _serve_coroutines(self) -> None:
        """Lead while coroutines wait (a blocked thread may hold the lead meanwhile: it serves them too)."""
        while True:
            with self._thread_lock:
                if self._closed or not self.book.has_waits(blocking=False):
                    self._thread_alive = False
                    return
            if self._lead.acquire(timeout=MIN_POLL_S):
                try:
                    self._lead_until(lambda: self._closed or not self.book.has_waits(blocking=False), None)
                finally:
                    self._hand_over()

    def _connect(self) -> bool:
        """Open the pub/sub connection if needed; True if it is new (nothing subscribed yet)."""
        if self._pubsub is not None:
            return False
        self._pubsub = self._redis.pubsub()
        self._pubsub.subscribe(self._idle_channel)
        self._subscribed = set()
        return True

    def _lead_until(self, done: Callable[[], bool], deadline: float | None, *, read: bool = True) -> None:
        """Read results for every open wait until ``done()`` or ``deadline``; never raises."""
        delay_s = 0.1
        while not done() and not self._closed:
            try:
                read = self._connect() or read
                self._catch_up(read)
                self._down_since, self._last_error, delay_s = None, "", 0.1
                left = _left(deadline)
                if done() or left == 0.0:
                    break
                heard = self._block(self._poll_s if left is None else min(self._poll_s, left), done)
                if heard is None:  # nothing at all: re-read everything, a little later next time
                    read, self._poll_s = True, min(2 * self._poll_s, MAX_POLL_S)
                else:
                    read, self._poll_s = heard, MIN_POLL_S
            except Exception as error:  # the lead must survive anything; the waits must hear of it
                self._on_error(error)
                left = _left(deadline)
                time.sleep(delay_s if left is None else min(delay_s, left))
                read, delay_s = True, min(2 * delay_s, 2.0)
        self._tidy()

    def _catch_up(self, read: bool) -> None:
        """Subscribe to each wait's first missing job and read the window, until neither changes."""
        while True:
            plan = self.book.plan(read)
            self._unsubscribe_stale(plan.channels)
            new = plan.channels - self._subscribed
            if new:
                self._pubsub.subscribe(*new)
                self._subscribed |= new
                # Read only once Redis has the subscription: a result stored in between is then
                # either in the MGET or in a message.
                self._confirm(new)
                read = True
                continue
            if not plan.keys:
                return
            self._store(zip(plan.keys, self._redis.mget(plan.keys)))
            read = False  # then plan again: the waits' first missing jobs may have moved on

    def _unsubscribe_stale(self, needed: set[str]) -> None:
        # A finished job's channel stays quiet, so channels are dropped in batches, not one command each.
        stale = self._subscribed - needed
        if len(stale) >= STALE_CHANNELS:
            self._pubsub.unsubscribe(*stale)
            self._subscribed -= stale

    def _confirm(self, channels: set[str]) -> None:
        waiting, deadline = set(channels), time.monotonic() + CONFIRM_TIMEOUT_S
        while waiting:
            message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is None:
                if time.monotonic() >= deadline:
                    raise redis_lib.TimeoutError("Redis did not confirm a subscription in time")
            elif message["type"] == "subscribe":
                waiting.discard(_text(message["channel"]))
            elif message["type"] == "message":
                self._store([(_text(message["channel"]), message["data"])])

    def _block(self, timeout: float, done: Callable[[], bool]) -> bool | None:
        """Wait for a wake-up or a message; whether to re-read the window, or None if nothing came.

        A new wait calls for a re-read; so does a result while some job still without its result is not
        subscribed to (the rest of a wait for many jobs, or jobs the client holds but does not await yet):
        batch mates have likely finished too, and one read finds them. A result while every missing job is
        subscribed to does not: their results come as messages. Re-reading after every result cost a client
        awaiting many single jobs of continuous batching, which end one engine step apart, an ``MGET`` of the
        whole window per job that found nothing new.
        """
        heard = self._drain(done)
        if heard is not None:
            return heard
        # redis-py offers no way to wait on a pub/sub connection and a second socket at once.
        readable, _, _ = select.select([pubsub_socket(self._pubsub), self._wake_r], [], [], timeout)
        if not readable:
            return None
        woken = self._wake_r in readable
        if woken:
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        heard = self._drain(done)
        return True if woken else bool(heard)

    def _drain(self, done: Callable[[], bool]) -> bool | None:
        """Handle the messages already readable (until ``done()``); None if none was a result, else whether to
        re-read (see :meth:`_block`).

        Messages left over when ``done()`` holds are handled by the next leader, which drains before it selects.
        """
        heard = None
        while not done():
            message = self._pubsub.get_message(timeout=0)
            if message is None:
                break
            if message["type"] != "message":  # (un)subscribe confirmations, health-check pongs
                continue
            self._store([(_text(message["channel"]), message["data"])])
            heard = False
        if heard is False:
            heard = self.book.missing_unsubscribed(self._subscribed)
        return heard

    def _store(self, pairs: Iterable[tuple[str, Any]]) -> bool:
        metas = []
        for key, raw in pairs:
            if raw is None:
                continue
            try:
                metas.append((key, self.backend.decode_result(raw)))
            except Exception as error:  # a result Celery cannot decode fails its job, not the waiter
                logger.warning("unreadable result at %s: %s", key, error)
                metas.append((key, {"status": "FAILURE", "result": {
                    "exc_type": "JobError", "exc_message": f"unreadable result: {error}"}}))
        return self.book.store(metas)

    def _tidy(self) -> None:
        """Before giving up the lead: drop the subscriptions no open wait needs."""
        try:
            if self._pubsub is not None:
                self._unsubscribe_stale(self.book.plan(False).channels)
        except Exception:  # the next leader reconnects
            self._drop_pubsub()

    def _on_error(self, error: Exception) -> None:
        self._drop_pubsub()
        self._down_since = self._down_since or time.monotonic()
        mapped = as_fleet_unavailable(error, self.url)
        if mapped is not None and (is_refusal(error) or time.monotonic() - self._down_since > OUTAGE_GRACE_S):
            self.book.fail_all(mapped)
        elif repr(error) != self._last_error:
            logger.warning("result waiter: %s; retrying", mapped or error, exc_info=mapped is None)
        self._last_error = repr(error)

    def _drop_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # the connection is gone already
                pass
        self._pubsub, self._subscribed = None, set()
