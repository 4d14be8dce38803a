"""The batcher's flush rule, isolation and resilience, in-process."""

from __future__ import annotations

import threading
import time

import pytest

from producers.errors import JobCancelled, JobTimeout
from worker.batcher import Batcher, DeviceRunner


class Recorder:
    """A run_batch function that records batch sizes and echoes inputs doubled."""

    def __init__(self, *, fail_on=None, delay_s=0.0):
        self.sizes: list[int] = []
        self.fail_on = fail_on
        self.delay_s = delay_s

    def __call__(self, items, params):
        payloads = [item.payload for item in items]
        self.sizes.append(len(payloads))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in payloads:
            raise ValueError(f"bad input {self.fail_on!r}")
        return [p * 2 for p in payloads]


def make(run, *, max_batch_size=4, max_batch_wait_ms=50.0, more_coming=lambda: False, **kwargs):
    batcher = Batcher("test", run, max_batch_size=max_batch_size, max_batch_wait_ms=max_batch_wait_ms,
                      more_coming=more_coming, **kwargs)
    runner = DeviceRunner("cpu")
    runner.add(batcher)
    runner.start()
    return batcher, runner


def results(futures, timeout=60):
    return [f.result(timeout=timeout) for f in futures]


def test_items_of_many_jobs_share_batches_up_to_the_max():
    run = Recorder()
    coming = threading.Event()
    coming.set()
    batcher, runner = make(run, max_batch_size=4, max_batch_wait_ms=5000, more_coming=coming.is_set)
    futures = [batcher.submit(f"job{i}", [i], {}) for i in range(10)]
    coming.clear()
    runner.wake()
    assert [results(f) for f in futures] == [[2 * i] for i in range(10)]
    assert run.sizes == [4, 4, 2]
    runner.stop()


def test_a_single_item_is_not_held_for_the_window_when_nothing_else_is_coming():
    run = Recorder()
    batcher, runner = make(run, max_batch_wait_ms=10_000)
    started = time.monotonic()
    assert results(batcher.submit("solo", [21], {})) == [42]
    assert time.monotonic() - started < 5
    runner.stop()


def test_window_bounds_the_wait_while_more_is_said_to_come():
    run = Recorder()
    batcher, runner = make(run, max_batch_wait_ms=100, more_coming=lambda: True)
    assert results(batcher.submit("j", [1, 2], {})) == [2, 4]
    assert run.sizes == [2]
    runner.stop()


def test_a_held_runner_batches_a_claims_jobs_together_and_flushes_full_batches_at_once():
    """While the consumer hands over one claim's jobs, nothing flushes early; a full batch does not wait."""
    run = Recorder()
    batcher, runner = make(run, max_batch_size=4, max_batch_wait_ms=10_000)
    runner.hold()
    futures = [batcher.submit(f"job{i}", [i], {}) for i in range(6)]
    assert [results(f) for f in futures[:4]] == [[0], [2], [4], [6]], "a full batch waited for the release"
    time.sleep(0.2)
    assert run.sizes == [4] and not futures[4][0].done(), "a partial batch flushed while the runner was held"
    runner.release()
    assert [results(f) for f in futures[4:]] == [[8], [10]]
    assert run.sizes == [4, 2]
    runner.stop()


def test_different_params_never_share_a_batch():
    seen = []

    def run(items, params):
        seen.append((params["k"], len(items)))
        return [item.payload for item in items]

    coming = threading.Event()
    coming.set()
    batcher, runner = make(run, max_batch_size=8, max_batch_wait_ms=5000, more_coming=coming.is_set)
    a = [batcher.submit(f"a{i}", ["x"], {"k": 1}) for i in range(3)]
    b = [batcher.submit(f"b{i}", ["y"], {"k": 2}) for i in range(2)]
    coming.clear()
    runner.wake()
    assert [results(f) for f in a + b] == [["x"]] * 3 + [["y"]] * 2
    assert sorted(seen) == [(1, 3), (2, 2)]
    runner.stop()


def test_a_failing_batch_is_rerun_job_by_job_so_only_the_guilty_job_fails():
    run = Recorder(fail_on=13)
    coming = threading.Event()
    coming.set()
    batcher, runner = make(run, max_batch_size=8, max_batch_wait_ms=5000, more_coming=coming.is_set)
    good = [batcher.submit(f"good{i}", [i], {}) for i in range(3)]
    bad = batcher.submit("bad", [13], {})
    coming.clear()
    runner.wake()
    assert [results(f) for f in good] == [[0], [2], [4]]
    with pytest.raises(ValueError, match="bad input 13"):
        bad[0].result(timeout=60)
    assert run.sizes[0] == 4
    runner.stop()


def test_partial_jobs_get_per_item_errors():
    run = Recorder(fail_on=13)
    batcher, runner = make(run)
    futures = batcher.submit("p", [1, 13, 3], {}, partial=True)
    assert futures[0].result(timeout=60) == 2 and futures[2].result(timeout=60) == 6
    assert isinstance(futures[1].exception(timeout=60), ValueError)
    runner.stop()


