"""A separate producer process for the benchmarks: submit N jobs at once, wait for all, report JSON.

    python -m benchmarks.producer fleet|fleet-list|naive|latency --broker ... --backend ... --input FILE
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _fleet_singles(args, texts):
    from producers import FleetClient

    with FleetClient(args.broker, args.backend) as client:
        client.resolve(deployment=args.deployment)
        started = time.perf_counter()
        jobs = [client.submit(deployment=args.deployment, inputs=text) for text in texts]
        outputs = [job.result(timeout=600) for job in jobs]
        return time.perf_counter() - started, outputs


def _fleet_list(args, texts):
    from producers import FleetClient

    with FleetClient(args.broker, args.backend) as client:
        client.resolve(deployment=args.deployment)
        started = time.perf_counter()
        outputs = client.submit(deployment=args.deployment, inputs=texts, chunk_size=args.chunk_size
                                ).result(timeout=1200)
        return time.perf_counter() - started, outputs


def _fleet_map(args, texts):
    from producers import FleetClient

    with FleetClient(args.broker, args.backend) as client:
        client.resolve(deployment=args.deployment)
        started = time.perf_counter()
        outputs = list(client.map((t for t in texts), deployment=args.deployment, chunk_size=args.chunk_size,
                                  max_in_flight=args.max_in_flight))
        return time.perf_counter() - started, outputs


def _naive(args, texts):
    from celery import Celery

    app = Celery("naive-producer", broker=args.broker, backend=args.backend)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    started = time.perf_counter()
    results = [app.send_task("naive.classify", args=[text]) for text in texts]
    outputs = [r.get(timeout=600) for r in results]
    return time.perf_counter() - started, outputs


def _latency(args, texts):
    from producers import FleetClient

    with FleetClient(args.broker, args.backend) as client:
        client.resolve(deployment=args.deployment)
        for text in texts[:5]:
            client.submit(deployment=args.deployment, inputs=text).result(timeout=60)
        samples, outputs = [], []
        for text in texts:
            started = time.perf_counter()
            outputs.append(client.submit(deployment=args.deployment, inputs=text).result(timeout=60))
            samples.append(time.perf_counter() - started)
        return samples, outputs


MODES = {"fleet": _fleet_singles, "fleet-list": _fleet_list, "fleet-map": _fleet_map, "naive": _naive,
         "latency": _latency}


def main() -> int:
    """Run one mode and print ``{"seconds": ..., "outputs": ...}`` as JSON on stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--broker", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--deployment", default="bench")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--max-in-flight", type=int, default=4)
    args = parser.parse_args()
    with open(args.input) as handle:
        texts = json.load(handle)
    seconds, outputs = MODES[args.mode](args, texts)
    json.dump({"seconds": seconds, "outputs": outputs}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
