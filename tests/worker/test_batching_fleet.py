"""Batching on a real worker: jobs share forward passes and keep their own results and semantics."""

from __future__ import annotations

import os
import signal
import time

import pytest

from producers import JobError, JobState, OutOfMemory
from producers.constants import INFER_TASK
from tests.fleet import deployment_metrics
from tests.oracle import assert_same, local_pipeline

FAULTY = "tests.fault_pipelines.FaultyTextClassification"
SLOW = "tests.fault_pipelines.SlowTextClassification"


@pytest.fixture(scope="module")
def model(model_dir):
    return str(model_dir("text-classification"))


@pytest.fixture(scope="module", autouse=True)
def worker(module_fleet, model):
    config = module_fleet.config([
        {"name": "bt-tc", "task": "text-classification", "model": model, "max_batch_size": 16,
         "max_batch_wait_ms": 50},
        {"name": "bt-faulty", "task": "text-classification", "model": model, "max_batch_size": 8,
         "max_batch_wait_ms": 200, "pipeline_kwargs": {"pipeline_class": FAULTY}},
        {"name": "bt-slow", "task": "text-classification", "model": model, "max_batch_size": 8,
         "pipeline_kwargs": {"pipeline_class": SLOW}},
        {"name": "bt-idle", "task": "text-classification", "model": model, "max_batch_wait_ms": 2000},
    ])
    return module_fleet.worker(config, env={"PIPEFLEET_TEST_SLOW_S": "1.5"})


def metrics(client, deployment):
    return deployment_metrics(client.celery, deployment)


def test_concurrent_jobs_are_batched(client):
    before = metrics(client, "bt-tc")["batch_size"]["count"]
    jobs = [client.submit(deployment="bt-tc", inputs=f"sentence number {i}") for i in range(64)]
    for job in jobs:
        job.result(timeout=60)
    snapshot = metrics(client, "bt-tc")
    batches = snapshot["batch_size"]["count"] - before
    assert batches < 64, "64 concurrent jobs ran as 64 separate forward passes"
    assert snapshot["batch_size"]["buckets"]["1"] < snapshot["batch_size"]["count"]


def test_two_hundred_concurrent_jobs_with_mixed_params_each_get_their_own_output(client, model):
    local = local_pipeline("text-classification", model)
    texts = [f"review {i}: {'great' if i % 3 else 'awful'} product, would {'not ' * (i % 2)}buy again"
             for i in range(200)]
    params = [{"top_k": 1 + i % 2} for i in range(200)]
    jobs = [client.submit(deployment="bt-tc", inputs=t, params=p) for t, p in zip(texts, params)]
    for job, text, p in zip(jobs, texts, params):
        assert_same(job.result(timeout=120), local(text, **p))


def test_a_bad_input_fails_only_its_own_job(client, model):
    local = local_pipeline("text-classification", model)
    texts = ["fine one", "fine two", "POISON pill", "fine three"]
    jobs = [client.submit(deployment="bt-faulty", inputs=t) for t in texts]
    for job, text in zip(jobs, texts):
        if "POISON" in text:
            with pytest.raises(JobError, match="contains POISON"):
                job.result(timeout=60)
        else:
            assert_same(job.result(timeout=60), local(text))


def test_out_of_memory_backs_off_then_fails_only_the_job_that_never_fits(client, model):
    local = local_pipeline("text-classification", model)
    splits_before = metrics(client, "bt-faulty")["oom_splits"]
    texts = [f"short text {i}" for i in range(6)]
    huge = " ".join(["word"] * 60)
    jobs = [client.submit(deployment="bt-faulty", inputs=t) for t in texts]
    huge_job = client.submit(deployment="bt-faulty", inputs=huge)
    for job, text in zip(jobs, texts):
        assert_same(job.result(timeout=60), local(text))
    with pytest.raises(OutOfMemory, match="out of memory .*batch size 1"):
        huge_job.result(timeout=60)
    assert metrics(client, "bt-faulty")["oom_splits"] > splits_before


def test_a_job_inside_a_chord_still_completes_the_chord(client, model):
    from celery import chord

    local = local_pipeline("text-classification", model)
    texts = ["first of the chord", "second of the chord", "third"]
    header = [client.celery.signature(INFER_TASK, kwargs={"spec": {"deployment": "bt-tc", "inputs": [t],
                                                                   "single": True}}, queue="pipefleet.bt-tc")
              for t in texts]
    body = client.celery.signature("celery.accumulate", queue="pipefleet.bt-tc")
    result = chord(header, app=client.celery)(body)
    (envelopes,) = result.get(timeout=60)  # celery.accumulate returns its positional args
    assert len(envelopes) == len(texts)
    for envelope, text in zip(envelopes, texts):
        assert_same(envelope["outputs"], local(text))


def test_a_revoked_job_waiting_in_the_batcher_is_not_run(client):
    items_before = metrics(client, "bt-slow")["items_total"]
    blocker = client.submit(deployment="bt-slow", inputs="SLOW blocker")
    time.sleep(0.5)  # the blocker's forward pass is now sleeping on the device
    waiting = client.submit(deployment="bt-slow", inputs="waits in the batcher")
    time.sleep(0.3)
    waiting.cancel()
    blocker.result(timeout=60)
    status = waiting.wait_until(lambda s: s.state is not JobState.PENDING, timeout=10)
    assert status.state is JobState.CANCELLED
    time.sleep(0.3)
    assert metrics(client, "bt-slow")["items_total"] == items_before + 1


def test_a_single_job_on_an_idle_worker_is_not_held_for_the_window(client):
    started = time.monotonic()
    client.submit(deployment="bt-idle", inputs="alone").result(timeout=30)
    elapsed = time.monotonic() - started
    wait = metrics(client, "bt-idle")["queue_wait_s"]
    assert wait["buckets"]["1.0"] == wait["count"], "an item waited a second or more for the 2 s window"
    assert elapsed < 1.9


def test_interactive_priority_overtakes_bulk(module_fleet, model):
    config = module_fleet.config([{"name": "bt-prio", "task": "text-classification", "model": model,
                                   "max_batch_size": 1}])
    worker = module_fleet.worker(config, args=["--concurrency", "1"])
    with module_fleet.client() as client:
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            bulk = [client.submit(deployment="bt-prio", inputs=f"bulk {i}", priority=9) for i in range(12)]
            urgent = client.submit(deployment="bt-prio", inputs="urgent", priority=0)
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        urgent.result(timeout=60)
        for job in bulk:
            job.result(timeout=60)
        done_at = {job.id: client.celery.backend.get_task_meta(job.id)["date_done"] for job in [*bulk, urgent]}
        order = sorted(done_at, key=done_at.get)
        assert order.index(urgent.id) <= 1, "the urgent job waited behind the bulk jobs"
