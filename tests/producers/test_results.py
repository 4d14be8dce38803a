"""The shared result waiter: bursts read in few round trips, sync and async, with every error mapped as before."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid

import pytest

from producers import (FleetClient, FleetUnavailable, JobCancelled, JobError, JobTimeout, OutOfMemory)
from tests.fault_pipelines import POISON_MARKER
from tests.fleet import RedisServer
from tests.oracle import assert_same, local_pipeline

TC = "res-tc"
FAULTY = "res-faulty"


@pytest.fixture(scope="module")
def model(model_dir):
    return str(model_dir("text-classification"))


@pytest.fixture(scope="module")
def worker(module_fleet, model):
    config = module_fleet.config([
        {"name": TC, "task": "text-classification", "model": model, "max_batch_size": 16},
        {"name": FAULTY, "task": "text-classification", "model": model, "max_batch_size": 8,
         "pipeline_kwargs": {"pipeline_class": "tests.fault_pipelines.FaultyTextClassification"}},
    ])
    return module_fleet.worker(config, deployments=[TC, FAULTY])


@pytest.fixture
def stopped(worker):
    """The worker, paused for the test's duration (jobs wait in the queue)."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    time.sleep(0.3)
    try:
        yield worker
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)


def _count_calls(obj, name: str) -> list:
    calls: list = []
    original = getattr(obj, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, name, counting)
    return calls


def test_one_waiting_client_reads_a_burst_without_polling(client, worker, model):
    """A burst of 200 results costs at most one MGET per job, however the worker's commits interleave with the
    waiter's wake-ups (on a quiet machine a few per batch; on a busy one the waiter wakes more often)."""
    texts = [f"waiting sentence {i} is {'fine' if i % 2 else 'poor'}" for i in range(200)]
    mgets = _count_calls(client.waiter._redis, "mget")
    jobs = client.submit_many([{"deployment": TC, "inputs": text} for text in texts])
    outputs = [job.result(timeout=120) for job in jobs]
    del client.waiter._redis.mget
    assert_same(outputs, [local_pipeline("text-classification", model)(text) for text in texts])
    assert len(mgets) <= len(texts), f"{len(mgets)} MGETs for {len(texts)} jobs"


def test_results_keeps_order_and_reads_results_that_celery_reads_too(client, worker, model):
    texts = [f"ordered {i}" for i in range(50)]
    jobs = [client.submit(deployment=TC, inputs=text) for text in texts]
    outputs = client.results(list(reversed(jobs)), timeout=120)
    assert_same(outputs, [local_pipeline("text-classification", model)(t) for t in reversed(texts)])
    assert client.celery.AsyncResult(jobs[0].id).get(timeout=10)["outputs"] == outputs[-1]
    assert jobs[0].result() == outputs[-1]  # read once, kept by the Job


