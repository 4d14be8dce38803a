"""The hot path: claimed messages of standalone jobs → batcher → results, without a Celery request per job.

The bulk consumer (:mod:`worker.consumer`) offers every claimed message here
first. A plain ``infer`` job (not part of a chord or group, no ETA, not expired,
not revoked, no callbacks) runs in one direction::

    decode → validate → prepare (worker.jobs) → batcher → forward → encode → store → ack

on two threads: the consumer thread prepares and submits, and one commit thread
finishes the jobs whose items are done, writing their Celery results (the same
``celery-task-meta-<id>`` value and pub/sub notice Celery's Redis backend writes,
so ``AsyncResult`` and every client read them unchanged) for many jobs in one
pipeline, then acking them in one more. Anything else goes back to Celery's own
strategy (:meth:`HotPath.offer` returns False), so chords, ETAs, expiry and
revokes keep Celery's semantics.

A job's deadline is watched from its submission: when it passes first, the job
fails with :class:`~producers.errors.JobTimeout` and its pending items are
dropped. At-least-once: a worker killed between the result write and the ack
runs the job again; results are overwritten with the same value.
"""

from __future__ import annotations

import heapq
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Callable

from celery import states
from celery.worker import state as worker_state

from producers.celery_internals import finished_task_meta
from producers.constants import INFER_TASK
from producers.errors import JobCancelled, JobError, JobTimeout, PipefleetError
from worker.jobs import PreparedJob, collect_outputs, finish_job, prepare_job
from worker.retrying import pipeline_until_done
from worker.runtime import Runtime

logger = logging.getLogger(__name__)
job_logger = logging.getLogger("pipefleet.jobs")


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
    lock: threading.Lock = field(default_factory=threading.Lock)


def _plain_infer(message: Any) -> bool:
    headers = message.headers or {}
    if headers.get("task") != INFER_TASK or headers.get("group") or headers.get("eta"):
        return False
    expires = headers.get("expires")
    if expires:
        when = datetime.fromisoformat(expires)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        if when <= datetime.now(timezone.utc):
            return False  # Celery's strategy records the expiry as it always does
    return headers.get("id") not in worker_state.revoked


def _decode_body(message: Any) -> tuple[list, dict, dict] | None:
    body = message.body
    if message.content_type != "application/json":
        return None
    try:
        args, kwargs, embed = json.loads(body)
    except (ValueError, TypeError):
        return None
    if any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
        return None
    return args, kwargs, embed


