"""List jobs as chords: order, progress, cancel and chunk failures, on two real workers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from producers import ChunkFailed, JobCancelled, JobState
from tests.oracle import assert_same, local_pipeline
from tests.tiny_models.text import numbered_texts as texts

DEPLOYMENT = "chunk-tc"
LONG_TEXT = " ".join(["word"] * 400)  # longer than the tiny model's 128 positions: its forward pass fails



@pytest.fixture(scope="module", autouse=True)
def model(module_fleet, model_dir):
    path = str(model_dir("text-classification"))
    config = module_fleet.config([{"name": DEPLOYMENT, "task": "text-classification", "model": path,
                                   "max_batch_size": 16}])
    # Few job threads per worker, so neither worker can reserve every chunk of a job at once.
    for _ in range(2):
        module_fleet.worker(config, deployments=[DEPLOYMENT], args=["--concurrency", "4"])
    return path


def test_thousand_inputs_in_chunks_of_37_come_back_in_order(client, model):
    inputs = texts(1000)
    job = client.submit(deployment=DEPLOYMENT, inputs=inputs, chunk_size=37)
    result = job.result(timeout=120)
    assert_same(result, local_pipeline("text-classification", model)(inputs, batch_size=64))
    record = job._record()
    assert record["total"] == 1000 and len(record["chunk_ids"]) == 28
    workers = {client.celery.backend.get_task_meta(cid)["result"]["worker"] for cid in record["chunk_ids"]}
    assert len(workers) == 2, f"chunks ran on {workers}; the chord should spread over both workers"
    assert job.status().state is JobState.SUCCESS


def test_progress_is_monotone_and_reaches_total(client, model):
    job = client.submit(deployment=DEPLOYMENT, inputs=texts(600), chunk_size=10)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = job.status()
        seen.append(status.done)
        assert status.total == 600
        if status.state is JobState.SUCCESS:
            break
        time.sleep(0.01)
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert seen[-1] == 600
    assert len(set(seen)) > 2, f"no progress seen while the job ran: {sorted(set(seen))}"


def test_cancel_stops_the_remaining_chunks(client, model, module_fleet):
    # Publishing 800 chunks takes longer than running most of them on a fast machine: the workers are stopped
    # meanwhile, so the cancel finds most chunks queued whatever the machine's speed.
    workers = [worker for worker in module_fleet.workers if worker.alive()]
    for worker in workers:
        os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        job = client.submit(deployment=DEPLOYMENT, inputs=texts(8000), chunk_size=10)
    finally:
        for worker in workers:
            os.kill(worker.proc.pid, signal.SIGCONT)
    job.wait_until(lambda s: s.done > 0, timeout=60, interval=0.01)
    started = time.monotonic()
    job.cancel()
    print("cancel took", time.monotonic() - started, "done at cancel", job.status().done)
    with pytest.raises(JobCancelled):
        job.result(timeout=30)
    time.sleep(1.0)
    settled = job.status()
    time.sleep(1.0)
    later = job.status()
    assert later.state is JobState.CANCELLED
    assert settled.done == later.done < 8000, "chunks kept running after cancel"
    record = job._record()
    states = [client.celery.backend.get_task_meta(cid)["status"] for cid in record["chunk_ids"]]
    assert states.count("SUCCESS") < len(states)
    assert states.count("REVOKED") > len(states) / 4, "most chunks should never have run"
    assert "PENDING" not in states and "STARTED" not in states


def test_failing_chunk_names_its_index(client, model):
    inputs = texts(100)
    inputs[57] = LONG_TEXT
    job = client.submit(deployment=DEPLOYMENT, inputs=inputs, chunk_size=20)
    with pytest.raises(ChunkFailed, match=r"chunk 2 failed at item 57"):
        job.result(timeout=60)
    assert job.status().error_type == "ChunkFailed"


def test_partial_mode_returns_the_other_items(client, model):
    inputs = texts(100)
    inputs[57] = LONG_TEXT
    result = client.submit(deployment=DEPLOYMENT, inputs=inputs, chunk_size=20, partial=True).result(timeout=60)
    assert len(result) == 100
    assert result[57]["index"] == 57 and result[57]["error"] and result[57]["type"]
    local = local_pipeline("text-classification", model)
    good = [i for i in range(100) if i != 57]
    assert_same([result[i] for i in good], local([inputs[i] for i in good]))
