"""What closing the failover window costs: submit() and result writes with and without ``WAIT 1``.

Starts a real master, replica and three Sentinels (``tests/ha_infra.py``), registers a
deployment (no worker: only the producer's and the result writer's Redis work is timed),
then, side by side in one run over the same ``sentinel://`` URLs:

- ``submit()`` one job at a time, and ``submit_many`` in bursts of 100;
- result writes as a worker's hot path commits them (groups of 32) and as Celery's backend
  stores one (``_set``, used for failures and chord parts).

    python -m benchmarks.replication --jobs 2000
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from producers import FleetClient
from producers.celery_app import worker_backend_url
from producers.redis_clients import RedisOptions, ReplicaWait
from producers.schemas import DeploymentTerms
from tests.ha_infra import SentinelCluster
from worker.advertise import register, registration_of
from worker.retrying import pipeline_until_done

DEPLOYMENT = "bench-replication"


def _per_job_us(seconds: float, jobs: int) -> float:
    return seconds / jobs * 1e6


def _submit_costs(cluster: SentinelCluster, jobs: int, replicas: int) -> dict[str, float]:
    options = RedisOptions(sentinel_master_name=cluster.master_name, wait_replicas=replicas)
    with FleetClient(cluster.url(0), cluster.url(1), redis_options=options) as client:
        client.submit(deployment=DEPLOYMENT, inputs="warm up")
        started = time.perf_counter()
        for i in range(jobs):
            client.submit(deployment=DEPLOYMENT, inputs=f"job {i}")
        single = time.perf_counter() - started
        started = time.perf_counter()
        for start in range(0, jobs, 100):
            client.submit_many([{"deployment": DEPLOYMENT, "inputs": f"job {i}"} for i in range(start, start + 100)])
        burst = time.perf_counter() - started
        backend = client.celery.backend
        value = '{"status": "SUCCESS", "result": {"outputs": [{"label": "LABEL_0", "score": 0.5}]}}'
        wait = ReplicaWait(replicas, options.wait_timeout_ms)
        started = time.perf_counter()
        for start in range(0, jobs, 32):
            def store(pipe, start=start) -> None:
                for i in range(start, min(start + 32, jobs)):
                    pipe.setex(f"celery-task-meta-bench-{i}", 600, value)
                    pipe.publish(f"celery-task-meta-bench-{i}", value)
            pipeline_until_done(backend.client, store, "bench results", wait=wait)
        grouped = time.perf_counter() - started
    # Celery's own store, through pipefleet's worker backend class (WAIT inside its _set).
    from celery import Celery

    from producers.celery_app import celery_settings

    app = Celery("bench", set_as_current=False)
    app.conf.update(celery_settings(broker_url=cluster.url(0), result_backend=worker_backend_url(cluster.url(1)),
                                    redis_options=options))
    started = time.perf_counter()
    for i in range(jobs // 4):
        app.backend._set(f"celery-task-meta-bench-one-{i}", value)
    single_store = time.perf_counter() - started
    app.close()
    return {"submit() per job": _per_job_us(single, jobs), "submit_many(100) per job": _per_job_us(burst, jobs),
            "hot-path result commit (32/group) per job": _per_job_us(grouped, jobs),
            "Celery backend store per result": _per_job_us(single_store, jobs // 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cluster = SentinelCluster(Path(directory)).start()
        try:
            master = cluster.master().client(0)
            register(master, [registration_of(DeploymentTerms(name=DEPLOYMENT, task="text-classification",
                                                              model="bench", queue=f"pipefleet.{DEPLOYMENT}"),
                                              "benchmark")])
            rows = {replicas: _submit_costs(cluster, args.jobs, replicas) for replicas in (0, 1)}
        finally:
            cluster.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, commit {commit}, "
          f"{args.jobs} jobs, master + replica + 3 Sentinels on localhost")
    print(f"{'per job, microseconds':45} {'no WAIT':>10} {'WAIT 1':>10} {'cost':>10}")
    for name in rows[0]:
        print(f"{name:45} {rows[0][name]:10.1f} {rows[1][name]:10.1f} {rows[1][name] - rows[0][name]:10.1f}")


if __name__ == "__main__":
    main()