class HotPath:
    """Runs plain ``infer`` jobs straight from claimed messages; see the module docstring."""

    def __init__(self, runtime: Runtime, *, backend: Any, hostname: str, events: Callable[[], Any],
                 on_finished: Callable[[int], None]) -> None:
        self.runtime = runtime
        self.backend = backend
        self.hostname = hostname
        self._events = events
        self._on_finished = on_finished
        self._done: queue.SimpleQueue[HotJob | None] = queue.SimpleQueue()
        self._deadlines: list[tuple[float, int, str]] = []
        self._deadline_cv = threading.Condition()
        self._sequence = 0
        self._live: dict[str, HotJob] = {}
        self._taken = 0  # written by the consumer thread only
        self._committed = 0
        self._committed_lock = threading.Lock()
        self._stopping = False
        self._committer = threading.Thread(target=self._commit_loop, name="pipefleet-commit", daemon=True)
        self._timer = threading.Thread(target=self._deadline_loop, name="pipefleet-deadlines", daemon=True)

    def start(self) -> None:
        """Start the commit and deadline threads."""
        self._committer.start()
        self._timer.start()

    def stop(self) -> None:
        """Commit what is done, then stop the threads."""
        self._stopping = True
        self._done.put(None)
        with self._deadline_cv:
            self._deadline_cv.notify()
        self._committer.join(10)

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
            with job.lock:
                if job.finished:
                    continue
                job.finished = True
            for future in job.futures:
                future.cancel()
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

    def offer(self, message: Any, *, cancelled: bool = False) -> bool:
        """Take a claimed message if it is a plain job (True), else leave it to Celery (False).

        ``cancelled``: the job's cancel flag was set when it was claimed; it ends as cancelled, unrun.
        """
        if not _plain_infer(message):
            return False
        decoded = _decode_body(message)
        if decoded is None:
            return False
        args, kwargs, _ = decoded
        # infer(spec): clients pass the spec as a keyword, Celery canvases positionally.
        if len(args) == 1 and not kwargs:
            spec = args[0]
        elif not args and set(kwargs) == {"spec"}:
            spec = kwargs["spec"]
        else:
            return False
        if not isinstance(spec, dict) or spec.get("chunk_index") is not None:
            return False
        headers = message.headers
        job_id = headers["id"]
        deployment = spec.get("deployment")
        request = SimpleNamespace(task=headers.get("shadow") or INFER_TASK, args=args, kwargs=kwargs,
                                  hostname=self.hostname, retries=headers.get("retries", 0),
                                  delivery_info=message.delivery_info, children=[], group=None,
                                  parent_id=headers.get("parent_id"), stamps=None,
                                  # Celery's mark_as_failure/mark_as_revoked read these off the request.
                                  chord=None, chain=None, errbacks=None)
        job = HotJob(job_id, message, request, deployment if isinstance(deployment, str) else None)
        self._live[job_id] = job
        self._taken += 1
        if job_logger.isEnabledFor(logging.INFO):
            logger.info("Task %s[%s] received", request.task, job_id)
        self._event("task-received", uuid=job_id, name=INFER_TASK, args=headers.get("argsrepr"),
                    kwargs=headers.get("kwargsrepr"), root_id=headers.get("root_id"),
                    parent_id=headers.get("parent_id"), retries=request.retries)
        if cancelled:
            job.error = JobCancelled(f"job {job_id} was cancelled")
            self._done.put(job)
            return True
        try:
            job.prepared = prepare_job(self.runtime, spec, job_id)
            job.futures = job.prepared.submit()
        except Exception as error:
            job.error = error
            self._done.put(job)
            return True
        self._event("task-started", uuid=job_id, hostname=self.hostname)
        job.remaining = len(job.futures)
        for future in job.futures:
            future.add_done_callback(lambda _f, j=job: self._item_done(j))
        if job.prepared.deadline_mono is not None:
            with self._deadline_cv:
                self._sequence += 1
                heapq.heappush(self._deadlines, (job.prepared.deadline_mono, self._sequence, job_id))
                if len(self._deadlines) > 2 * len(self._live) + 1024:
                    # Finished jobs leave their entry behind; drop them before the heap outgrows the live jobs.
                    self._deadlines = [entry for entry in self._deadlines if entry[2] in self._live]
                    heapq.heapify(self._deadlines)
                self._deadline_cv.notify()
        return True

    def _event(self, kind: str, **fields: Any) -> None:
        dispatcher = self._events()
        if dispatcher is not None and dispatcher.enabled:
            dispatcher.send(kind, **fields)

    def _item_done(self, job: HotJob) -> None:
        with job.lock:
            job.remaining -= 1
            if job.remaining or job.finished:
                return
            job.finished = True
        self._done.put(job)

    def _deadline_loop(self) -> None:
        while not self._stopping:
            with self._deadline_cv:
                while not self._stopping and (not self._deadlines or self._deadlines[0][0] > time.monotonic()):
                    timeout = None if not self._deadlines else self._deadlines[0][0] - time.monotonic()
                    self._deadline_cv.wait(timeout)
                if self._stopping:
                    return
                _, _, job_id = heapq.heappop(self._deadlines)
            job = self._live.get(job_id)
            if job is None:
                continue
            with job.lock:
                if job.finished:
                    continue
                job.finished = True
            unfinished = sum(1 for f in job.futures if not f.done())
            for future in job.futures:
                future.cancel()
            job.error = JobTimeout(f"job passed its deadline with {unfinished} of {len(job.futures)} items "
                                   "unfinished")
            self._done.put(job)

    def _commit_loop(self) -> None:
        while True:
            first = self._done.get()
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
                except Exception:  # the loop must never die; the jobs stay unacked and are redelivered
                    logger.exception("could not commit %d jobs", len(jobs))
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
        error = job.error
        if job.prepared is not None and isinstance(error, PipefleetError):
            job.prepared.failed(error)  # the token stream ends with the job's error
        if isinstance(error, JobCancelled):
            return states.REVOKED, error
        if not isinstance(error, PipefleetError):
            logger.error("job %s on %s failed unexpectedly", job.job_id, job.deployment,
                         exc_info=(type(error), error, error.__traceback__))
            error = JobError(f"{type(error).__name__}: {error}")
            if job.prepared is not None:
                job.prepared.failed(error)
        return states.FAILURE, error

    def _commit(self, jobs: list[HotJob]) -> None:
        outcomes = [(job, *self._outcome(job)) for job in jobs]
        for job, state, _ in outcomes:
            # Counted before the result is visible, so a client that sees the result sees the count.
            served = self.runtime.deployments.get(job.deployment or "")
            if served is not None:
                served.metrics.observe_job("CANCELLED" if state == states.REVOKED else state)
        backend = self.backend
        successes = []
        for job, state, value in outcomes:
            if state == states.SUCCESS:
                # Exactly what Celery's Redis backend stores for a finished task (celery-task-meta-<id>).
                meta = finished_task_meta(backend, job.job_id, result=value, state=state, request=job.request)
                successes.append((backend.get_key_for_task(job.job_id), backend.encode(meta)))
        if successes:
            def store(pipe: Any) -> None:
                for key, value in successes:
                    pipe.setex(key, backend.expires, value)
                    pipe.publish(key, value)

            pipeline_until_done(backend.client, store, f"the results of {len(successes)} jobs")
        for job, state, value in outcomes:
            if state == states.REVOKED:
                backend.mark_as_revoked(job.job_id, "cancelled", request=job.request)
            elif state == states.FAILURE:
                backend.mark_as_failure(job.job_id, value, request=job.request)
            job.message.ack()
            self._live.pop(job.job_id, None)
            self._finished(job, state, value)
        with self._committed_lock:
            self._committed += len(jobs)
        self._on_finished(len(jobs))

    def _finished(self, job: HotJob, state: str, value: Any) -> None:
        duration_s = round(time.perf_counter() - job.received_at, 6)
        if state == states.SUCCESS:
            self._event("task-succeeded", uuid=job.job_id, result=f"{value.get('n_items')} item(s)",
                        runtime=duration_s)
        elif state == states.FAILURE:
            self._event("task-failed", uuid=job.job_id, exception=f"{type(value).__name__}: {value}")
        if job_logger.isEnabledFor(logging.INFO):
            n_items = value.get("n_items") if state == states.SUCCESS else None
            job_logger.info("job %s on %s: %s in %ss", job.job_id, job.deployment, state, duration_s,
                            extra={"job_id": job.job_id, "deployment": job.deployment, "state": state,
                                   "n_items": n_items, "duration_s": duration_s})