def test_many_threads_share_one_waiter(client, worker, model):
    local = local_pipeline("text-classification", model)
    outputs: dict[int, object] = {}

    def run(index: int) -> None:
        for round_ in range(5):
            text = f"thread {index} round {round_}"
            job = client.submit(deployment=TC, inputs=text)
            outputs[(index, round_)] = (job.result(timeout=120), text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(outputs) == 40
    for output, text in outputs.values():
        assert_same(output, local(text))


def test_async_waits_hold_no_thread(client, worker, model):
    local = local_pipeline("text-classification", model)
    texts = [f"async sentence {i}" for i in range(60)]

    async def main():
        jobs = await client.asubmit_many([{"deployment": TC, "inputs": text} for text in texts])
        threads_before = threading.active_count()
        peak = threads_before
        gathered = asyncio.gather(*(job.aresult(timeout=120) for job in jobs[:30]))
        while not gathered.done():
            peak = max(peak, threading.active_count())
            await asyncio.sleep(0.01)
        rest = await client.aresults(jobs[30:], timeout=120)
        return await gathered + rest, peak - threads_before

    outputs, extra_threads = asyncio.run(main())
    assert_same(outputs, [local(text) for text in texts])
    assert extra_threads <= 2, f"{extra_threads} threads for 30 awaiting jobs"


def test_results_map_worker_errors_per_job(client, worker, model):
    local = local_pipeline("text-classification", model)
    texts = ["fine one", f"{POISON_MARKER} pill", "fine two", " ".join(["word"] * 60)]
    jobs = client.submit_many([{"deployment": FAULTY, "inputs": text} for text in texts])
    outputs = client.results(jobs, timeout=120, return_exceptions=True)
    assert_same(outputs[0], local("fine one"))
    assert_same(outputs[2], local("fine two"))
    assert type(outputs[1]) is JobError and "contains POISON" in str(outputs[1])
    assert isinstance(outputs[3], OutOfMemory)
    with pytest.raises(JobError, match="contains POISON"):
        client.results(jobs, timeout=120)
    with pytest.raises(JobError, match="contains POISON"):
        asyncio.run(jobs[1].aresult(timeout=30))
    assert isinstance(asyncio.run(client.aresults(jobs, timeout=30, return_exceptions=True))[3], OutOfMemory)


def test_results_time_out_and_see_cancellations(client, stopped):
    waiting = client.submit(deployment=TC, inputs="queued while the worker is paused")
    cancelled = client.submit(deployment=TC, inputs="cancelled while queued")
    with pytest.raises(JobTimeout):
        client.results([waiting], timeout=0.3)
    with pytest.raises(JobTimeout):
        waiting.result(timeout=0.2)
    with pytest.raises(JobTimeout):
        asyncio.run(waiting.aresult(timeout=0.2))
    cancelled.cancel()
    outputs = client.results([cancelled, waiting], timeout=0.3, return_exceptions=True)
    assert isinstance(outputs[0], JobCancelled) and isinstance(outputs[1], JobTimeout)
    with pytest.raises(JobCancelled):
        asyncio.run(client.job(cancelled.id).aresult(timeout=5))


def test_a_reattached_job_is_read_by_id_from_a_second_client(module_fleet, client, worker, model):
    job = client.submit(deployment=TC, inputs="read me from elsewhere")
    with module_fleet.client() as other:
        assert_same(other.job(job.id).result(timeout=60), local_pipeline("text-classification", model)(
            "read me from elsewhere"))
        assert other.results([other.job(job.id)]) == [job.result(timeout=5)]
        # A result already stored is read even with no time to wait.
        assert other.job(job.id).result(timeout=0) == job.result()
        assert asyncio.run(other.job(job.id).aresult(timeout=0)) == job.result()


def test_waits_on_a_redis_that_refuses_us_raise_fleet_unavailable():
    server = RedisServer(password="right-pw").start()
    try:
        bare = f"redis://127.0.0.1:{server.port}"
        for url, message in ((bare, "needs a password|Authentication required"),
                             (f"redis://:wrong@127.0.0.1:{server.port}", "refused the credentials|invalid")):
            with FleetClient(f"{url}/0", f"{url}/1") as intruder:
                job = intruder.job(str(uuid.uuid4()))
                with pytest.raises(FleetUnavailable, match=message):
                    intruder.results([job], timeout=5)
                with pytest.raises(FleetUnavailable, match=message):
                    asyncio.run(intruder.aresults([job], timeout=5))
                with pytest.raises(FleetUnavailable, match=message):
                    asyncio.run(job.aresult(timeout=5))
                with pytest.raises(FleetUnavailable, match=message):
                    intruder.submit_many([{"deployment": TC, "inputs": "x"}])
        # A result backend without the password: the broker lets the client in, the waiter itself is refused.
        with FleetClient(f"{server.url}/0", f"{bare}/1") as half:
            with pytest.raises(FleetUnavailable, match="needs a password|Authentication required"):
                half.job(str(uuid.uuid4())).result(timeout=10)
    finally:
        server.cleanup()
