"""What the HTTP gateway adds over the Python client, in one run.

    python -m benchmarks.gateway [--latency-jobs 200] [--jobs 1000] [--concurrency 64]

One worker serves all-MiniLM-L6-v2's encoder with a two-label head
(text-classification); one ``pipefleet gateway`` process (uvicorn, one worker)
stands in front of it. Measured, each against the same fleet:

- latency of one small job (one sentence), sequential, the paths interleaved job by job:
  ``client.submit(...).result()``, ``await client.asubmit(...)`` + ``await job.aresult()``,
  and ``POST /v1/jobs`` + ``GET /v1/jobs/{id}/result?wait=30`` over HTTP/1.1 keep-alive;
- jobs/s with ``--concurrency`` concurrent HTTP clients (httpx, each its own connection)
  against the same number of asyncio tasks on one ``FleetClient`` (``asubmit``/``aresult``).

Exits non-zero if a gateway result differs from the Python client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from benchmarks.models import STATE_DIR, ensure_minilm_classifier
from benchmarks.sentences import sentences
from tests.fleet import RedisServer, start_worker, write_config
from tests.gateway.server import start_gateway

API_KEY = "bench-key-0123456789abcdef"
THREADS = str(os.cpu_count() or 1)


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _summary(samples: list[float]) -> dict:
    return {"p50_ms": round(_pct(samples, 0.50), 2), "p99_ms": round(_pct(samples, 0.99), 2),
            "mean_ms": round(statistics.fmean(samples) * 1000, 2)}


def latencies(client, url: str, texts: list[str], loop: asyncio.AbstractEventLoop) -> tuple[dict, list, list]:
    """Per path, one job per text, the three paths interleaved so they share the machine's noise."""
    samples: dict[str, list[float]] = {"python_client": [], "python_client_async": [], "gateway": []}
    client_outputs, gateway_outputs = [], []

    async def async_job(text: str) -> None:
        job = await client.asubmit(deployment="bench", inputs=text)
        await job.aresult(timeout=30)

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        for text in texts:
            started = time.perf_counter()
            client_outputs.append(client.submit(deployment="bench", inputs=text).result(timeout=30))
            samples["python_client"].append(time.perf_counter() - started)
            started = time.perf_counter()
            loop.run_until_complete(async_job(text))
            samples["python_client_async"].append(time.perf_counter() - started)
            started = time.perf_counter()
            job = http.post("/v1/jobs", json={"deployment": "bench", "inputs": text}).json()
            gateway_outputs.append(http.get(f"/v1/jobs/{job['id']}/result", params={"wait": 30}).json()["result"])
            samples["gateway"].append(time.perf_counter() - started)
    return samples, client_outputs, gateway_outputs


async def _drain(n_jobs: int, concurrency: int, one_job) -> float:
    remaining = iter(range(n_jobs))

    async def loop(worker_index: int) -> None:
        for index in remaining:
            await one_job(worker_index, index)

    started = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return n_jobs / (time.perf_counter() - started)


async def gateway_throughput(url: str, texts: list[str], n_jobs: int, concurrency: int) -> float:
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
               for _ in range(concurrency)]

    async def one_job(worker_index: int, index: int) -> None:
        http = clients[worker_index]
        job = (await http.post("/v1/jobs", json={"deployment": "bench", "inputs": texts[index % len(texts)]})).json()
        response = await http.get(f"/v1/jobs/{job['id']}/result", params={"wait": 60})
        response.raise_for_status()

    try:
        return await _drain(n_jobs, concurrency, one_job)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


async def client_throughput(client, texts: list[str], n_jobs: int, concurrency: int) -> float:
    async def one_job(worker_index: int, index: int) -> None:
        job = await client.asubmit(deployment="bench", inputs=texts[index % len(texts)])
        await job.aresult(timeout=60)

    return await _drain(n_jobs, concurrency, one_job)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    from producers import FleetClient

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    model = ensure_minilm_classifier()
    texts = sentences(max(args.latency_jobs, 256), seed=1)
    server = RedisServer().start()
    config = write_config(STATE_DIR / "bench-gateway.toml", broker_url=f"{server.url}/0",
                          result_backend=f"{server.url}/1", gateway={"api_keys": [API_KEY], "max_wait_s": 120},
                          deployments=[{"name": "bench", "task": "text-classification", "model": str(model),
                                        "max_batch_size": 32, "max_batch_wait_ms": 5}])
    worker = start_worker(config, STATE_DIR, deployments=["bench"], name="bench-gw-worker",
                          env={"OMP_NUM_THREADS": THREADS}, redis_client=server.client(0))
    gateway = start_gateway(config, STATE_DIR)
    results: dict = {}
    try:
        with FleetClient(f"{server.url}/0", f"{server.url}/1") as client:
            loop = asyncio.new_event_loop()
            latencies(client, gateway.url, texts[:20], loop)  # warm every path
            samples, client_outputs, gateway_outputs = latencies(client, gateway.url, texts[:args.latency_jobs],
                                                                 loop)
            results["latency"] = {path: _summary(values) for path, values in samples.items()}
            results["latency"]["overhead_p50_ms"] = round(
                results["latency"]["gateway"]["p50_ms"] - results["latency"]["python_client"]["p50_ms"], 2)
            results["outputs_equal"] = json.loads(json.dumps(client_outputs)) == gateway_outputs
            results["throughput_jobs_per_s"] = {
                "python_client_async": round(loop.run_until_complete(
                    client_throughput(client, texts, args.jobs, args.concurrency)), 1),
                "gateway": round(loop.run_until_complete(
                    gateway_throughput(gateway.url, texts, args.jobs, args.concurrency)), 1),
            }
            loop.run_until_complete(client.aclose())
            loop.close()
            results["concurrency"] = args.concurrency
            results["jobs"] = args.jobs
    finally:
        gateway.stop()
        worker.terminate()
        server.cleanup()
    print(json.dumps(results, indent=2))
    return 0 if results.get("outputs_equal") else 1


if __name__ == "__main__":
    raise SystemExit(main())
