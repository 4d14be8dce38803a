"""Remote-control reply latency of one worker, idle and saturated, side by side in one run.

Flower, ``celery inspect``, ``pipefleet fleet`` and the metric-reading tests all ask workers over Celery's
remote-control broadcast; a reply that comes late looks like a dead worker. This starts a private Redis and
one worker on a tiny text-classification model, then times ``pipefleet_metrics`` broadcasts (``limit=1``)
while the worker is idle, and again while producer threads keep its queue full.

    python -m benchmarks.control_latency --samples 40 --producers 2

Prints one JSON object: p50/p99/max reply latency per phase, timeouts, jobs completed while saturated,
machine and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests import tiny_models
from tests.fleet import REPO_ROOT, RedisServer, start_worker, write_config


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _time_broadcasts(client, samples: int, timeout_s: float) -> dict:
    latencies, timeouts = [], 0
    for _ in range(samples):
        started = time.perf_counter()
        replies = client.celery.control.broadcast("pipefleet_metrics", reply=True, timeout=timeout_s, limit=1)
        elapsed = time.perf_counter() - started
        if replies:
            latencies.append(elapsed * 1000)
        else:
            timeouts += 1
        time.sleep(0.1)
    if not latencies:
        return {"samples": samples, "timeouts": timeouts}
    return {"samples": samples, "timeouts": timeouts, "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(_percentile(latencies, 0.99), 1), "max_ms": round(max(latencies), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--producers", type=int, default=2, help="threads keeping the queue full")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="broadcast reply timeout (the tests' 5 s)")
    parser.add_argument("--gil-profile", help="also record the saturated worker with py-spy --gil into this SVG")
    args = parser.parse_args()

    from producers import FleetClient

    directory = Path(tempfile.mkdtemp(prefix="pipefleet-control-"))
    server = RedisServer().start()
    worker = None
    try:
        model = tiny_models.build("text-classification", directory / "model")
        config = write_config(directory / "fleet.toml", broker_url=f"{server.url}/0",
                              result_backend=f"{server.url}/1", task_events=True,
                              deployments=[{"name": "ctl", "task": "text-classification", "model": str(model),
                                            "max_batch_size": 8}])
        worker = start_worker(config, directory, deployments=["ctl"], redis_client=server.client(0))
        with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
            idle = _time_broadcasts(client, args.samples, args.timeout_s)
            stop = threading.Event()
            done = [0]

            def produce() -> None:
                while not stop.is_set():
                    jobs = client.submit_many([{"deployment": "ctl", "inputs": f"load {i}"} for i in range(64)])
                    for job in jobs:
                        job.result(timeout=120)
                    done[0] += len(jobs)

            threads = [threading.Thread(target=produce, daemon=True) for _ in range(args.producers)]
            for thread in threads:
                thread.start()
            time.sleep(2.0)
            profiler = None
            if args.gil_profile:
                profiler = subprocess.Popen(["py-spy", "record", "--gil", "--threads", "-d", "15", "-o",
                                             args.gil_profile, "-p", str(worker.proc.pid)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            saturated = _time_broadcasts(client, args.samples, args.timeout_s)
            if profiler is not None:
                profiler.wait(60)
            stop.set()
            for thread in threads:
                thread.join(120)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip()
        print(json.dumps({"idle": idle, "saturated": saturated, "jobs_while_saturated": done[0],
                          "machine": f"{platform.machine()} {os.cpu_count()} cores {platform.system()}",
                          "commit": commit}))
    finally:
        if worker is not None:
            worker.kill()
        server.cleanup()


if __name__ == "__main__":
    main()
