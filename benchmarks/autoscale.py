"""Autoscaling on the backlog, simulated with real workers: start workers as the backlog metric asks, drain the jobs.

KEDA's rule for a Prometheus trigger with ``threshold: T`` is ``desired = ceil(backlog / T)`` up to
``maxReplicaCount``. This script applies that rule to ``pipefleet_backlog`` as
:func:`producers.backlog.backlogs` reads it (the gauge's own function), starting real ``pipefleet worker``
processes, from zero, against a private redis-server. It prints the figure beside the workers started,
then checks every output against the in-process pipeline.

    python -m benchmarks.autoscale --jobs 5000 --per-worker 1000 --max-workers 3
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from producers import FleetClient
from producers.backlog import backlogs
from tests import tiny_models
from tests.fleet import REPO_ROOT, RedisServer, start_worker, worker_env, write_config
from tests.oracle import assert_same, local_pipeline

DEPLOYMENT = "autoscale"
TEXTS = ["great service", "awful food", "fine, I guess", "what a wonderful day", "never again"]


def simulate(jobs: int, per_worker: int, max_workers: int, poll_s: float = 1.0,
             directory: Path | None = None) -> list[dict]:
    """Run the simulation; returns one row per poll: time, backlog parts, desired and started workers."""
    directory = directory or Path(tempfile.mkdtemp(prefix="pipefleet-autoscale-"))
    server = RedisServer().start()
    workers = []
    rows: list[dict] = []
    try:
        model = str(tiny_models.build("text-classification", directory / "model"))
        config = write_config(directory / "fleet.toml", broker_url=f"{server.url}/0", result_backend=f"{server.url}/1",
                              deployments=[{"name": DEPLOYMENT, "task": "text-classification", "model": model,
                                            "max_batch_size": 32}])
        subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "--register-only"], cwd=REPO_ROOT,
                       env=worker_env(), check=True, capture_output=True)
        with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
            submitted = []
            for start in range(0, jobs, 500):
                submitted += client.submit_many([{"deployment": DEPLOYMENT, "inputs": TEXTS[i % len(TEXTS)]}
                                                 for i in range(start, min(start + 500, jobs))])
            started_at = time.monotonic()
            while True:
                [backlog] = backlogs(client.redis, [DEPLOYMENT])
                desired = min(max_workers, math.ceil(backlog.total / per_worker))
                while len(workers) < desired:
                    workers.append(start_worker(config, directory, deployments=[DEPLOYMENT], wait=False))
                rows.append({"t_s": round(time.monotonic() - started_at, 1), "queued": backlog.queued,
                             "claimed": backlog.claimed, "backlog": backlog.total, "desired": desired,
                             "started": len(workers), "live": client.live_workers(DEPLOYMENT)})
                if backlog.total == 0:
                    break
                time.sleep(poll_s)
            outputs = client.results(submitted, timeout=600)
        expected = {text: local_pipeline("text-classification", model)(text) for text in TEXTS}
        for index, output in enumerate(outputs):
            assert_same(output, expected[TEXTS[index % len(TEXTS)]])
        return rows
    finally:
        for worker in workers:
            worker.kill()
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--per-worker", type=int, default=1000, help="KEDA threshold: backlog per worker")
    parser.add_argument("--max-workers", type=int, default=3)
    args = parser.parse_args()
    rows = simulate(args.jobs, args.per_worker, args.max_workers)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.node()} {platform.machine()}, commit {commit}; {args.jobs} jobs, threshold "
          f"{args.per_worker}/worker, at most {args.max_workers} workers; all outputs equal the in-process pipeline")
    print(f"{'t (s)':>7} {'queued':>7} {'claimed':>8} {'backlog':>8} {'desired':>8} {'started':>8} {'live':>5}")
    for row in rows:
        print(f"{row['t_s']:7.1f} {row['queued']:7d} {row['claimed']:8d} {row['backlog']:8d} {row['desired']:8d} "
              f"{row['started']:8d} {row['live']:5d}")


if __name__ == "__main__":
    main()
