"""Warm shutdown fits a pod's grace period: SIGTERM while a batch runs longer than ``shutdown_timeout_s``.

The worker must exit once the bound passes (with a line saying why), and the job it
held must be redelivered and completed by another worker with the in-process output.
"""

from __future__ import annotations

import time

import pytest

from tests.oracle import assert_same, local_pipeline

SLOW = "tests.fault_pipelines.SlowTextClassification"


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_a_batch_running_past_the_bound_ends_the_worker_and_the_job_runs_elsewhere(fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = fleet.config([{"name": "sb-slow", "task": "text-classification", "model": model,
                            "pipeline_kwargs": {"pipeline_class": SLOW}}],
                          shutdown_timeout_s=3, visibility_timeout_s=8)
    victim = fleet.worker(config, env={"PIPEFLEET_TEST_SLOW_S": "60"})
    with fleet.client() as client:
        job = client.submit(deployment="sb-slow", inputs="SLOW past the bound")
        deadline = time.monotonic() + 60
        while "fault-pipeline batch" not in victim.log():
            assert time.monotonic() < deadline, victim.log()[-3000:]
            time.sleep(0.05)
        asked = time.monotonic()
        victim.proc.terminate()
        assert victim.proc.wait(30) == 1
        assert time.monotonic() - asked < 3 + 10
        assert "did not finish within shutdown_timeout_s" in victim.log()
        fleet.worker(config, env={"PIPEFLEET_TEST_SLOW_S": "0.1"})
        assert_same(job.result(timeout=120), local_pipeline("text-classification", model)("SLOW past the bound"))
