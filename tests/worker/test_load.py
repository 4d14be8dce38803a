"""Many small jobs from concurrent producer processes against two workers: all complete, correctly.

The light variant runs in CI; ``-m heavy`` runs 5,000 jobs from 8 producers and prints
throughput and worker RSS before and after on a ``FIGURES`` line.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from tests.conftest import Fleet
from tests.oracle import assert_same, local_pipeline

DEPLOYMENT = "ld-tc"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _text(producer: int, index: int) -> str:
    return f"producer {producer} sends job {index}, {'great' if index % 3 else 'awful'} stuff"


def _produce(broker_url: str, result_backend: str, producer: int, n_jobs: int, queue) -> None:
    """One producer process: submit ``n_jobs`` jobs, then wait for every result."""
    from producers import FleetClient

    outputs, errors = {}, []
    with FleetClient(broker_url, result_backend) as client:
        jobs = [(client.submit(deployment=DEPLOYMENT, inputs=_text(producer, i)), _text(producer, i))
                for i in range(n_jobs)]
        for job, text in jobs:
            try:
                outputs[text] = job.result(timeout=300)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
    queue.put((producer, outputs, errors))


def _run_load(fleet: Fleet, model: str, *, n_jobs: int, n_producers: int) -> dict:
    config = fleet.config([{"name": DEPLOYMENT, "task": "text-classification", "model": model,
                            "max_batch_size": 32, "max_batch_wait_ms": 5}])
    workers = [fleet.worker(config, deployments=[DEPLOYMENT]) for _ in range(2)]
    with fleet.client() as client:  # settle allocations before the first RSS reading
        warm = [client.submit(deployment=DEPLOYMENT, inputs=f"warm-up {i}") for i in range(64)]
        for job in warm:
            job.result(timeout=60)
    rss_before = [_rss_kib(w.proc.pid) for w in workers]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    per_producer = n_jobs // n_producers
    started = time.perf_counter()
    procs = [context.Process(target=_produce, args=(fleet.broker_url, fleet.result_backend, p, per_producer, queue))
             for p in range(n_producers)]
    for proc in procs:
        proc.start()
    reports = [queue.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join(30)
    rss_after = [_rss_kib(w.proc.pid) for w in workers]
    errors = [e for _, _, errs in reports for e in errs]
    outputs = {text: out for _, outs, _ in reports for text, out in outs.items()}
    texts = sorted(outputs)
    local = local_pipeline("text-classification", model)(texts, batch_size=64)
    wrong = 0
    for text, expected in zip(texts, local):
        try:
            assert_same(outputs[text], [expected])
        except AssertionError:
            wrong += 1
    sent = per_producer * n_producers
    figures = {"sent": sent, "completed": len(outputs), "lost": sent - len(outputs) , "wrong": wrong,
               "errors": len(errors), "producers": n_producers, "workers": 2, "elapsed_s": round(elapsed, 1),
               "jobs_per_s": round(sent / elapsed, 1), "rss_before_mib": [round(r / 1024) for r in rss_before],
               "rss_after_mib": [round(r / 1024) for r in rss_after]}
    print("FIGURES load: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert not errors, errors[:3]
    assert len(outputs) == sent and wrong == 0
    assert all(w.alive() for w in workers)
    return figures


def test_light_load_all_jobs_complete_correctly(fleet, model_dir):
    _run_load(fleet, str(model_dir("text-classification")), n_jobs=400, n_producers=2)


@pytest.mark.heavy
def test_heavy_load_5000_jobs_8_producers_rss_stays_flat(fleet, model_dir):
    figures = _run_load(fleet, str(model_dir("text-classification")), n_jobs=5_000, n_producers=8)
    for before, after in zip(figures["rss_before_mib"], figures["rss_after_mib"]):
        assert after <= before * 1.25 + 50, f"worker RSS grew from {before} MiB to {after} MiB"
