"""Dynamic batching: many jobs' items, one forward pass.

Each job thread hands its items to its deployment's :class:`Batcher` and waits
on one future per item. One :class:`DeviceRunner` thread per device runs the
batches of every batcher on that device, so forward passes of deployments
sharing a GPU never overlap.

Flush rule, per group of items that share the same call params:

1. flush ``max_batch_size`` items as soon as that many are pending;
2. flush whatever is pending as soon as no further item is coming
   (``more_coming()`` is false: every job this worker reserved has handed its
   items over and the broker queue has nothing ready; and the runner is not held
   by the consumer, which is still handing over the jobs of one claim), so an
   idle fleet adds no batching delay;
3. otherwise flush when the oldest pending item has waited ``max_batch_wait_ms``.

When more items are pending than fit in one batch and the deployment measures
lengths (text: characters, or tokens under a token budget), the batch is the oldest item plus the pending items
closest to it in length, so a forward pass pads less than a FIFO window would
(as text-embeddings-inference groups by length); with ``max_batch_tokens``, a
batch also stops where ``longest length × items`` would pass that budget. Each
output still reaches its own job's future, in its job's order.

At least one item is always flushed. Items of cancelled or expired jobs are
dropped before the forward pass. When a batched call raises, the batch is
rerun one job at a time so only the guilty job fails (out-of-memory halving
happens inside the batch call, :mod:`worker.forward`). The runner loop survives
any error.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from producers.errors import JobCancelled, JobTimeout
from worker.metrics import DeploymentMetrics
from worker.outcome import cancel_error

logger = logging.getLogger(__name__)

RunBatch = Callable[[list["PendingItem"], dict[str, Any]], list[Any]]
"""The batch call: one output per item, in order; an exception in place of the output of an item that failed
alone (as ``asyncio.gather(..., return_exceptions=True)`` gives). It raises when the batch as a whole failed."""
LengthOf = Callable[[list[Any]], list[int]]


@dataclass(eq=False)
class PendingItem:
    """One input waiting for a forward pass, with the future its job waits on."""

    job_id: str
    index: int
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    partial: bool = False
    length: int = 0
    cancel_id: str | None = None
    """The id a client cancels by (a chunked job's id for its chunks); defaults to ``job_id``."""


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class Batcher:
    """Pending items of one deployment, grouped by call params; see the module docstring."""

    def __init__(self, name: str, run_batch: RunBatch, *, max_batch_size: int, max_batch_wait_ms: float,
                 more_coming: Callable[[], bool] = lambda: False,
                 find_cancelled: Callable[[list[PendingItem]], set[str]] = lambda items: set(),
                 metrics: DeploymentMetrics | None = None, length_of: LengthOf | None = None,
                 max_batch_tokens: int | None = None) -> None:
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_ms / 1000.0
        self.more_coming = more_coming
        self.find_cancelled = find_cancelled
        self.metrics = metrics or DeploymentMetrics(name)
        self.length_of = length_of
        self.max_batch_tokens = max_batch_tokens
        self._groups: "collections.OrderedDict[str, tuple[dict, collections.deque[PendingItem]]]" = (
            collections.OrderedDict())
        self._runner: DeviceRunner | None = None

    def attach(self, runner: "DeviceRunner") -> None:
        """Bind this batcher to the runner of its device."""
        self._runner = runner

    def submit(self, job_id: str, payloads: list[Any], params: dict[str, Any], *,
               deadline: float | None = None, partial: bool = False, cancel_id: str | None = None) -> list[Future]:
        """Queue a job's items; returns one future per item, in order."""
        if self._runner is None:
            raise RuntimeError(f"batcher {self.name} is not attached to a device runner")
        lengths = self._lengths(payloads)
        items = [PendingItem(job_id, i, payload, deadline=deadline, partial=partial, cancel_id=cancel_id,
                             length=length) for i, (payload, length) in enumerate(zip(payloads, lengths))]
        key = _params_key(params)
        with self._runner.condition:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = (dict(params), collections.deque())
            group[1].extend(items)
            if not self._runner.held or len(group[1]) >= self.max_batch_size:
                self._runner.condition.notify()
        return [item.future for item in items]

    def _lengths(self, payloads: list[Any]) -> list[int]:
        if self.length_of is None:
            return [0] * len(payloads)
        try:
            lengths = self.length_of(payloads)
        except Exception:  # a length is only a batching hint; the forward pass reports bad input
            logger.debug("deployment %s: cannot measure input lengths", self.name, exc_info=True)
            return [0] * len(payloads)
        return lengths if len(lengths) == len(payloads) else [0] * len(payloads)

    def _select(self, items: "collections.deque[PendingItem]") -> list[PendingItem]:
        """Pop one batch: FIFO when all fit, else the oldest item and those closest to it in length."""
        size = self.max_batch_size
        if len(items) <= size and not self.max_batch_tokens:
            return [items.popleft() for _ in range(len(items))]
        if self.length_of is None:
            return [items.popleft() for _ in range(min(len(items), size))]
        anchor = items[0].length
        ranked = sorted(range(len(items)), key=lambda i: (abs(items[i].length - anchor), i))[:size]
        if self.max_batch_tokens:
            kept, longest = [], 0
            for index in ranked:
                longest = max(longest, items[index].length)
                if kept and longest * (len(kept) + 1) > self.max_batch_tokens:
                    break
                kept.append(index)
            ranked = kept
        chosen = set(ranked)
        batch = [items[i] for i in sorted(chosen)]
        rest = [item for i, item in enumerate(items) if i not in chosen]
        items.clear()
        items.extend(rest)
        return batch

    def withdraw(self, job_ids: set[str]) -> set[str]:
        """Take back the items of ``job_ids`` that no forward pass has started; returns whose were taken."""
        if self._runner is None:
            return set()
        withdrawn: set[str] = set()
        with self._runner.condition:
            for key in list(self._groups):
                _, items = self._groups[key]
                kept = collections.deque(item for item in items if item.job_id not in job_ids)
                withdrawn.update(item.job_id for item in items if item.job_id in job_ids)
                if kept:
                    self._groups[key] = (self._groups[key][0], kept)
                else:
                    del self._groups[key]
        return withdrawn

    def pending_count(self) -> int:
        """Items waiting for a forward pass (call with the runner's lock held or accept a race)."""
        return sum(len(items) for _, items in self._groups.values())

    def _oldest(self) -> tuple[float, str] | None:
        oldest = None
        for key, (_, items) in self._groups.items():
            if items and (oldest is None or items[0].enqueued_at < oldest[0]):
                oldest = (items[0].enqueued_at, key)
        return oldest

    def take_ready(self, now: float) -> tuple[tuple[dict, list[PendingItem]] | None, float | None]:
        """Under the runner's lock: a batch ready to run, else when to look again."""
        oldest = self._oldest()
        if oldest is None:
            return None, None
        enqueued_at, key = oldest
        params, items = self._groups[key]
        full = len(items) >= self.max_batch_size
        waited_out = now - enqueued_at >= self.max_batch_wait_s
        if not (full or waited_out or not (self._runner.held or self.more_coming())):
            return None, enqueued_at + self.max_batch_wait_s
        batch = self._select(items)
        if not items:
            del self._groups[key]
        return (params, batch), None

    def fail_all(self, error: BaseException) -> None:
        """Fail every pending item (used when the worker stops for good)."""
        for _, items in self._groups.values():
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
        self._groups.clear()

    def execute(self, params: dict[str, Any], batch: list[PendingItem]) -> None:
        """Run one batch, dropping cancelled and expired items first and isolating a failure; never raises."""
        now = time.monotonic()
        waiting = [item for item in batch if not item.future.done()]
        cancelled = self.find_cancelled(waiting) if waiting else set()
        live = []
        for item in waiting:
            if item.job_id in cancelled:
                item.future.set_exception(cancel_error(item.cancel_id or item.job_id))
            elif item.deadline is not None and now > item.deadline:
                item.future.set_exception(JobTimeout(f"job {item.job_id} passed its deadline before it ran"))
            else:
                live.append(item)
        if not live:
            return
        self.metrics.observe_queue_wait([now - item.enqueued_at for item in live])
        self._run_isolated(params, live)

    def _run_isolated(self, params: dict[str, Any], batch: list[PendingItem]) -> None:
        try:
            self._forward(params, batch)
        except Exception as error:
            batch = [item for item in batch if not item.future.done()]
            jobs = list(dict.fromkeys(item.job_id for item in batch))
            if len(jobs) > 1:
                logger.info("deployment %s: batch of %d items from %d jobs failed (%s); rerunning job by job",
                            self.name, len(batch), len(jobs), error)
                for job_id in jobs:
                    self._run_isolated(params, [i for i in batch if i.job_id == job_id])
            elif len(batch) > 1 and batch[0].partial:
                for item in batch:
                    self._run_isolated(params, [item])
            else:
                for item in batch:
                    item.future.set_exception(error)

    def _forward(self, params: dict[str, Any], batch: list[PendingItem]) -> None:
        started = time.perf_counter()
        outputs = self.run_batch(batch, params)
        elapsed = time.perf_counter() - started
        if len(outputs) != len(batch):
            raise RuntimeError(f"deployment {self.name}: the pipeline returned {len(outputs)} outputs "
                               f"for {len(batch)} inputs")
        self.metrics.observe_batch(len(batch), elapsed)
        if logger.isEnabledFor(logging.INFO):
            job_ids = list(dict.fromkeys(item.job_id for item in batch))
            logger.info("deployment %s: ran a batch of %d items from %d jobs in %.3fs", self.name, len(batch),
                        len(job_ids), elapsed, extra={"deployment": self.name, "batch_size": len(batch),
                                                      "duration_s": round(elapsed, 6), "job_ids": job_ids})
        for item, output in zip(batch, outputs):
            if item.future.done():
                continue
            if isinstance(output, BaseException):
                item.future.set_exception(output)
            else:
                item.future.set_result(output)


class DeviceRunner:
    """The one inference thread of a device: runs ready batches of its batchers in turn."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.condition = threading.Condition()
        self.batchers: list[Batcher] = []
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._stopping = False
        self.held = 0
        """How many callers hold this runner's flush decisions (:meth:`hold`); read under :attr:`condition`."""
        self._thread = threading.Thread(target=self._loop, name=f"pipefleet-device-{device}", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        """The inference thread (for supervision)."""
        return self._thread

    def add(self, batcher: Batcher) -> None:
        """Serve ``batcher`` on this device."""
        batcher.attach(self)
        self.batchers.append(batcher)

    def start(self) -> None:
        """Start the inference thread."""
        self._thread.start()

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` on the inference thread between batches; returns its future.

        Warm-up goes through here: a forward pass on another thread (such as the
        main one) gives torch a second OpenMP thread team, and every later forward
        pass on the inference thread then runs markedly slower on the CPU.
        """
        future: Future = Future()
        with self.condition:
            self._calls.append((function, future))
            self.condition.notify()
        return future

    def hold(self) -> None:
        """Treat more items as coming, and do not wake for each one, until :meth:`release`.

        The bulk consumer holds the runners while it hands over the jobs of one claim: woken at the first
        item, the inference thread would flush a batch of one and then contend for the GIL with the hand-over
        of the rest. A full batch still flushes at once; the rest wait for the release, which comes when the
        claim's last job is handed over.
        """
        with self.condition:
            self.held += 1

    def release(self) -> None:
        """End one :meth:`hold`; the last release re-evaluates the flush rules at once."""
        with self.condition:
            self.held -= 1
            if not self.held:
                self.condition.notify()

    def wake(self) -> None:
        """Re-evaluate flush rules now (a job handed over, or the queue changed)."""
        with self.condition:
            self.condition.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the batch in flight; pending items are failed as cancelled."""
        with self.condition:
            self._stopping = True
            self.condition.notify()
        self._thread.join(timeout_s)

    def _next_batch(self) -> tuple[Batcher, dict, list[PendingItem]] | tuple[None, Callable[[], Any], Future] | None:
        with self.condition:
            while not self._stopping:
                if self._calls:
                    function, future = self._calls.popleft()
                    return None, function, future
                now = time.monotonic()
                wake_at = None
                ordered = sorted(self.batchers, key=lambda b: (b._oldest() or (float("inf"),))[0])
                for batcher in ordered:
                    ready, look_again_at = batcher.take_ready(now)
                    if ready is not None:
                        return batcher, ready[0], ready[1]
                    if look_again_at is not None:
                        wake_at = look_again_at if wake_at is None else min(wake_at, look_again_at)
                self.condition.wait(None if wake_at is None else max(0.0, wake_at - now))
        return None

    def _loop(self) -> None:
        while True:
            try:
                picked = self._next_batch()
            except Exception:  # a flush rule that raised: never lose the inference thread over it
                logger.exception("device %s: could not pick the next batch", self.device)
                time.sleep(0.1)
                continue
            if picked is None:
                break
            batcher, params, batch = picked
            if batcher is None:
                _run_call(params, batch)
                continue
            try:
                batcher.execute(params, batch)
            except Exception as error:  # the loop must never die, and no future may hang
                logger.exception("device %s: unexpected error in the inference loop", self.device)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
        for batcher in self.batchers:
            batcher.fail_all(JobCancelled("the worker is shutting down"))


def _run_call(function: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(function())
    except Exception as error:
        future.set_exception(error)
