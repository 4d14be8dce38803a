"""``pipefleet fleet``: two real workers, their deployments and queue depths while jobs wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from producers.fleet import build_snapshot, format_fleet, queue_keys
from producers.schemas import DeploymentAd
from tests.fleet import REPO_ROOT, worker_env


def _fleet_json(fleet) -> dict:
    result = subprocess.run([sys.executable, "-m", "producers.cli", "--broker-url", fleet.broker_url,
                             "--result-backend", fleet.result_backend, "fleet", "--json"],
                            cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_queue_keys_cover_the_priority_sub_queues():
    assert queue_keys("pipefleet.x") == ["pipefleet.x", "pipefleet.x\x06\x163", "pipefleet.x\x06\x166",
                                         "pipefleet.x\x06\x169"]


def test_snapshot_groups_ads_by_worker_and_deployment():
    ads = [DeploymentAd(name=n, task="t", model="m", worker=w, device=d, queue=f"pipefleet.{n}", in_flight=i,
                        heartbeat_at=100.0 - age, started_at=50.0)
           for n, w, d, i, age in (("a", "w1", "cuda:0", 2, 1.0), ("b", "w1", "cuda:0", 0, 1.0),
                                   ("a", "w2", "cpu", 1, 4.0))]
    snapshot = build_snapshot(ads, {"pipefleet.a": 7}, now=100.0)
    workers = {w.name: w for w in snapshot.workers}
    assert workers["w1"].deployments == ["a", "b"] and workers["w1"].in_flight == 2
    assert workers["w2"].heartbeat_age_s == 4.0 and workers["w2"].devices == ["cpu"]
    deployments = {d.name: d for d in snapshot.deployments}
    assert deployments["a"].queue_depth == 7 and deployments["a"].workers == ["w1", "w2"]
    assert deployments["a"].in_flight == 3 and deployments["b"].queue_depth == 0
    text = format_fleet(snapshot)
    assert "w1" in text and "cuda:0" in text and "DEPLOYMENTS" in text


def test_fleet_does_not_import_torch():
    code = "import sys, producers.fleet, producers.cli; assert 'torch' not in sys.modules and 'worker' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env=worker_env())


def test_fleet_shows_two_workers_and_queue_depths_while_jobs_wait(fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = fleet.config([
        {"name": "ft-a", "task": "text-classification", "model": model, "max_batch_size": 4},
        {"name": "ft-b", "task": "text-classification", "model": model, "max_batch_size": 4},
    ])
    worker_a = fleet.worker(config, deployments=["ft-a"], wait=False)
    worker_b = fleet.worker(config, deployments=["ft-b"])
    from tests.fleet import wait_for_worker

    wait_for_worker(worker_a, fleet.server.client(0))
    with fleet.client() as client:
        done = client.submit(deployment="ft-a", inputs=["served at once"])
        done.result(timeout=60)
        os.kill(worker_b.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(2.0)  # let the paused worker's pending BRPOP time out on the server
            jobs = [client.submit(deployment="ft-b", inputs=[f"queued {i}"], priority=p)
                    for i, p in enumerate((None, 0, 9, 3, None))]
            snapshot = _fleet_json(fleet)
            workers = {w["name"]: w for w in snapshot["workers"]}
            assert set(workers) == {worker_a.name, worker_b.name}
            assert workers[worker_a.name]["deployments"] == ["ft-a"]
            assert workers[worker_b.name]["deployments"] == ["ft-b"]
            assert workers[worker_a.name]["devices"] == ["cpu"]
            assert 0 <= workers[worker_a.name]["heartbeat_age_s"] < 15
            deployments = {d["name"]: d for d in snapshot["deployments"]}
            assert deployments["ft-b"]["queue_depth"] == len(jobs)
            assert deployments["ft-a"]["queue_depth"] == 0
            assert deployments["ft-b"]["workers"] == [worker_b.name]
            assert deployments["ft-a"]["in_flight"] == 0
        finally:
            os.kill(worker_b.proc.pid, signal.SIGCONT)
        for job in jobs:
            job.result(timeout=60)
    assert {d["name"]: d["queue_depth"] for d in _fleet_json(fleet)["deployments"]} == {"ft-a": 0, "ft-b": 0}
