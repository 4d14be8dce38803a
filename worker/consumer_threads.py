"""The bulk consumer's helper threads and its kombu channel stand-in: acks, queue watchers.

:class:`BulkAcker` removes acked tags (many per round trip, or at once for the
hot path's commit); :class:`QueueWatcher` wakes the claim loop when an empty
queue list gets a message; :class:`ClaimedChannel` is what kombu's
``Message.ack``/``reject`` call back into for claimed messages.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from typing import Callable

import redis as redis_lib

from producers.constants import WRITE_RETRY_S
from producers.errors import WriteFailed
from worker import kombu_layout
from worker.retrying import RETRY_DELAY_S, write_until_done
from worker.supervision import Supervisor, guarded

logger = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 1.0
"""Longest single blocking wait of a watcher and of the ack thread (so they notice shutdown and tick)."""


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

    def encode_body(self, body: bytes | str, encoding: str | None = None) -> tuple[bytes | str, str | None]:
        """Apply the transport's body encoding again (``Message.serializable``: a dead letter's raw message)."""
        if encoding == "base64":
            return base64.b64encode(body if isinstance(body, bytes) else body.encode()).decode(), encoding
        return body, encoding

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
    """Removes acked tags from kombu's unacked bookkeeping and this worker's lease, many per round trip.

    Runs on its own thread; :data:`worker.kombu_layout.ACK_SCRIPT` only acks tags
    this worker still holds.
    """

    def __init__(self, client: redis_lib.Redis, worker: str, supervisor: Supervisor, *,
                 write_retry_s: float = WRITE_RETRY_S,
                 let_go: Callable[[list[str]], None] = lambda tags: None) -> None:
        self._client = client
        self._let_go = let_go
        """Told of tags acked, or given up on (:meth:`worker.lease.LeaseKeeper.let_go`)."""
        self._write_retry_s = write_retry_s
        self._keys = kombu_layout.ack_keys(worker)
        self._script = client.register_script(kombu_layout.ACK_SCRIPT)
        self._supervisor = supervisor
        self._tags: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=guarded("acker", self._run), name="pipefleet-acker", daemon=True)
        self._stopped = threading.Event()
        supervisor.watch("acker", self._thread)

    def start(self) -> None:
        """Start the ack thread."""
        self._thread.start()

    def ack(self, tag: str) -> None:
        """Queue one tag for removal."""
        self._tags.put(tag)

    def ack_now(self, tags: list[str], on_retry: Callable[[], None] = lambda: None) -> None:
        """Remove ``tags`` on the calling thread, retrying through Redis errors (the hot path's commit).

        Done right after a job's result is stored, so the window in which a killed worker's finished job
        runs again is one round trip, not a wait in the ack queue. Past ``write_retry_s`` it raises
        :class:`~producers.errors.WriteFailed` and the tags stay in hand (the ack thread tries again).
        """
        write_until_done(lambda: self._script(keys=self._keys, args=tags), f"the acks of {len(tags)} jobs",
                         bound_s=self._write_retry_s, on_retry=on_retry)
        self._let_go(tags)

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
            self._supervisor.tick("acker")
            try:
                first = self._tags.get(timeout=WATCH_TIMEOUT_S)
            except queue.Empty:
                continue
            if first is None:
                break
            tags = self._drain(first)
            # Let go of whatever happens: a lease renewal puts back tags whose ack did not stick, and a claim
            # acks unrun those whose result is stored.
            try:
                self.ack_now(tags, on_retry=lambda: self._supervisor.tick("acker"))
            except WriteFailed as error:
                logger.error("%s; the next lease renewal puts them back on their queues; acking on", error)
            except Exception:  # never lose the loop
                logger.exception("could not ack %d jobs", len(tags))
            finally:
                self._let_go(tags)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush every queued ack, then stop the thread."""
        self._tags.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)


class QueueWatcher:
    """One thread per queue list; calls ``on_found(key)`` when an armed wait finds the list non-empty."""

    def __init__(self, client_factory: Callable[[], redis_lib.Redis], keys: list[str],
                 on_found: Callable[[str], None], supervisor: Supervisor) -> None:
        self._client_factory = client_factory
        self._keys = keys
        self._on_found = on_found
        self._supervisor = supervisor
        self.armed = threading.Event()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=guarded(f"watch-{i}", self._watch), args=(key, f"watch-{i}"),
                                          name=f"pipefleet-watch-{i}", daemon=True)
                         for i, key in enumerate(keys)]
        for i, thread in enumerate(self._threads):
            supervisor.watch(f"watch-{i}", thread)

    def start(self) -> None:
        """Start one watcher thread per key."""
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask the watchers to end after their current wait."""
        self._stopping.set()
        self.armed.set()

    def _watch(self, key: str, name: str) -> None:
        client = self._client_factory()
        while not self._stopping.is_set():
            self._supervisor.tick(name)
            if not self.armed.wait(WATCH_TIMEOUT_S):
                continue
            try:
                found = client.blmove(key, key, WATCH_TIMEOUT_S, "LEFT", "LEFT")
            except redis_lib.RedisError as error:
                logger.debug("watcher of %r: %s", key, error)
                time.sleep(RETRY_DELAY_S)
                continue
            except Exception:  # a wake-up helper: log it and keep watching
                logger.exception("watcher of %r failed one round", key)
                time.sleep(RETRY_DELAY_S)
                continue
            if found is not None:
                self.armed.clear()
                self._on_found(key)
