"""Fair claiming across the deployments one worker serves: a backlog in one never starves another."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import Fleet
from tests.fault_pipelines import BATCH_LOG_PREFIX, SLOW_S_ENV
from tests.oracle import assert_same, local_pipeline
from tests.worker.test_faults import _deployment, _figures, _wait_for
from worker.kombu_layout import lease_key
from worker.lease import LeaseKeeper

BACKLOG = int(os.environ.get("PIPEFLEET_FAIR_BACKLOG", "200"))


def _single_job_behind_a_backlog(fleet: Fleet, model: str, backlog: int) -> None:
    config = fleet.config([_deployment("fair-busy", model, max_batch_size=4, max_batch_wait_ms=5),
                           {"name": "fair-quiet", "task": "text-classification", "model": model,
                            "max_batch_size": 4}])
    worker = fleet.worker(config, deployments=["fair-busy", "fair-quiet"], env={SLOW_S_ENV: "0.5"},
                          args=["--concurrency", "8"])
    with fleet.client() as client:
        client.submit_many([{"deployment": "fair-busy", "inputs": f"SLOW backlog {i}"} for i in range(backlog)])
        _wait_for(lambda: worker.log().count(BATCH_LOG_PREFIX) >= 2, 60, "the backlog to start running")
        before = worker.log().count(BATCH_LOG_PREFIX)
        text = "the quiet deployment's single job"
        started = time.monotonic()
        output = client.submit(deployment="fair-quiet", inputs=text).result(timeout=60)
        waited_s = time.monotonic() - started
        busy_batches = worker.log().count(BATCH_LOG_PREFIX) - before
    worker.kill()
    broker = fleet.server.client(int(fleet.broker_url.rsplit("/", 1)[1]))
    broker.delete(lease_key(worker.name))
    LeaseKeeper(broker, "fair-cleanup").reap()  # the backlog it held back into the queue, then all of it away
    leftovers = broker.keys("pipefleet.fair-busy*")
    if leftovers:
        broker.delete(*leftovers)
    assert_same(output, local_pipeline("text-classification", model)(text))
    # At most: the batch running at submission, the claim of the backlog's batch that may come first in the
    # round robin, and the backlog's batch already waiting on the device (its items are older). Without round
    # robin the quiet job waits for the whole backlog (BACKLOG / 4 batches).
    assert busy_batches <= 3, f"the single job waited behind {busy_batches} batches of the backlog"
    _figures("fair-claiming", backlog=backlog, busy_batches_before_quiet_job=busy_batches,
             quiet_job_s=round(waited_s, 2))


def test_a_backlog_in_one_deployment_delays_anothers_job_by_about_one_batch(fleet: Fleet, model_dir):
    _single_job_behind_a_backlog(fleet, str(model_dir("text-classification")), BACKLOG)


@pytest.mark.heavy
def test_ten_thousand_queued_jobs_delay_anothers_job_by_about_one_batch(fleet: Fleet, model_dir):
    _single_job_behind_a_backlog(fleet, str(model_dir("text-classification")), 10_000)
