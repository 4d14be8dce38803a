"""Worker lifecycle: health check, warm shutdown during a batch, heartbeat expiry after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from producers.constants import DEAD_LETTER_KEY
from producers.fleet import fleet_snapshot
from tests.fault_pipelines import SLOW_MARKER, SLOW_S_ENV
from tests.fleet import REPO_ROOT, wait_for_worker, worker_env

SLOW = "tests.fault_pipelines.SlowTextClassification"
HEARTBEAT_TTL_S = 2


@pytest.fixture(scope="module")
def two_workers(module_fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = module_fleet.config(
        [{"name": "lc-slow", "task": "text-classification", "model": model, "max_batch_size": 4,
          "max_batch_wait_ms": 50, "pipeline_kwargs": {"pipeline_class": SLOW}}],
        heartbeat_ttl_s=HEARTBEAT_TTL_S, heartbeat_interval_s=0.5,
    )
    env = {SLOW_S_ENV: "0.5"}
    first = module_fleet.worker(config, deployments=["lc-slow"], env=env, args=["--concurrency", "4"], wait=False)
    second = module_fleet.worker(config, deployments=["lc-slow"], env=env, args=["--concurrency", "4"])
    wait_for_worker(first, module_fleet.server.client(0))
    return {"config": config, "first": first, "second": second}


def _check(config, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "--name", name, "--check"],
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=60)


def test_health_check_passes_for_a_live_worker_and_fails_otherwise(two_workers):
    healthy = _check(two_workers["config"], two_workers["first"].name)
    assert healthy.returncode == 0, healthy.stderr
    assert "healthy" in healthy.stdout
    missing = _check(two_workers["config"], "no-such-worker")
    assert missing.returncode == 1 and "lc-slow" in missing.stderr


def test_sigterm_during_a_batch_loses_no_job(module_fleet, two_workers):
    first, second = two_workers["first"], two_workers["second"]
    with module_fleet.client() as client:
        jobs = [client.submit(deployment="lc-slow", inputs=[f"{SLOW_MARKER} job {i}"]) for i in range(24)]
        time.sleep(0.8)  # both workers are inside a slow forward pass now
        assert first.terminate(timeout_s=60) == 0, first.log()[-3000:]
        results = [job.result(timeout=90) for job in jobs]
        served_by = [client.celery.backend.get_task_meta(job.id)["result"]["worker"] for job in jobs]
    assert len(results) == len(jobs) and all(isinstance(r, list) and r[0]["label"] for r in results)
    assert first.name in served_by and second.name in served_by
    log = first.log()
    assert "ran a batch" in log
    assert not [job for job in jobs if job.status().state.value != "SUCCESS"]


def test_a_killed_worker_vanishes_from_discovery_and_fleet(module_fleet, two_workers):
    second = two_workers["second"]
    with module_fleet.client() as client:
        assert any(second.name in info.workers for info in client.deployments())
        second.kill()
        deadline = time.monotonic() + HEARTBEAT_TTL_S + 5
        while time.monotonic() < deadline and any(second.name in i.workers for i in client.deployments()):
            time.sleep(0.2)
        assert not any(second.name in info.workers for info in client.deployments())
        assert second.name not in [w.name for w in fleet_snapshot(client).workers]
    assert _check(two_workers["config"], second.name).returncode == 1


def _lone_worker(module_fleet, two_workers):
    return module_fleet.worker(two_workers["config"], deployments=["lc-slow"], args=["--concurrency", "2"],
                               env={SLOW_S_ENV: "1.0"})


def _terminate_then_count(module_fleet, lone, job_ids: list[str]) -> int:
    """SIGTERM ``lone``; returns how many messages are back in the queue (and checks none stays unacked, and none
    was dead-lettered: a job claimed while Celery's pool shuts down goes back to its queue)."""
    redis = module_fleet.server.client(0)
    assert lone.terminate(timeout_s=60) == 0, lone.log()[-3000:]
    keys = (b"pipefleet.lc-slow", *redis.keys(b"pipefleet.lc-slow\x06\x16*"))
    queued = sum(redis.llen(key) for key in keys)
    assert redis.hlen("unacked") == 0
    # The module's Redis is shared with other tests' poison messages: only these jobs must be absent.
    dead = [record for record in redis.lrange(DEAD_LETTER_KEY, 0, -1) if json.loads(record).get("job_id") in job_ids]
    assert not dead, dead
    redis.delete(*keys)
    return queued


def test_warm_shutdown_hands_unstarted_jobs_back_to_the_queue(module_fleet, two_workers):
    lone = _lone_worker(module_fleet, two_workers)
    with module_fleet.client() as client:
        jobs = [client.submit(deployment="lc-slow", inputs=[f"{SLOW_MARKER} lone {i}"]) for i in range(8)]
        time.sleep(1.0)
        queued = _terminate_then_count(module_fleet, lone, [job.id for job in jobs])
        finished = [job for job in jobs if job.status().state.value == "SUCCESS"]
        assert 1 <= len(finished) < len(jobs)
        assert queued == len(jobs) - len(finished), "every unfinished job is back in the queue"


def test_warm_shutdown_hands_back_unstarted_jobs_of_celerys_path_too(module_fleet, two_workers):
    """Group members take Celery's own path; those not started at SIGTERM go back to the queue at once."""
    from celery import group, signature

    from producers.constants import INFER_TASK

    lone = _lone_worker(module_fleet, two_workers)
    with module_fleet.client() as client:
        members = [signature(INFER_TASK, kwargs={"spec": {"deployment": "lc-slow",
                                                          "inputs": [f"{SLOW_MARKER} group {i}"]}},
                             queue="pipefleet.lc-slow", app=client.celery) for i in range(8)]
        result = group(members).apply_async()
        time.sleep(1.0)
        queued = _terminate_then_count(module_fleet, lone, [r.id for r in result.results])
        finished = [r for r in result.results if r.state == "SUCCESS"]
        assert "Task pipefleet.infer[" in lone.log(), "the group members did not take Celery's path"
        assert len(finished) < len(members)
        assert queued == len(members) - len(finished), "every unfinished group member is back in the queue"
