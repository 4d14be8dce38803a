"""Batched fleet throughput against in-process pipelines and a naive Celery wrapper, in one run.

    python -m benchmarks.throughput            (README: bash .ci/bench)

Model: all-MiniLM-L6-v2's encoder with a new two-label head (text-classification).
Every configuration starts fresh (its own process; a new worker per fleet run);
producers run in a separate process on the same machine. Exits non-zero if a
fleet output differs from the in-process one. The in-process rows run with the
worker's malloc thresholds (:mod:`worker.allocator`), as the fleet's worker does;
the naive Celery wrapper keeps glibc's defaults, as a user's own worker would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

from benchmarks.models import STATE_DIR, ensure_minilm_classifier
from benchmarks.sentences import sentences
from tests.fleet import REPO_ROOT, RedisServer, start_worker, worker_env, write_config
from tests.oracle import assert_same

THREADS = str(os.cpu_count() or 1)


def _run_json(command: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(command, cwd=REPO_ROOT, env=worker_env({"OMP_NUM_THREADS": THREADS, **(env or {})}),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def in_process(model: Path, texts_file: Path, batch_size: int, *, latency: bool = False) -> dict:
    """Time the in-process pipeline in a fresh interpreter."""
    command = [sys.executable, "-m", "benchmarks.inprocess", "--model", str(model), "--input", str(texts_file),
               "--batch-size", str(batch_size)] + (["--latency"] if latency else [])
    return _run_json(command)


def producer(mode: str, server: RedisServer, texts_file: Path, *extra: str) -> dict:
    """Run a producer process against the fleet (or the naive app) and return its JSON."""
    return _run_json([sys.executable, "-m", "benchmarks.producer", mode, "--broker", f"{server.url}/0",
                      "--backend", f"{server.url}/1", "--input", str(texts_file), *extra])


class FreshFleet:
    """A new worker serving the benchmark deployment, for one measurement."""

    def __init__(self, server: RedisServer, model: Path, worker_args: list[str] | None = None, **deployment) -> None:
        self.server = server
        self.worker_args = worker_args or []
        self.config = write_config(
            STATE_DIR / "bench.toml", broker_url=f"{server.url}/0", result_backend=f"{server.url}/1",
            deployments=[{"name": "bench", "task": "text-classification", "model": str(model),
                          "max_batch_size": 32, "max_batch_wait_ms": 5, **deployment}])

    def __enter__(self):
        self.server.client(0).flushall()
        self.worker = start_worker(self.config, STATE_DIR, deployments=["bench"], name="bench-worker",
                                   args=self.worker_args, env={"OMP_NUM_THREADS": THREADS},
                                   redis_client=self.server.client(0))
        return self

    def rss_mb(self) -> float:
        with open(f"/proc/{self.worker.proc.pid}/status") as handle:
            line = next(l for l in handle if l.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    def __exit__(self, *exc) -> None:
        self.worker.terminate()


def naive_celery(server: RedisServer, model: Path, texts_file: Path, pool: str) -> dict:
    """The naive one-task-per-sentence Celery wrapper with ``pool`` on all cores."""
    server.client(0).flushall()
    env = worker_env({"NAIVE_BROKER_URL": f"{server.url}/2", "NAIVE_RESULT_BACKEND": f"{server.url}/3",
                      "NAIVE_MODEL": str(model), "OMP_NUM_THREADS": THREADS if pool == "solo" else "1"})
    concurrency = "1" if pool == "solo" else THREADS
    log = open(STATE_DIR / f"naive-{pool}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchmarks.naive_celery", "worker",
                             "--pool", pool, "-c", concurrency, "--loglevel", "WARNING", "--without-gossip",
                             "--without-mingle"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        probe = producer_naive_probe(server)
        deadline = time.monotonic() + 120
        while not probe() and time.monotonic() < deadline:
            time.sleep(0.2)
        return _run_json([sys.executable, "-m", "benchmarks.producer", "naive", "--broker", f"{server.url}/2",
                          "--backend", f"{server.url}/3", "--input", str(texts_file)])
    finally:
        proc.terminate()
        proc.wait(30)


def producer_naive_probe(server: RedisServer):
    """A callable that is true once the naive worker answers a ping."""
    from celery import Celery

    app = Celery("probe", broker=f"{server.url}/2", backend=f"{server.url}/3")

    def probe() -> bool:
        try:
            return bool(app.control.ping(timeout=0.5))
        except Exception:
            return False

    return probe


def check_outputs(name: str, fleet: list, reference: list, failures: list[str]) -> None:
    """Record a failure if the fleet's outputs differ from the in-process ones."""
    try:
        assert_same(fleet, reference, tol=1e-4)
    except AssertionError as error:
        failures.append(f"{name}: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="sentences (at least 512)")
    parser.add_argument("--latency-n", type=int, default=50)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--large", type=int, default=0, help="also run an N-sentence list job and map (e.g. 4096)")
    parser.add_argument("--concurrency", default="",
                        help="also run the single-sentence jobs with the worker holding each of these many jobs "
                             "(comma-separated, e.g. 64,128,256; the default holds 8 x max_batch_size = 256)")
    parser.add_argument("--json", type=Path, default=STATE_DIR / "bench-results.json")
    args = parser.parse_args()
    STATE_DIR.mkdir(exist_ok=True)
    model = ensure_minilm_classifier()
    texts = sentences(args.n, seed=3)
    texts_file = STATE_DIR / "bench-texts.json"
    texts_file.write_text(json.dumps(texts))
    latency_file = STATE_DIR / "bench-latency-texts.json"
    latency_file.write_text(json.dumps(sentences(args.latency_n, seed=5)))
    server = RedisServer().start()
    results: dict[str, dict] = {}
    failures: list[str] = []
    try:
        print(f"machine: {os.cpu_count()} cores; {args.n} sentences of 5-25 words; model all-MiniLM-L6-v2 + 2-label head")
        ref1 = in_process(model, texts_file, 1)
        results["in-process batch_size=1"] = {"items_per_s": args.n / ref1["seconds"]}
        ref32 = in_process(model, texts_file, 32)
        results["in-process batch_size=32"] = {"items_per_s": args.n / ref32["seconds"]}
        check_outputs("in-process bs=32 vs bs=1", ref32["outputs"], ref1["outputs"], failures)
        if not args.skip_naive:
            best = None
            for pool in ("solo", "prefork"):
                run = naive_celery(server, model, texts_file, pool)
                rate = args.n / run["seconds"]
                results[f"naive Celery ({pool})"] = {"items_per_s": rate}
                best = max(best or 0, rate)
                check_outputs(f"naive {pool}", run["outputs"], [[o] for o in ref1["outputs"]], failures)
            results["naive Celery (best)"] = {"items_per_s": best}
        with FreshFleet(server, model):
            run = producer("fleet", server, texts_file)
            results[f"pipefleet {args.n} single-sentence jobs"] = {"items_per_s": args.n / run["seconds"]}
            # One text per job: pipe(text) returns [output] where pipe(list) returns output per item.
            check_outputs("fleet singles", run["outputs"], [[o] for o in ref1["outputs"]], failures)
        for held in filter(None, args.concurrency.split(",")):
            with FreshFleet(server, model, worker_args=["--concurrency", held]):
                run = producer("fleet", server, texts_file)
            results[f"  the same, --concurrency {held}"] = {"items_per_s": args.n / run["seconds"]}
            check_outputs(f"fleet singles --concurrency {held}", run["outputs"], [[o] for o in ref1["outputs"]],
                          failures)
        with FreshFleet(server, model):
            run = producer("fleet-list", server, texts_file)
            results["pipefleet one list job"] = {"items_per_s": args.n / run["seconds"]}
            check_outputs("fleet list", run["outputs"], ref1["outputs"], failures)
        local_latency = in_process(model, latency_file, 1, latency=True)["seconds"]
        with FreshFleet(server, model):
            fleet_latency = producer("latency", server, latency_file)["seconds"]
        results["idle latency"] = _latency_summary(local_latency, fleet_latency)
        if args.large:
            _large(args, server, model, results, failures)
    finally:
        server.cleanup()
    _report(results, failures)
    args.json.write_text(json.dumps({"results": results, "failures": failures}, indent=2))
    return 1 if failures else 0


def _latency_summary(local: list[float], fleet: list[float]) -> dict:
    def pct(samples, q):
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"in_process_p50_ms": pct(local, 0.5), "in_process_p99_ms": pct(local, 0.99),
            "fleet_p50_ms": pct(fleet, 0.5), "fleet_p99_ms": pct(fleet, 0.99),
            "overhead_p50_ms": pct(fleet, 0.5) - pct(local, 0.5)}


