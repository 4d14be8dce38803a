"""Bulk, loss-free consumption of the deployment queues, as a Celery consumer bootstep.

kombu's Redis consumer pops one message per ``BRPOP`` and records it as unacked
in a second round trip; a worker killed between the two loses the message, and
the two round trips plus one ack per job cost more CPU than a small model. This
consumer instead:

1. claims up to its free capacity in one ``EVALSHA`` that pops the messages and
   records them in kombu's own unacked hash in the same atomic step
   (:data:`worker.kombu_layout.CLAIM_SCRIPT`), so a message is always in a queue
   or in the unacked hash, and kombu's sweeper redelivers it if this worker dies;
2. hands each message to Celery's own task strategy, so every job keeps its
   Celery request, id, result, revoke, events and chord membership;
3. acks in bulk: a background thread removes many finished tags per pipeline.

When it has capacity and the queues are empty it waits without taking anything:
one watcher thread per queue list blocks in ``BLMOVE key key LEFT LEFT`` (a
rotation of the list onto itself that leaves it unchanged) and wakes the claim
loop as soon as the list is non-empty. Redis has no multi-key blocking wait
that leaves the message in place, hence one watcher per list.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from typing import Any, Callable

import redis as redis_lib
from celery import bootsteps, signals
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.transport.virtual import Message
from vine import promise

from producers.redis_clients import RedisOptions, redis_client
from producers.constants import CANCEL_KEY_PREFIX
from worker import kombu_layout
from worker.retrying import RETRY_DELAY_S, pipeline_until_done

logger = logging.getLogger(__name__)

MAX_CLAIM = 256
"""Most messages taken in one claim, whatever the free capacity."""

WATCH_TIMEOUT_S = 1.0
"""Longest single blocking wait of a watcher (so it notices shutdown)."""

ACCEPT = frozenset({"application/json"})
"""Content types a job message may have: JSON only, never pickle."""


class ClaimedChannel:
    """The channel of claimed messages: what kombu's ``Message.ack``/``reject`` call back into."""

    no_ack_consumers = None

    def __init__(self, acker: "BulkAcker", requeue: Callable[[str], None]) -> None:
        self._acker = acker
        self._requeue = requeue

    def decode_body(self, body: str, encoding: str | None) -> bytes | str:
        """Undo the transport's body encoding (kombu's Redis transport uses base64)."""
        if encoding == "base64":
            return base64.b64decode(body)
        return body

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        """The job is done: drop it from the unacked bookkeeping (batched)."""
        self._acker.ack(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Give the message back to its queue, or drop it."""
        if requeue:
            self._requeue(delivery_tag)
        else:
            self._acker.ack(delivery_tag)


class BulkAcker:
    """Removes acked tags from kombu's unacked bookkeeping, many per round trip, on its own thread."""

    def __init__(self, client: redis_lib.Redis) -> None:
        self._client = client
        self._tags: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pipefleet-acker", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start the ack thread."""
        self._thread.start()

    def ack(self, tag: str) -> None:
        """Queue one tag for removal."""
        self._tags.put(tag)

    def _drain(self, first: str) -> list[str]:
        tags = [first]
        while True:
            try:
                tag = self._tags.get_nowait()
            except queue.Empty:
                return tags
            if tag is None:
                self._stopped.set()
                return tags
            tags.append(tag)

    def _run(self) -> None:
        while not self._stopped.is_set():
            first = self._tags.get()
            if first is None:
                break
            tags = self._drain(first)
            pipeline_until_done(self._client, lambda pipe, t=tags: kombu_layout.ack_commands(pipe, t),
                                f"the acks of {len(tags)} jobs")

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush every queued ack, then stop the thread."""
        self._tags.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)


class QueueWatcher:
    """One thread per queue list; sets ``wake`` when an armed wait finds the list non-empty."""

    def __init__(self, client_factory: Callable[[], redis_lib.Redis], keys: list[str],
                 wake: threading.Event) -> None:
        self._client_factory = client_factory
        self._keys = keys
        self._wake = wake
        self.armed = threading.Event()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(key,), name=f"pipefleet-watch-{i}", daemon=True)
                         for i, key in enumerate(keys)]

    def start(self) -> None:
        """Start one watcher thread per key."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask the watchers to end after their current wait."""
        self._stopping.set()
        self.armed.set()

    def _watch(self, key: str) -> None:
        client = self._client_factory()
        while not self._stopping.is_set():
            if not self.armed.wait(WATCH_TIMEOUT_S):
                continue
            try:
                found = client.blmove(key, key, WATCH_TIMEOUT_S, "LEFT", "LEFT")
            except redis_lib.RedisError as error:
                logger.debug("watcher of %r: %s", key, error)
                time.sleep(RETRY_DELAY_S)
                continue
            if found is not None:
                self.armed.clear()
                self._wake.set()


class BulkConsumer:
    """Claims messages from the deployment queues and hands them to Celery's task strategies."""

    def __init__(self, celery_consumer: Any, *, broker_url: str, queues: list[str],
                 priority_steps: tuple[int, ...], concurrency: int,
                 hot_path: Callable[[Any, Callable[[int], None]], Any] | None = None,
                 redis_options: RedisOptions | None = None) -> None:
        self._celery = celery_consumer
        self._broker_url = broker_url
        self._redis_options = redis_options
        self._concurrency = concurrency
        self._queue_keys = kombu_layout.priority_queue_keys(queues, priority_steps)
        self._client = redis_client(broker_url, redis_options)
        self._claim = self._client.register_script(kombu_layout.CLAIM_SCRIPT)
        self._keys = kombu_layout.claim_keys(self._queue_keys)
        self.acker = BulkAcker(redis_client(broker_url, redis_options))
        self.channel = ClaimedChannel(self.acker, self._requeue)
        self._wake = threading.Event()
        self._watcher = QueueWatcher(self._watch_client, self._queue_keys, self._wake)
        self._stopping = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipefleet-consumer", daemon=True)
        self._kombu_lock = threading.Lock()
        self._kombu_connection: Any = None
        signals.task_postrun.connect(self._on_task_done, weak=False)
        signals.task_revoked.connect(self._on_task_done, weak=False)
        self.hot_path = hot_path(celery_consumer, self._on_task_done) if hot_path is not None else None

    def _watch_client(self) -> redis_lib.Redis:
        return redis_client(self._broker_url, self._redis_options, socket_timeout=WATCH_TIMEOUT_S + 10)

    def start(self) -> None:
        """Start claiming, or resume after :meth:`pause` (Celery restarts its consumer after a reconnect)."""
        self._paused.clear()
        self._wake.set()
        if self._thread.is_alive():
            return
        self.acker.start()
        if self.hot_path is not None:
            self.hot_path.start()
        self._watcher.start()
        self._thread.start()
        logger.info("bulk consumer claiming from %d queue lists, up to %d jobs in hand",
                    len(self._queue_keys), self._concurrency)

    def pause(self) -> None:
        """Claim nothing until :meth:`start`; jobs in hand keep running."""
        self._paused.set()

    def stop(self) -> None:
        """Stop claiming for good; claimed jobs still run and are acked by :meth:`close`."""
        self._stopping.set()
        self._wake.set()
        self._watcher.stop()

    def close(self, drain_timeout_s: float = 60.0) -> None:
        """Stop claiming, let hot-path jobs finish, then flush the acks (after Celery's pool has stopped)."""
        self.stop()
        # A claim may be between its reply and its hand-over: let the loop finish it before handing back.
        if self._thread.is_alive():
            self._thread.join(WATCH_TIMEOUT_S + 5)
        if self.hot_path is not None:
            handed_back = self.hot_path.hand_back_unstarted()
            if handed_back:
                logger.info("handed %d unstarted jobs back to their queue", handed_back)
            if not self.hot_path.wait_idle(drain_timeout_s):
                logger.warning("%d jobs still running at shutdown; they stay unacked and are redelivered",
                               self.hot_path.in_hand)
            self.hot_path.stop()
        self.acker.close()

    def _on_task_done(self, *_: Any, **__: Any) -> None:
        self._wake.set()

    def _free(self) -> int:
        in_hand = self.hot_path.in_hand if self.hot_path is not None else 0
        return self._concurrency - len(worker_state.reserved_requests) - in_hand

    def _run(self) -> None:
        while not self._stopping.is_set():
            free = self._free()
            if free <= 0 or self._paused.is_set():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                raws = self._claim(keys=self._keys, args=[min(free, MAX_CLAIM), repr(time.time())])
            except redis_lib.RedisError as error:
                logger.warning("cannot claim jobs (%s); retrying", error)
                time.sleep(RETRY_DELAY_S)
                continue
            if raws:
                payloads = self._decode(raws)
                cancelled = self._cancelled(payloads)
                for payload in payloads:
                    self._deliver(payload, cancelled)
                continue
            self._wake.clear()
            self._watcher.armed.set()
            self._wake.wait(WATCH_TIMEOUT_S)
            self._watcher.armed.clear()

    @staticmethod
    def _decode(raws: list[bytes]) -> list[dict]:
        payloads = []
        for raw in raws:
            try:
                payloads.append(json.loads(raw))
            except ValueError as error:  # recorded as unacked but unreadable: keep it for inspection
                logger.error("unreadable message left in the unacked hash: %s", error)
        return payloads

    def _cancelled(self, payloads: list[dict]) -> set[str]:
        """Ids among these messages whose cancel flag is set: one MGET for the whole claim."""
        ids = [p.get("headers", {}).get("id") for p in payloads if isinstance(p.get("headers"), dict)]
        ids = [job_id for job_id in ids if isinstance(job_id, str)]
        if not ids:
            return set()
        try:
            flags = self._client.mget([f"{CANCEL_KEY_PREFIX}{job_id}" for job_id in ids])
        except redis_lib.RedisError as error:
            logger.warning("cannot read cancel flags (%s); the batcher reads them later", error)
            return set()
        return {job_id for job_id, flag in zip(ids, flags) if flag}

    def _deliver(self, payload: dict, cancelled: set[str]) -> None:
        """One claimed message into Celery, as ``Consumer.create_task_handler`` does."""
        celery = self._celery
        try:
            message = Message(payload, channel=self.channel)
        except Exception as error:
            logger.error("unreadable message left in the unacked hash: %s", error)
            return
        message.accept = ACCEPT
        try:
            if self.hot_path is not None and self.hot_path.offer(message, cancelled=message.headers.get("id")
                                                                  in cancelled):
                return
        except Exception:
            logger.exception("hot path refused message %s; handing it to Celery", message.delivery_tag)
        try:
            task_name = message.headers["task"]
        except (TypeError, KeyError):
            return celery.on_unknown_message(None, message)
        try:
            strategy = celery.strategies[task_name]
        except KeyError as error:
            return celery.on_unknown_task(None, message, error)
        try:
            strategy(message, None, promise(message.ack_log_error), promise(message.reject_log_error),
                     celery.on_task_message)
        except (InvalidTaskError, ContentDisallowed) as error:
            celery.on_invalid_task(None, message, error)
        except DecodeError as error:
            celery.on_decode_error(message, error)
        except Exception:
            logger.exception("could not hand message %s to Celery; it stays unacked for redelivery",
                             message.delivery_tag)

    def _requeue(self, tag: str) -> None:
        # kombu's own restore: the message goes back to its queue and priority step, marked redelivered.
        with self._kombu_lock:
            if self._kombu_connection is None:
                self._kombu_connection = self._celery.app.connection_for_write()
            self._kombu_connection.default_channel.qos.restore_by_tag(tag, leftmost=True)


def bulk_consumer_step(*, broker_url: str, queues: list[str], priority_steps: tuple[int, ...],
                       concurrency: int, on_create: Callable[[BulkConsumer], None],
                       hot_path: Callable[[Any, Callable[[int], None]], Any] | None = None,
                       redis_options: RedisOptions | None = None) -> type:
    """A consumer bootstep class that runs a :class:`BulkConsumer` on ``queues``."""

    class BulkConsumerStep(bootsteps.StartStopStep):
        """Claims jobs from the deployment queues (pipefleet's bulk consumer)."""

        requires = ("celery.worker.consumer.tasks:Tasks",)
        name = "pipefleet.BulkConsumer"

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.consumer: BulkConsumer | None = None

        def start(self, c: Any) -> None:
            if self.consumer is None:
                self.consumer = BulkConsumer(c, broker_url=broker_url, queues=queues,
                                             priority_steps=priority_steps, concurrency=concurrency,
                                             hot_path=hot_path, redis_options=redis_options)
                on_create(self.consumer)
            self.consumer.start()

        def stop(self, c: Any) -> None:
            # Celery stops its consumer both to reconnect (then starts it again) and to shut down.
            if self.consumer is not None:
                self.consumer.pause()

        def shutdown(self, c: Any) -> None:
            if self.consumer is not None:
                self.consumer.stop()

    return BulkConsumerStep
