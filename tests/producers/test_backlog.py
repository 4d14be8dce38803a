"""The backlog gauge: exact under priorities, claims and a paused (SIGSTOP) worker; exported everywhere.

The oracle decodes every message in the deployment's queue lists and claim
records in Python (not through :mod:`producers.backlog`) and checks the gauge
against it and against the jobs that have no final result.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from producers.backlog import CLAIMS_KEY, backlogs
from producers.constants import queue_name
from producers.fleet import queue_keys
from tests.conftest import Fleet
from tests.fleet import REPO_ROOT, free_port, worker_env
from tests.gateway.server import start_gateway
from tests.oracle import assert_same, local_pipeline

SLOW = "tests.fault_pipelines.SlowTextClassification"
BUSY, IDLE = "bl-tc", "bl-idle"


@pytest.fixture(scope="module")
def backlog_fleet(redis_server, tmp_path_factory, model_dir):
    fleet = Fleet(redis_server, tmp_path_factory.mktemp("backlog"), db_pair=(8, 9))
    model = str(model_dir("text-classification"))
    config = fleet.config([
        {"name": BUSY, "task": "text-classification", "model": model, "max_batch_size": 4,
         "pipeline_kwargs": {"pipeline_class": SLOW}},
        {"name": IDLE, "task": "text-classification", "model": model},
    ])
    yield {"fleet": fleet, "config": config, "model": model}
    fleet.stop()


def _cli(fleet: Fleet, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "producers.cli", "--broker-url", fleet.broker_url,
                             "--result-backend", fleet.result_backend, *args],
                            cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _decoded_ids(broker, deployment: str) -> tuple[list[str], list[str]]:
    """Ids of the deployment's queued messages and of its claimed ones, decoded here in full."""
    queued = [json.loads(raw)["headers"]["id"] for key in queue_keys(queue_name(deployment))
              for raw in broker.lrange(key, 0, -1)]
    claimed = []
    for raw in broker.hvals(CLAIMS_KEY):
        message, _, routing_key = json.loads(raw)
        if routing_key == queue_name(deployment):
            claimed.append(message["headers"]["id"])
    return queued, claimed


def _gauge(text: str, deployment: str) -> float | None:
    found = re.search(rf'^pipefleet_backlog{{deployment="{re.escape(deployment)}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def test_claims_are_counted_where_kombu_and_the_bulk_claim_record_them(redis_server):
    from kombu.utils.json import dumps

    from worker.kombu_layout import UNACKED_KEY

    assert CLAIMS_KEY == UNACKED_KEY
    broker = redis_server.client(10)
    broker.flushdb()
    message = {"headers": {"id": "j1"}, "properties": {"delivery_tag": "t1"}}
    broker.hset(CLAIMS_KEY, mapping={
        "t1": dumps([message, "", queue_name("a")]),  # as kombu's QoS.append writes it
        "t2": "[" + json.dumps(message, separators=(",", ":")) + ',"","' + queue_name("a") + '"]',  # the claim script
        "t3": dumps([message, "", queue_name("b")]),
    })
    [a, b, c] = backlogs(broker, ["a", "b", "c"])
    assert (a.claimed, b.claimed, c.claimed) == (2, 1, 0)
    broker.flushdb()


def test_backlog_is_exact_under_priorities_claims_and_a_paused_worker(backlog_fleet):
    fleet = backlog_fleet["fleet"]
    broker = fleet.server.client(8)
    metrics_port = free_port()
    # It holds 8 of the 20 jobs (two batches of 4), so some stay queued while others are claimed.
    worker = fleet.worker(backlog_fleet["config"], deployments=[BUSY],
                          args=["--metrics-port", str(metrics_port), "--concurrency", "8"],
                          env={"PIPEFLEET_TEST_SLOW_S": "1.5"})
    subprocess.run([sys.executable, "-m", "worker", "--config", str(backlog_fleet["config"]), "--deployment", IDLE,
                    "--register-only"], cwd=REPO_ROOT, env=worker_env(), check=True, capture_output=True, timeout=120)
    with fleet.client() as client:
        texts = [f"SLOW review {i}: {'good' if i % 2 else 'bad'}" for i in range(20)]
        priorities = [None, 0, 3, 9, 7]
        jobs = client.submit_many([{"deployment": BUSY, "inputs": text, "priority": priorities[i % 5]}
                                   for i, text in enumerate(texts)])
        idle_jobs = client.submit_many([{"deployment": IDLE, "inputs": "never run", "priority": p} for p in (0, 9, 9)])
        deadline = time.monotonic() + 60
        while "fault-pipeline batch" not in worker.log():  # a batch is running: claims exist
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)  # let a claim script already sent finish on the server
            [busy, idle] = backlogs(broker, [BUSY, IDLE])
            queued_ids, claimed_ids = _decoded_ids(broker, BUSY)
            assert (busy.queued, busy.claimed) == (len(queued_ids), len(claimed_ids))
            assert busy.queued > 0 and busy.claimed > 0, (busy, worker.log()[-2000:])
            assert not set(queued_ids) & set(claimed_ids)
            assert sum(1 for key in queue_keys(queue_name(BUSY)) if broker.llen(key)) >= 2  # several priority lists
            metas = client.celery.backend.client.mget([f"celery-task-meta-{job.id}" for job in jobs])
            final = {job.id for job, raw in zip(jobs, metas)
                     if raw and json.loads(raw)["status"] in ("SUCCESS", "FAILURE", "REVOKED")}
            owed = {job.id for job in jobs} - final
            counted = set(queued_ids) | set(claimed_ids)
            assert owed <= counted  # nothing the deployment owes is missed
            assert counted - owed <= final  # the only extras are finished jobs whose ack is on its way
            assert (idle.queued, idle.claimed, idle.total) == (3, 0, 3)
            assert int(_cli(fleet, "backlog", BUSY)) == busy.total
            snapshot = json.loads(_cli(fleet, "fleet", "--json"))
            views = {view["name"]: view for view in snapshot["deployments"]}
            assert (views[BUSY]["backlog"], views[BUSY]["claimed"]) == (busy.total, busy.claimed)
            assert views[IDLE]["backlog"] == 3 and views[IDLE]["workers"] == []
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        local = local_pipeline("text-classification", backlog_fleet["model"])
        for text, output in zip(texts, client.results(jobs, timeout=240)):
            assert_same(output, local(text))
        assert backlogs(broker, [BUSY])[0].total == 0
        assert _gauge(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text, BUSY) == 0.0
        gateway = start_gateway(backlog_fleet["config"], fleet.directory)
        try:
            text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
            assert _gauge(text, IDLE) == 3.0 and _gauge(text, BUSY) == 0.0
        finally:
            gateway.stop()
        assert len(idle_jobs) == 3


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_workers_started_as_the_backlog_asks_drain_every_job(tmp_path):
    from benchmarks.autoscale import simulate

    rows = simulate(jobs=600, per_worker=200, max_workers=3, directory=tmp_path)
    assert rows[0]["backlog"] == 600 and rows[0]["desired"] == 3 and rows[0]["started"] == 3
    assert rows[-1]["backlog"] == 0
    assert all(row["started"] == max(r["desired"] for r in rows[:i + 1]) for i, row in enumerate(rows))