def _large(args, server: RedisServer, model: Path, results: dict, failures: list[str]) -> None:
    texts = sentences(args.large, seed=9)
    big_file = STATE_DIR / "bench-large-texts.json"
    big_file.write_text(json.dumps(texts))
    ref = in_process(model, big_file, 32)
    results[f"in-process batch_size=32 ({args.large})"] = {"items_per_s": args.large / ref["seconds"]}
    for mode, label in (("fleet-list", f"pipefleet {args.large}-item list job (chunked)"),
                        ("fleet-map", f"pipefleet client.map over a generator of {args.large}")):
        with FreshFleet(server, model, chunk_size=256) as fleet:
            monitor = _RedisPeak(server.client(0))
            monitor.start()
            run = producer(mode, server, big_file, "--chunk-size", "256", "--max-in-flight", "4")
            monitor.stop()
            results[label] = {"items_per_s": args.large / run["seconds"], "redis_peak_mb": monitor.peak_mb,
                              "worker_rss_mb": fleet.rss_mb()}
            check_outputs(label, run["outputs"], ref["outputs"], failures)


class _RedisPeak:
    """Samples Redis ``used_memory`` while a job runs."""

    def __init__(self, client: redis.Redis) -> None:
        import threading

        self.client = client
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            info = self.client.info("memory")
            self.peak_mb = max(self.peak_mb, info["used_memory"] / 2**20, info.get("used_memory_peak", 0) / 2**20)


