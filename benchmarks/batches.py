"""An embeddings batch against the same lines sent online, and online latency while a batch runs, in one run.

    python -m benchmarks.batches [--lines 10000] [--concurrency 64] [--latency-requests 60]

One worker serves all-MiniLM-L6-v2 as feature-extraction (``max_batch_size`` 32); one
``pipefleet gateway`` stands in front of it. Measured, against the same fleet:

- **online**: the lines' bodies sent as ``POST /v1/embeddings`` by ``--concurrency`` HTTP
  clients, in lines/s (one line = one request = one fleet job);
- **batch**: the same lines as one batch through the ``openai`` package (upload, create,
  poll every 0.2 s until ``completed``), in lines/s from ``batches.create`` to ``completed``;
- **online latency under a batch**: single-sentence ``POST /v1/embeddings`` requests, one at a
  time, p50 on the idle fleet and p50 while a second batch of the same size runs; the issue's
  bound is that a batch adds at most one batch of the model, measured here as the p50 of one
  online request carrying ``max_batch_size`` sentences on the idle fleet.

Exits non-zero if a batch body differs from the online body for the same line, or if the bound
is not met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from benchmarks.models import STATE_DIR, minilm_path
from benchmarks.sentences import sentences
from tests.fleet import RedisServer, start_worker, write_config
from tests.gateway.server import start_gateway

API_KEY = "bench-key-0123456789abcdef"
THREADS = str(os.cpu_count() or 1)
MAX_BATCH_SIZE = 32
MODEL = "bench-emb"


def _p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def online_throughput(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    """Lines/s of the bodies sent as online requests, and the responses in order."""
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
               for _ in range(concurrency)]
    responses: list[dict] = [{}] * len(bodies)
    remaining = iter(range(len(bodies)))

    async def loop(http: httpx.AsyncClient) -> None:
        for index in remaining:
            response = await http.post("/v1/embeddings", json=bodies[index])
            response.raise_for_status()
            responses[index] = response.json()

    started = time.perf_counter()
    try:
        await asyncio.gather(*(loop(client) for client in clients))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return len(bodies) / (time.perf_counter() - started), responses


def start_batch(client, bodies: list[dict]):
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings", "body": body}
             for i, body in enumerate(bodies)]
    upload = client.files.create(file=("bench.jsonl", "\n".join(map(json.dumps, lines)).encode()), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")


def wait_completed(client, batch_id: str):
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.2)
    return batch


def latency(http: httpx.Client, texts: list[str], *, while_running=None) -> list[float]:
    """Seconds per single-sentence request, one at a time (while ``while_running()`` holds, if given)."""
    samples = []
    for text in texts:
        if while_running is not None and not while_running():
            break
        started = time.perf_counter()
        http.post("/v1/embeddings", json={"model": MODEL, "input": text}).raise_for_status()
        samples.append(time.perf_counter() - started)
    return samples


def same_vectors(online: dict, batched: dict) -> bool:
    return all(max(abs(a - b) for a, b in zip(x["embedding"], y["embedding"])) < 1e-4
               for x, y in zip(online["data"], batched["data"], strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-requests", type=int, default=60)
    args = parser.parse_args()
    import openai

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    texts = sentences(max(args.lines, 256), seed=3)
    bodies = [{"model": MODEL, "input": texts[i]} for i in range(args.lines)]
    server = RedisServer().start()
    config = write_config(STATE_DIR / "bench-batches.toml", broker_url=f"{server.url}/0",
                          result_backend=f"{server.url}/1",
                          gateway={"api_keys": [API_KEY], "max_wait_s": 300},
                          batches={"poll_interval_s": 0.1},
                          deployments=[{"name": MODEL, "task": "feature-extraction", "model": str(minilm_path()),
                                        "max_batch_size": MAX_BATCH_SIZE, "max_batch_wait_ms": 5}])
    worker = start_worker(config, STATE_DIR, deployments=[MODEL], name="bench-batches-worker",
                          env={"OMP_NUM_THREADS": THREADS}, redis_client=server.client(0))
    gateway = start_gateway(config, STATE_DIR)
    results: dict = {"lines": args.lines, "concurrency": args.concurrency, "max_batch_size": MAX_BATCH_SIZE}
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as http:
            latency(http, texts[:20])  # warm the paths
            idle = latency(http, texts[:args.latency_requests])
            one_batch_s = []
            for _ in range(12):
                started = time.perf_counter()
                http.post("/v1/embeddings", json={"model": MODEL, "input": texts[:MAX_BATCH_SIZE]}).raise_for_status()
                one_batch_s.append(time.perf_counter() - started)
            one_batch_s = one_batch_s[2:]  # the first two warm the 32-wide shapes
            online_rate, online_answers = asyncio.run(online_throughput(gateway.url, bodies, args.concurrency))
            started = time.perf_counter()
            batch = wait_completed(client, start_batch(client, bodies).id)
            batch_rate = args.lines / (time.perf_counter() - started)
            out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
            answers = {entry["custom_id"]: entry["response"]["body"] for entry in out}
            results["outputs_equal"] = batch.request_counts.completed == args.lines and all(
                same_vectors(online_answers[i], answers[f"line-{i}"]) for i in range(args.lines))
            results["throughput_lines_per_s"] = {"online": round(online_rate, 1), "batch": round(batch_rate, 1)}
            second = start_batch(client, bodies)
            time.sleep(2.0)  # let it reach its in-flight window
            busy = latency(http, texts[:args.latency_requests], while_running=lambda: client.batches.retrieve(
                second.id).status == "in_progress")
            wait_completed(client, second.id)
        results["online_p50_ms"] = {"idle": _p50_ms(idle), "during_batch": _p50_ms(busy), "samples_during": len(busy)}
        results["one_model_batch_p50_ms"] = _p50_ms(one_batch_s)
        added = results["online_p50_ms"]["during_batch"] - results["online_p50_ms"]["idle"]
        results["online_p50_added_ms"] = round(added, 2)
        results["within_one_model_batch"] = added <= results["one_model_batch_p50_ms"]
    finally:
        gateway.stop()
        worker.terminate()
        server.cleanup()
    print(json.dumps(results, indent=2))
    return 0 if results.get("outputs_equal") and results.get("within_one_model_batch") else 1


if __name__ == "__main__":
    raise SystemExit(main())
