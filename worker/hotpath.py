"""The hot path: claimed messages of standalone jobs → batcher → results, without a Celery request per job.

The bulk consumer (:mod:`worker.consumer`) offers every claimed message here
first. A plain ``infer`` job (not part of a chord or group, no ETA, not expired,
not revoked, no callbacks) runs in one direction::

    decode → validate → prepare (worker.jobs) → batcher → forward → encode → store → ack

on two threads: the consumer thread prepares and submits, and one commit thread
finishes the jobs whose items are done, writing their Celery results (the same
``celery-task-meta-<id>`` value and pub/sub notice Celery's Redis backend writes,
so ``AsyncResult`` and every client read them unchanged) for many jobs in one
pipeline, then acking them through the ack thread. Each job is committed on its
own: one that cannot be encoded or stored is dead-lettered, and never keeps
its slot. Anything else goes back to Celery's own
strategy (:meth:`HotPath.offer` returns False), so chords, ETAs, expiry and
revokes keep Celery's semantics.

A job's deadline is watched from its submission (:mod:`worker.deadlines`): when it passes first, the job
fails with :class:`~producers.errors.JobTimeout` and its pending items are dropped. How each job ends is
written by :mod:`worker.outcome`. At-least-once: a worker killed between the result write and the ack runs
the job again; the first final result stays (:mod:`worker.first_result`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from celery import states

from producers.constants import WRITE_RETRY_S
from producers.errors import WriteFailed
from producers.redis_clients import NO_WAIT

from worker.deadlines import DeadlineWatch, passed_deadline
from worker.decode import plain_job
from worker.first_result import FirstResultStore, encoded_meta
from worker.inputs import AUDIO_TASKS, IMAGE_DICT_TASKS, IMAGE_TASKS
from worker.jobs import PreparedJob, collect_outputs, finish_job, prepare_job
from worker.outcome import (cancel_error, end_job, error_text, final_state, job_logger, log_job, metric_state,
                            stored_value, task_event)
from worker.runtime import Runtime
from worker.supervision import Supervisor, guarded

logger = logging.getLogger(__name__)

MEDIA_TASKS = IMAGE_TASKS | AUDIO_TASKS | frozenset(IMAGE_DICT_TASKS)
"""Tasks whose inputs may be fetched and decoded: prepared on a pool, off the claim thread."""

PREPARE_THREADS_PER_DEPLOYMENT = 4
"""Media jobs of one deployment prepared at once; more wait their turn without holding the claim thread."""

EVENT_BUFFER_LIMIT = 64
"""Task events buffered before a send publishes them at once (else the commit thread does)."""

EVENT_FLUSH_S = 0.2
"""Longest a buffered task event (a long job's task-started) waits for the commit thread to publish it."""


@dataclass(eq=False)
class HotJob:
    """One job on the hot path: its message, its prepared items and how many are still running."""

    job_id: str
    message: Any
    request: Any
    deployment: str | None
    received_at: float = field(default_factory=time.perf_counter)
    prepared: PreparedJob | None = None
    futures: list[Future] = field(default_factory=list)
    error: BaseException | None = None
    remaining: int = 0
    finished: bool = False
    duplicate: bool = False
    """Another run of this job had already stored its final result; this run's was dropped."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class HotPath:
    """Runs plain ``infer`` jobs straight from claimed messages; see the module docstring."""

    def __init__(self, runtime: Runtime, *, backend: Any, hostname: str, events: Callable[[], Any],
                 on_finished: Callable[[int], None], supervisor: Supervisor,
                 dead_letter: Callable[[HotJob, str], None] = lambda job, reason: None,
                 ack: Callable[[list[str]], None] | None = None, write_retry_s: float = WRITE_RETRY_S) -> None:
        self.runtime = runtime
        self._write_retry_s = write_retry_s
        """How long a result write is retried before its jobs are left unacked (``redis_write_retry_s``)."""
        self.backend = backend
        self._results = FirstResultStore(backend)
        self._replica_wait = getattr(backend, "replica_wait", NO_WAIT)  # WAIT for a replica under Sentinel
        self._supervisor = supervisor
        self._dead_letter = dead_letter
        self._ack = ack
        self.hostname = hostname
        self._events = events
        self._on_finished = on_finished
        self._done: queue.SimpleQueue[HotJob | None] = queue.SimpleQueue()
        self._live: dict[str, HotJob] = {}
        self._taken = 0  # written by the consumer thread only
        self.cancelled_at_claim = False
        """Whether the message being delivered had its job's cancel flag set when the consumer claimed it."""
        self._committed = 0
        self._committed_lock = threading.Lock()
        self._stopping = False
        self._preparers: dict[str, ThreadPoolExecutor] = {}
        self._own_dispatcher: Any = None
        self._dispatcher_lock = threading.Lock()
        self._committer = threading.Thread(target=guarded("commit", self._commit_loop), name="pipefleet-commit",
                                           daemon=True)
        supervisor.watch("commit", self._committer)
        self._deadlines = DeadlineWatch(self._expire, live=self._live, supervisor=supervisor)

    def start(self) -> None:
        """Start the commit and deadline threads."""
        self._committer.start()
        self._deadlines.start()

    def stop(self) -> None:
        """Commit what is done, then stop the threads."""
        self._stopping = True
        self._done.put(None)
        self._deadlines.stop()
        self._committer.join(10)
        for pool in self._preparers.values():
            pool.shutdown(wait=False, cancel_futures=True)
        if self._own_dispatcher is not None:
            self._flush_events()
            try:
                self._own_dispatcher.close()
                self._own_dispatcher.connection.release()
            except Exception:  # shutting down: the connection goes with the process
                logger.debug("could not close the event dispatcher", exc_info=True)

    @property
    def in_hand(self) -> int:
        """Jobs taken and not yet committed."""
        return self._taken - self._committed

    def hand_back_unstarted(self) -> int:
        """Warm shutdown: requeue every job with an item no forward pass has started; returns how many.

        Their messages go back to their queue at once (not after the visibility
        timeout), and results of their other items, if any finish, are discarded.
        """
        live = dict(self._live)
        withdrawn: set[str] = set()
        for served in self.runtime.deployments.values():
            withdrawn |= served.batcher.withdraw(set(live))
        for job_id in withdrawn:
            job = live[job_id]
            if not self._end(job):
                continue
            job.message.reject(requeue=True)
            self._live.pop(job_id, None)
            with self._committed_lock:
                self._committed += 1
        return len(withdrawn)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every taken job is committed; False if some are still running at the timeout."""
        deadline = time.monotonic() + timeout_s
        while self.in_hand > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.in_hand <= 0

    def offer(self, message: Any) -> bool:
        """Take a claimed message if it is a plain job (True), else leave it to Celery (False).

        Called by the ``infer`` task's Celery strategy (:mod:`worker.strategy`). A job whose
        :attr:`cancelled_at_claim` is set ends as cancelled, unrun.
        """
        decoded = plain_job(message, hostname=self.hostname)
        if decoded is None:
            return False
        job_id, spec, request = decoded
        headers = message.headers
        deployment = spec.get("deployment")
        job = HotJob(job_id, message, request, deployment if isinstance(deployment, str) else None)
        self._live[job_id] = job
        self._taken += 1
        # From here on the job is this path's: whatever fails ends the job, never hands it to Celery too.
        try:
            self._start(job, spec, headers, self.cancelled_at_claim)
        except Exception as error:
            self._fail_unstarted(job, error)
        return True

    def _fail_unstarted(self, job: HotJob, error: BaseException) -> None:
        logger.error("job %s could not start on the hot path", job.job_id,
                     exc_info=(type(error), error, error.__traceback__))
        if self._end(job):
            job.error = error
            self._done.put(job)

    @staticmethod
    def _end(job: HotJob) -> bool:
        """Mark ``job`` finished and cancel its pending items; False if something else ended it first."""
        with job.lock:
            if job.finished:
                return False
            job.finished = True
        for future in job.futures:
            future.cancel()
        return True

    def _preparer(self, deployment: str) -> ThreadPoolExecutor:
        pool = self._preparers.get(deployment)
        if pool is None:
            pool = self._preparers.setdefault(deployment, ThreadPoolExecutor(
                PREPARE_THREADS_PER_DEPLOYMENT, thread_name_prefix=f"pipefleet-prepare-{deployment}"))
        return pool

    def _prepare_off_thread(self, job: HotJob, spec: dict) -> None:
        try:
            self._prepare(job, spec)
        except Exception as error:  # a pool thread: the job fails, the pool goes on
            self._fail_unstarted(job, error)

    def _start(self, job: HotJob, spec: dict, headers: dict, cancelled: bool) -> None:
        job_id, request = job.job_id, job.request
        if job_logger.isEnabledFor(logging.INFO):
            logger.info("Task %s[%s] received", request.task, job_id)
        self._event("task-received", uuid=job_id, name=request.task, args=headers.get("argsrepr"),
                    kwargs=headers.get("kwargsrepr"), root_id=headers.get("root_id"),
                    parent_id=headers.get("parent_id"), retries=request.retries)
        if cancelled:
            job.error = cancel_error(job_id)
            job.finished = True
            self._done.put(job)
            return
        served = self.runtime.deployments.get(job.deployment or "")
        if served is not None and served.config.task in MEDIA_TASKS:
            # Fetching and decoding media can take seconds: never on the claim thread, which serves every deployment.
            self._preparer(served.config.name).submit(self._prepare_off_thread, job, spec)
        else:
            self._prepare(job, spec)

    def _prepare(self, job: HotJob, spec: dict) -> None:
        job_id = job.job_id
        try:
            job.prepared = prepare_job(self.runtime, spec, job_id)
            job.futures = job.prepared.submit()
        except Exception as error:
            job.error = error
            job.finished = True
            self._done.put(job)
            return
        self._event("task-started", uuid=job_id)  # the dispatcher adds hostname and pid
        job.remaining = len(job.futures)
        for future in job.futures:
            future.add_done_callback(lambda _f, j=job: self._item_done(j))
        if job.prepared.deadline_mono is not None:
            self._deadlines.add(job.prepared.deadline_mono, job_id)

    def _event(self, kind: str, **fields: Any) -> None:
        """Send one Celery task event (as Celery's own request does); a failed send never touches the job.

        Sent on this worker's own dispatcher, from the calling thread, while Celery's dispatcher sends the
        ``task`` group (``task_events``, or Flower's ``enable_events``). Celery enables its dispatcher for worker
        heartbeats too, with only the ``worker`` group: a job's events must follow the group, or every job pays
        three publishes nobody asked for. Celery's dispatcher buffers task events and publishes
        them one by one from its event loop: under load that kept the loop from answering remote control
        (py-spy --gil: 2/3 of the loop's GIL time in ``EventDispatcher.flush``). This one buffers them too and
        the commit thread publishes each buffer as one ``task.multi`` message (what Celery's event receivers,
        Flower's among them, read as a list) after every commit round and at least every ``EVENT_FLUSH_S``.
        """
        try:
            celery_dispatcher = self._events()
            if celery_dispatcher is not None and celery_dispatcher.enabled and (
                    not celery_dispatcher.groups or "task" in celery_dispatcher.groups):
                self._dispatcher().send(kind, **fields)
        except Exception:
            logger.warning("could not send the %s event of a job", kind, exc_info=True)

    def _dispatcher(self) -> Any:
        if self._own_dispatcher is None:
            with self._dispatcher_lock:
                if self._own_dispatcher is None:
                    app = self.backend.app
                    self._own_dispatcher = app.events.Dispatcher(
                        app.connection_for_write(), hostname=self.hostname, enabled=True,
                        buffer_group=["task"], buffer_limit=EVENT_BUFFER_LIMIT)
        return self._own_dispatcher

    def _flush_events(self) -> None:
        """Publish the buffered task events (commit thread, and once at stop)."""
        if self._own_dispatcher is None:
            return
        try:
            self._own_dispatcher.flush()
        except Exception:
            logger.warning("could not publish buffered task events", exc_info=True)

    def _item_done(self, job: HotJob) -> None:
        with job.lock:
            job.remaining -= 1
            if job.remaining or job.finished:
                return
            job.finished = True
        self._done.put(job)

    def _expire(self, job_id: str) -> None:
        job = self._live.get(job_id)
        if job is None:
            return
        unfinished = sum(1 for f in job.futures if not f.done())
        if not self._end(job):
            return
        job.error = passed_deadline(unfinished, len(job.futures))
        self._done.put(job)

    def _commit_loop(self) -> None:
        while True:
            self._supervisor.tick("commit")
            try:
                first = self._done.get(timeout=EVENT_FLUSH_S)
            except queue.Empty:
                self._flush_events()
                if self._stopping:
                    return
                continue
            jobs = [first] if first is not None else []
            while True:
                try:
                    job = self._done.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    jobs.append(job)
            if jobs:
                try:
                    self._commit(jobs)
                except Exception:  # _commit settles every job itself; this keeps the loop whatever happens
                    logger.exception("could not commit %d jobs", len(jobs))
            self._flush_events()
            if first is None or (self._stopping and self._done.empty()):
                return

    def _outcome(self, job: HotJob) -> tuple[str, Any]:
        """``(state, envelope or error)`` of a finished job."""
        if job.error is None:
            try:
                return states.SUCCESS, finish_job(job.prepared, collect_outputs(job.prepared, job.futures),
                                                  self.runtime.worker_name)
            except Exception as error:
                job.error = error
        return final_state(job.error), end_job(job.prepared, job.error,
                                               describe=f"job {job.job_id} on {job.deployment}")

    def _settle(self, job: HotJob) -> tuple[str, Any, str] | None:
        """Outcome, metric and encoded result of one job; None (and dead-lettered) if it cannot be encoded."""
        try:
            state, value = self._outcome(job)
            served = self.runtime.deployments.get(job.deployment or "")
            if served is not None:
                # Counted before the result is visible, so a client that sees the result sees the count.
                served.metrics.observe_job(metric_state(state))
            return state, value, encoded_meta(self.backend, job.job_id, state, stored_value(state, value),
                                              job.request)
        except Exception as error:
            logger.exception("job %s: its outcome could not be encoded", job.job_id)
            self._dead_letter(job, f"its outcome could not be encoded: {error_text(error)}")
            return None

    def _store(self, settled: list) -> list:
        """Write the results of ``settled`` jobs in one pipeline; returns those stored.

        A job whose result cannot be encoded or stored is dead-lettered, except when Redis refused the write
        past ``redis_write_retry_s`` (:class:`WriteFailed`): then nothing is acked and the jobs go back to
        their queues, to run again.
        """
        try:
            replies = self._results.store([(job.job_id, state, encoded) for job, (state, _, encoded) in settled],
                                          wait=self._replica_wait, bound_s=self._write_retry_s)
        except WriteFailed as error:
            self._left_unacked([job for job, _ in settled], error)
            return []
        stored = []
        for (job, outcome), reply in zip(settled, replies):
            if isinstance(reply, WriteFailed):
                self._left_unacked([job], reply)
            elif isinstance(reply, BaseException):
                self._dead_letter(job, f"its result could not be stored: {error_text(reply)}")
            else:
                job.duplicate = not reply
                stored.append((job, outcome))
        return stored

    def _left_unacked(self, jobs: list[HotJob], error: WriteFailed) -> None:
        """Hand back jobs whose results Redis refused, to run again (by the lease's next renewal if Redis
        refuses the hand-back too)."""
        logger.error("%s; jobs %s go back to their queues unacked, to run again; serving on", error,
                     ", ".join(job.job_id for job in jobs), extra={"job_ids": [job.job_id for job in jobs]})
        for job in jobs:
            try:
                job.message.reject(requeue=True)
            except Exception as refused:  # let go of by the lease all the same: its next renewal puts it back
                logger.warning("job %s: could not hand it back (%s)", job.job_id, refused)

    def _commit(self, jobs: list[HotJob]) -> None:
        settled = []
        try:
            settled = [(job, outcome) for job in jobs if (outcome := self._settle(job)) is not None]
            if settled:
                settled = self._store(settled)
            acked = False
            if settled and self._ack is not None:
                try:
                    self._ack([job.message.delivery_tag for job, _ in settled])
                    acked = True
                except WriteFailed as error:  # in hand meanwhile
                    logger.error("%s; the ack thread tries them again", error)
                except Exception:  # the ack thread takes them instead
                    logger.exception("could not ack %d jobs at once", len(settled))
            for job, (state, value, _) in settled:
                try:
                    if not acked:
                        job.message.ack()
                    self._finished(job, state, value)
                except Exception:
                    logger.exception("job %s: could not finish its bookkeeping", job.job_id)
        finally:
            for job in jobs:
                self._live.pop(job.job_id, None)
            with self._committed_lock:
                self._committed += len(jobs)
            self._on_finished(len(jobs))

    def _finished(self, job: HotJob, state: str, value: Any) -> None:
        duration_s = round(time.perf_counter() - job.received_at, 6)
        event = task_event(job.job_id, state, value, duration_s)
        if event is not None:
            self._event(event[0], **event[1])
        log_job(job.job_id, job.deployment, state, duration_s, result=value, duplicate=job.duplicate)