def test_cancelled_and_expired_items_are_dropped_before_the_forward_pass():
    run = Recorder()
    cancelled = {"gone"}
    batcher, runner = make(run, find_cancelled=lambda items: {i.job_id for i in items if i.job_id in cancelled})
    gone = batcher.submit("gone", [1], {})[0]
    late = batcher.submit("late", [2], {}, deadline=time.monotonic() - 1)[0]
    kept = batcher.submit("kept", [3], {})[0]
    assert kept.result(timeout=60) == 6
    assert isinstance(gone.exception(timeout=60), JobCancelled)
    assert isinstance(late.exception(timeout=60), JobTimeout)
    assert sum(run.sizes) == 1
    runner.stop()


def test_wrong_output_count_fails_the_batch_and_the_loop_survives():
    calls = []

    def run(items, params):
        payloads = [item.payload for item in items]
        calls.append(len(payloads))
        return payloads[:-1] if payloads[0] == "short" else payloads

    batcher, runner = make(run)
    with pytest.raises(RuntimeError, match="returned 1 outputs for 2 inputs"):
        batcher.submit("a", ["short", "x"], {})[0].result(timeout=60)
    assert batcher.submit("b", ["fine"], {})[0].result(timeout=60) == "fine"
    runner.stop()


def test_deployments_on_one_device_never_overlap():
    active, overlaps = [0], [0]
    lock = threading.Lock()

    def run(items, params):
        with lock:
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return [item.payload for item in items]

    runner = DeviceRunner("cuda:0")
    batchers = [Batcher(f"d{i}", run, max_batch_size=2, max_batch_wait_ms=1) for i in range(3)]
    for batcher in batchers:
        runner.add(batcher)
    runner.start()
    futures = [f for i in range(12) for f in batchers[i % 3].submit(f"j{i}", [i], {})]
    assert [f.result(timeout=60) for f in futures] == list(range(12))
    assert overlaps[0] == 1
    runner.stop()


class BatchRecorder(Recorder):
    """A Recorder that also keeps each batch's payloads."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[list] = []

    def __call__(self, items, params):
        self.batches.append([item.payload for item in items])
        return super().__call__(items, params)


def _lengths(payloads):
    return [len(p) for p in payloads]


def _submit_while_busy(batcher, runner, jobs):
    """Queue every job while the runner is busy, so the flush sees them all pending at once."""
    gate = threading.Event()
    runner.call(gate.wait)
    futures = {job_id: batcher.submit(job_id, payloads, {}) for job_id, payloads in jobs.items()}
    gate.set()
    return futures


def test_length_aware_batches_group_similar_lengths_and_keep_each_jobs_order():
    run = BatchRecorder()
    batcher, runner = make(run, max_batch_size=4, length_of=_lengths)
    try:
        jobs = {f"job{i}": [("x" * (1 + (i * 7 + k * 13) % 40)) for k in range(3)] for i in range(8)}
        futures = _submit_while_busy(batcher, runner, jobs)
        for job_id, payloads in jobs.items():
            assert [f.result(timeout=5) for f in futures[job_id]] == [p * 2 for p in payloads]
    finally:
        runner.stop()
    assert sum(len(b) for b in run.batches) == 24 and max(len(b) for b in run.batches) <= 4
    padded = sum(len(b) * max(map(len, b)) for b in run.batches)
    fifo_order = [p for payloads in jobs.values() for p in payloads]
    fifo_padded = sum(len(fifo_order[i:i + 4]) * max(map(len, fifo_order[i:i + 4])) for i in range(0, 24, 4))
    assert padded < fifo_padded, f"grouping by length should pad less: {padded} vs FIFO {fifo_padded}"


def test_the_oldest_item_always_goes_in_the_next_batch():
    run = BatchRecorder()
    batcher, runner = make(run, max_batch_size=2, length_of=_lengths)
    try:
        jobs = {"long": ["y" * 50], **{f"short{i}": ["s"] for i in range(6)}}
        futures = _submit_while_busy(batcher, runner, jobs)
        for job_futures in futures.values():
            [f.result(timeout=5) for f in job_futures]
    finally:
        runner.stop()
    assert "y" * 50 in run.batches[0]


def test_max_batch_tokens_caps_longest_times_count():
    run = BatchRecorder()
    batcher, runner = make(run, max_batch_size=8, length_of=_lengths, max_batch_tokens=40)
    try:
        jobs = {f"job{i}": ["z" * 10] for i in range(8)}
        futures = _submit_while_busy(batcher, runner, jobs)
        for job_futures in futures.values():
            [f.result(timeout=5) for f in job_futures]
    finally:
        runner.stop()
    assert [len(b) for b in run.batches] == [4, 4]
