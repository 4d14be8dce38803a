"""Bulk, loss-free consumption of the deployment queues, as a Celery consumer bootstep.

kombu's Redis consumer pops one message per ``BRPOP`` and records it as unacked
in a second round trip; a worker killed between the two loses the message, and
the two round trips plus one ack per job cost more CPU than a small model. This
consumer instead:

1. claims up to its free capacity in one ``EVALSHA`` that pops the messages and
   records them in kombu's own unacked hash and in this worker's lease in the
   same atomic step (:data:`worker.kombu_layout.CLAIM_SCRIPT`), so a message is
   always in a queue or held by a live worker's lease (:mod:`worker.lease`:
   when the worker dies its jobs go back within seconds); deployments of one
   priority step are served round robin, a batch each per turn;
2. dead-letters poison messages (:mod:`worker.dead_letters`) and hands each
   other message to its task's Celery strategy, as Celery's consumer does
   (``infer``'s strategy offers plain jobs to the hot path, :mod:`worker.strategy`),
   so every job keeps its Celery id, result, revoke, events and chord membership;
3. acks in bulk: a background thread removes many finished tags per round trip.

Every loop here survives an exception in one message and ticks its
:class:`~worker.supervision.Supervisor` entry, so a stall is seen.

When it has capacity and the queues are empty it waits without taking anything:
one watcher thread per queue list blocks in ``BLMOVE key key LEFT LEFT`` (a
rotation of the list onto itself that leaves it unchanged) and wakes the claim
loop as soon as the list is non-empty. Redis has no multi-key blocking wait
that leaves the message in place, hence one watcher per list.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import redis as redis_lib
from celery import bootsteps, signals
from celery.states import READY_STATES
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.transport.virtual import Message
from vine import promise

from producers.constants import LEASE_TTL_S, WRITE_RETRY_S
from producers.redis_clients import RedisOptions, redis_client
from worker import kombu_layout
from worker.consumer_threads import WATCH_TIMEOUT_S, BulkAcker, ClaimedChannel, QueueWatcher
from worker.dead_letters import DeadLetters, PoisonMessage, decode_strict, envelope_problem, job_id_of
from worker.lease import LeaseKeeper
from worker.retrying import RETRY_DELAY_S
from worker.supervision import Supervisor, guarded

logger = logging.getLogger(__name__)
job_logger = logging.getLogger("pipefleet.jobs")

MAX_CLAIM = 256
"""Most messages taken in one claim, whatever the free capacity."""

ACCEPT = frozenset({"application/json"})
"""Content types a job message may have: JSON only, never pickle."""


class BulkConsumer:
    """Claims messages from the deployment queues and hands them to Celery's task strategies."""

    def __init__(self, celery_consumer: Any, *, broker_url: str, queues: list[str],
                 priority_steps: tuple[int, ...], concurrency: int, worker: str, supervisor: Supervisor,
                 quanta: list[int] | None = None, lease_ttl_s: float = LEASE_TTL_S,
                 visibility_timeout_s: float = 3600,
                 hot_path: Callable[..., Any] | None = None,
                 holding: Callable[[], ContextManager[None]] = nullcontext,
                 redis_options: RedisOptions | None = None, write_retry_s: float = WRITE_RETRY_S) -> None:
        self._celery = celery_consumer
        self._broker_url = broker_url
        self._redis_options = redis_options
        self._concurrency = concurrency
        self._worker = worker
        self._supervisor = supervisor
        self._visibility_timeout_s = visibility_timeout_s
        self._queue_keys = kombu_layout.priority_queue_keys(queues, priority_steps)
        self._quanta = list(quanta or [MAX_CLAIM] * len(queues))
        self._first = 0
        self._holding = holding
        """Holds the device runners' flush decisions while a claim's jobs are handed over
        (:meth:`worker.runtime.Runtime.holding_runners`)."""
        self._client = redis_client(broker_url, redis_options)
        self._claim = self._client.register_script(kombu_layout.CLAIM_SCRIPT)
        self._keys = kombu_layout.claim_keys(self._queue_keys, worker)
        self.dead_letters = DeadLetters(self._client, worker, celery_consumer.app.backend)
        self.lease = LeaseKeeper(redis_client(broker_url, redis_options), worker, ttl_s=lease_ttl_s,
                                 healthy=supervisor.healthy, tick=lambda: supervisor.tick("lease"),
                                 chores=[self._sweep_poison])
        supervisor.watch("lease", self.lease.thread)
        self.acker = BulkAcker(redis_client(broker_url, redis_options), worker, supervisor,
                               write_retry_s=write_retry_s, let_go=self.lease.let_go)
        self.channel = ClaimedChannel(self.acker, self._requeue)
        self._wake = threading.Event()
        self._ready: frozenset[str] = frozenset()
        """Queue lists that held a message at the last claim (from its reply) or that a watcher found since."""
        self._watcher = QueueWatcher(self._watch_client, self._queue_keys, self._on_found, supervisor)
        self._stopping = threading.Event()
        self._paused = threading.Event()
        self.redelivered_done = 0
        """Jobs put back from a dead worker that had already stored their results: acked, not run again."""
        self._thread = threading.Thread(target=guarded("claim", self._run), name="pipefleet-consumer", daemon=True)
        supervisor.watch("claim", self._thread)
        signals.task_postrun.connect(self._on_task_done, weak=False)
        signals.task_revoked.connect(self._on_task_done, weak=False)
        self._shutting_down = threading.Event()
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)
        self.hot_path = (hot_path(celery_consumer, self._on_task_done, self._dead_letter_job, self.acker.ack_now)
                         if hot_path is not None else None)

    def _watch_client(self) -> redis_lib.Redis:
        return redis_client(self._broker_url, self._redis_options, socket_timeout=WATCH_TIMEOUT_S + 10)

    def start(self) -> None:
        """Start claiming, or resume after :meth:`pause` (Celery restarts its consumer after a reconnect)."""
        self._paused.clear()
        self._wake.set()
        if self._thread.is_alive():
            return
        self.lease.start()
        self.acker.start()
        if self.hot_path is not None:
            self.hot_path.start()
        self._watcher.start()
        self._thread.start()
        logger.info("bulk consumer claiming from %d queue lists, up to %d jobs in hand, lease %ss",
                    len(self._queue_keys), self._concurrency, self.lease.ttl_s)

    def pause(self) -> None:
        """Claim nothing until :meth:`start`; jobs in hand keep running."""
        self._paused.set()

    def stop(self) -> None:
        """Stop claiming for good; claimed jobs still run and are acked by :meth:`close`."""
        self._stopping.set()
        self._wake.set()
        self._watcher.stop()

    def close(self, drain_timeout_s: float = 60.0) -> None:
        """Stop claiming, hand back unstarted jobs, let the others finish, flush the acks, give the lease up."""
        self.stop()
        # A claim may be between its reply and its hand-over: let the loop finish it before handing back.
        if self._thread.is_alive():
            self._thread.join(WATCH_TIMEOUT_S + 5)
        if self.hot_path is not None:
            handed_back = self.hot_path.hand_back_unstarted()
            if handed_back:
                logger.info("handed %d unstarted jobs back to their queue", handed_back)
            if not self.hot_path.wait_idle(drain_timeout_s):
                logger.warning("%d jobs still running at shutdown; they go back to their queue with the lease",
                               self.hot_path.in_hand)
            self.hot_path.stop()
        self.acker.close()
        self.lease.stop()

    def has_ready(self, queue_keys: list[str]) -> bool:
        """Whether any of these queue lists held a message at the last claim, or has got one since.

        Read by the batchers' flush rule 2 on the inference thread, in place of a round trip to Redis.
        """
        ready = self._ready
        return any(key in ready for key in queue_keys)

    def _on_found(self, key: str) -> None:
        """A watcher found ``key`` non-empty: note it and wake the claim loop."""
        self._ready = self._ready | {key}
        self._wake.set()

    def _on_task_done(self, *_: Any, **__: Any) -> None:
        # Freed capacity matters only to a loop that waits for it; one waiting on its watchers (every list was
        # empty) is woken by them when a job comes.
        if not self._watcher.armed.is_set():
            self._wake.set()

    def _on_shutting_down(self, *_: Any, **__: Any) -> None:
        # Celery's warm shutdown starts (SIGTERM): its pool takes no new task from here on, so claim nothing more.
        self._shutting_down.set()

    def _free(self) -> int:
        in_hand = self.hot_path.in_hand if self.hot_path is not None else 0
        return self._concurrency - len(worker_state.reserved_requests) - in_hand

    def _sweep_poison(self) -> None:
        self.dead_letters.sweep_unacked(self._visibility_timeout_s, self._celery.strategies)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._supervisor.tick("claim")
            try:
                self._round()
            except redis_lib.RedisError as error:
                logger.warning("cannot claim jobs (%s); retrying", error)
                time.sleep(RETRY_DELAY_S)
            except Exception:  # one bad round must not stop claiming for good
                logger.exception("claim round failed; claiming again")
                time.sleep(RETRY_DELAY_S)

    def _round(self) -> None:
        free = self._free()
        if free <= 0 or self._paused.is_set() or self._shutting_down.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            return
        self._first = (self._first + 1) % len(self._quanta)
        with self.lease.claiming() as now:
            claim = kombu_layout.parse_claim_reply(self._claim(keys=self._keys, args=kombu_layout.claim_args(
                min(free, MAX_CLAIM), now, self._worker, self._quanta, self._first)), self._queue_keys)
            self.lease.hold(message.tag for message in claim.messages if message.tag)
        if claim.lengths is not None:
            self._ready = frozenset(key for key, length in claim.lengths.items() if length)
        with self._holding():
            if claim.messages:
                self._hand_over(claim.messages)
                if self._ready:
                    return
            # Every list was empty when this claim ran: wait for the watchers instead of claiming again.
            self._wake.clear()
            self._watcher.armed.set()
        self._wake.wait(WATCH_TIMEOUT_S)
        self._watcher.armed.clear()

    def _hand_over(self, messages: list[kombu_layout.ClaimedMessage]) -> None:
        """Deliver a claim's runnable messages; ack those whose result a dead holder stored already."""
        claimed, redelivered = self._decode(messages)
        stored = self._already_stored(redelivered)
        for message, payload in claimed:
            if message.tag in stored:
                self._ack_stored(message.tag, payload, stored[message.tag])
            else:
                self._deliver_or_dead_letter(message.tag, message.raw, payload, message.cancelled)

    def _decode(self, messages: list[kombu_layout.ClaimedMessage]
                ) -> tuple[list[tuple[kombu_layout.ClaimedMessage, dict]], dict[str, str]]:
        """``(message, payload)`` of each runnable message, and ``{tag: job id}`` of those put back from a dead
        worker; poison goes to the dead-letter list."""
        known = self._celery.strategies
        claimed = []
        redelivered = {}
        for message in messages:
            if not message.tag:  # the claim script already moved it to the dead-letter list
                self.dead_letters.record(message.raw, "not a kombu message (no delivery tag)")
                continue
            try:
                payload = decode_strict(message.raw)
                problem = envelope_problem(payload, known)
            except PoisonMessage as error:
                payload, problem = None, str(error)
            if problem is None:
                claimed.append((message, payload))
                if message.redelivered:
                    redelivered[message.tag] = payload["headers"]["id"]
            else:
                self._dead_letter(message.tag, problem, message.raw, job_id_of(payload))
        return claimed, redelivered

    def _already_stored(self, redelivered: dict[str, str]) -> dict[str, str]:
        """``{tag: final state}`` of the redelivered jobs whose result their dead holder stored before its ack.

        One MGET on the result store, and only for jobs the reap put back; an
        unreadable store runs them (the first stored result still stands).
        """
        if not redelivered:
            return {}
        backend = self._celery.app.backend
        try:
            records = backend.client.mget([backend.get_key_for_task(job_id) for job_id in redelivered.values()])
        except redis_lib.RedisError as error:
            logger.warning("cannot read the results of %d redelivered jobs (%s); running them", len(redelivered),
                           error)
            return {}
        stored = {}
        for tag, record in zip(redelivered, records):
            try:
                state = json.loads(record)["status"] if record else None
            except (ValueError, TypeError, KeyError):
                state = None
            if state in READY_STATES:
                stored[tag] = state
        return stored

    def _ack_stored(self, tag: str, payload: dict, state: str) -> None:
        """Ack a redelivered job whose result is already stored, without running it again."""
        self.acker.ack(tag)
        self.redelivered_done += 1
        job_logger.info("job %s on %s: REDELIVERED-%s (its result was stored before its holder died; acked, not "
                        "run again)", payload["headers"]["id"],
                        payload["properties"].get("delivery_info", {}).get("routing_key", "?"), state,
                        extra={"job_id": payload["headers"]["id"], "state": f"REDELIVERED-{state}"})

    def _dead_letter(self, tag: str, reason: str, raw: bytes, job_id: str | None) -> None:
        try:
            self.dead_letters.send(tag, reason, raw, job_id)
        except Exception:  # let go of below: the next lease renewal puts it back, and the next claim tries again
            logger.exception("could not dead-letter message %s (%s)", tag, reason)
        finally:
            self.lease.let_go([tag])

    def _dead_letter_job(self, job: Any, reason: str) -> None:
        message = job.message
        self._dead_letter(message.delivery_tag, reason, json.dumps(message.serializable(), default=str), job.job_id)

    def _deliver_or_dead_letter(self, tag: str, raw: bytes, payload: dict, cancelled: bool) -> None:
        try:
            self._deliver(payload, cancelled)
        except Exception as error:
            if self._shutting_down.is_set():  # Celery's pool may be closed already: the job is not at fault
                logger.info("worker shutting down: message %s goes back to its queue (%s)", tag, error)
                self._requeue(tag)
                return
            logger.exception("could not hand message %s to a job path", tag)
            self._dead_letter(tag, f"could not be handed to a job path: {type(error).__name__}: {error}", raw,
                              job_id_of(payload))

    def _deliver(self, payload: dict, cancelled: bool) -> None:
        """One claimed message to its task's Celery strategy, as ``Consumer.create_task_handler`` does.

        ``infer``'s strategy offers plain jobs to the hot path (:mod:`worker.strategy`); ``cancelled`` says the
        job's cancel flag was set when it was claimed (the claim script read it), and the hot path ends it unrun.
        """
        celery = self._celery
        message = Message(payload, channel=self.channel)
        message.accept = ACCEPT
        if self.hot_path is not None:
            self.hot_path.cancelled_at_claim = cancelled
        strategy = celery.strategies[message.headers["task"]]
        try:
            strategy(message, None, promise(message.ack_log_error), promise(message.reject_log_error),
                     celery.on_task_message)
        except (InvalidTaskError, ContentDisallowed) as error:
            celery.on_invalid_task(None, message, error)
        except DecodeError as error:
            celery.on_decode_error(message, error)

    def _requeue(self, tag: str) -> None:
        # Back to the head of the list it came from, and out of this worker's lease, in one step.
        if not self.lease.release(tag):
            logger.warning("message %s was no longer held by this worker; not requeued", tag)


def bulk_consumer_step(*, on_create: Callable[[BulkConsumer], None], **options: Any) -> type:
    """A consumer bootstep class that runs a :class:`BulkConsumer` built with ``options``."""

    class BulkConsumerStep(bootsteps.StartStopStep):
        """Claims jobs from the deployment queues (pipefleet's bulk consumer)."""

        requires = ("celery.worker.consumer.tasks:Tasks",)
        name = "pipefleet.BulkConsumer"

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.consumer: BulkConsumer | None = None

        def start(self, c: Any) -> None:
            if self.consumer is None:
                self.consumer = BulkConsumer(c, **options)
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
