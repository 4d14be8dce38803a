"""A worker started with ``--log-json`` writes one parseable JSON object per log line."""

from __future__ import annotations

import json
import time

from worker.logs import JsonFormatter


def test_json_formatter_keeps_extra_fields():
    import logging

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "ran %d", (3,), None)
    record.job_ids = ["a"]
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "ran 3" and data["job_ids"] == ["a"] and data["level"] == "INFO"


def test_worker_log_json_lines_carry_job_deployment_batch_and_duration(fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = fleet.config([{"name": "lg-tc", "task": "text-classification", "model": model, "max_batch_size": 8}])
    worker = fleet.worker(config, deployments=["lg-tc"], args=["--log-json"])
    with fleet.client() as client:
        jobs = [client.submit(deployment="lg-tc", inputs=["one", "two"]) for _ in range(3)]
        for job in jobs:
            job.result(timeout=60)
    ids = {job.id for job in jobs}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = []
        # Only whole lines: the worker may be half-way through writing the last one.
        for line in worker.log().splitlines(keepends=True):
            if line.startswith("{") and line.endswith("\n"):
                records.append(json.loads(line))
        finished = [r for r in records if r.get("job_id") in ids]
        if len(finished) == len(ids):
            break
        time.sleep(0.2)
    assert {r["job_id"] for r in finished} == ids
    assert all(r["deployment"] == "lg-tc" and r["state"] == "SUCCESS" and r["n_items"] == 2
               and r["duration_s"] > 0 for r in finished)
    batches = [r for r in records if "batch_size" in r]
    assert batches and all(r["deployment"] == "lg-tc" and r["duration_s"] > 0 for r in batches)
    assert sum(r["batch_size"] for r in batches if set(r["job_ids"]) & ids) == 6
    assert ids <= {job_id for r in batches for job_id in r["job_ids"]}
    assert not any("'outputs'" in line for line in worker.log().splitlines()), "results must not be logged"