def _report(results: dict, failures: list[str]) -> None:
    print()
    for name, data in results.items():
        if "items_per_s" in data:
            extra = "".join(f"  {k}={v:.1f}" for k, v in data.items() if k != "items_per_s")
            print(f"  {name:<52} {data['items_per_s']:8.1f} items/s{extra}")
    lat = results.get("idle latency")
    if lat:
        print(f"  idle latency: in-process p50 {lat['in_process_p50_ms']:.1f} ms p99 {lat['in_process_p99_ms']:.1f} ms;"
              f" fleet p50 {lat['fleet_p50_ms']:.1f} ms p99 {lat['fleet_p99_ms']:.1f} ms;"
              f" overhead p50 {lat['overhead_p50_ms']:.1f} ms")
    rate = {k: v.get("items_per_s") for k, v in results.items()}
    singles = next((v for k, v in rate.items() if "single-sentence" in k), None)
    listed = rate.get("pipefleet one list job")
    bs32 = rate.get("in-process batch_size=32")
    naive = rate.get("naive Celery (best)")
    print("\n  ratios:")
    if singles and bs32:
        print(f"    single-sentence jobs / in-process bs=32: {singles / bs32:.2f}x (goal >= 0.9x)")
    if singles and naive:
        print(f"    single-sentence jobs / naive Celery:     {singles / naive:.2f}x (goal >= 2.5x)")
    if listed and bs32:
        print(f"    one list job / in-process bs=32:         {listed / bs32:.2f}x")
    for key, value in rate.items():
        if key.startswith("pipefleet") and ("chunked" in key or "map" in key):
            base = next(v for k, v in rate.items() if k.startswith("in-process batch_size=32 ("))
            print(f"    {key} / in-process bs=32: {value / base:.2f}x")
    print("\n  outputs:", "all equal to in-process" if not failures else "DIFFER:\n    " + "\n    ".join(failures))


if __name__ == "__main__":
    raise SystemExit(main())
