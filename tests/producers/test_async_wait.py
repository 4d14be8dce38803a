"""``Job.aresult`` waits in the event loop: many waits need no executor threads and one pub/sub connection."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from producers.errors import JobCancelled, JobError, JobTimeout
from tests.oracle import assert_same, local_pipeline
from tests.tasks.private_models import private_models

FAULTY = "tests.fault_pipelines.FaultyTextClassification"
SLOW = "tests.fault_pipelines.SlowTextClassification"


@pytest.fixture(scope="module")
def models(module_fleet, model_dir, tmp_path_factory):
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-async"),
                           {"aw-tc": "text-classification", "aw-faulty": "text-classification"})
    config = module_fleet.config([
        {"name": "aw-tc", "task": "text-classification", "model": paths["aw-tc"], "max_batch_size": 8,
         "pipeline_kwargs": {"pipeline_class": SLOW}},
        {"name": "aw-faulty", "task": "text-classification", "model": paths["aw-faulty"],
         "pipeline_kwargs": {"pipeline_class": FAULTY}},
    ])
    module_fleet.worker(config, deployments=["aw-tc", "aw-faulty"], env={"PIPEFLEET_TEST_SLOW_S": "2"})
    return paths


def test_many_concurrent_waits_need_no_executor_threads(client, models):
    texts = [f"text number {i}" for i in range(48)]

    async def main():
        # Two executor threads for the short submit calls; 48 waits at once must not need more.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        jobs = [await client.asubmit(deployment="aw-tc", inputs=text) for text in texts]
        outputs = await asyncio.gather(*(job.aresult(timeout=120) for job in jobs))
        return outputs, client.waiter.book.has_waits()

    outputs, waits_left = asyncio.run(main())
    local = local_pipeline("text-classification", models["aw-tc"])
    assert_same(outputs, [local(text) for text in texts])
    assert not waits_left


def test_timeout_failure_and_cancel_raise_as_the_sync_result_does(client, models):
    async def main():
        slow = await client.asubmit(deployment="aw-tc", inputs="SLOW text")
        with pytest.raises(JobTimeout, match="did not finish within 0.2 s"):
            await slow.aresult(timeout=0.2)
        queued = await client.asubmit(deployment="aw-tc", inputs="behind the slow one")
        await queued.acancel()
        with pytest.raises(JobCancelled):
            await queued.aresult(timeout=60)
        faulty = await client.asubmit(deployment="aw-faulty", inputs="POISON pill")
        with pytest.raises(JobError, match="POISON"):
            await faulty.aresult(timeout=60)
        return await slow.aresult(timeout=60)

    assert_same(asyncio.run(main()), local_pipeline("text-classification", models["aw-tc"])("SLOW text"))


def test_64_concurrent_submit_and_wait_loops_share_the_waiter(client, models):
    texts = [f"sentence {i}" for i in range(128)]

    async def main():
        remaining = iter(texts)
        outputs: dict[str, object] = {}

        async def loop():
            for text in remaining:
                job = await client.asubmit(deployment="aw-tc", inputs=text)
                outputs[text] = await job.aresult(timeout=120)

        await asyncio.gather(*(loop() for _ in range(64)))
        return outputs

    outputs = asyncio.run(main())
    local = local_pipeline("text-classification", models["aw-tc"])
    assert_same([outputs[text] for text in texts], [local(text) for text in texts])


def test_waits_survive_the_waiters_pubsub_connection_being_killed(client, models, redis_server):
    async def main():
        jobs = [await client.asubmit(deployment="aw-tc", inputs=f"SLOW {i}") for i in range(2)]
        waits = [asyncio.ensure_future(job.aresult(timeout=120)) for job in jobs]
        await asyncio.sleep(0.5)  # let the waits subscribe
        killed = redis_server.client(1).client_kill_filter(_type="pubsub")
        return killed, await asyncio.gather(*waits)

    killed, outputs = asyncio.run(main())
    assert killed >= 1
    local = local_pipeline("text-classification", models["aw-tc"])
    assert_same(outputs, [local(f"SLOW {i}") for i in range(2)])
