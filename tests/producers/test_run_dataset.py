"""``pipefleet run-dataset``: jsonl/csv/parquet in, ordered jsonl out with ids, resume after a kill."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fleet import REPO_ROOT, worker_env
from tests.oracle import assert_same, local_pipeline
from tests.tiny_models.text import corpus

TASK = "text-classification"


def rows(n: int) -> list[dict]:
    sentences = corpus()
    return [{"id": f"row-{i}", "text": f"{sentences[i % len(sentences)]} {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def model(module_fleet, model_dir, tmp_path_factory):
    # A model path of its own: --task/--model must match only this module's deployment, not stale ads
    # of other modules' workers serving the same tiny model.
    path = str(tmp_path_factory.mktemp("ds-model") / "text-classification")
    shutil.copytree(model_dir(TASK), path)
    config = module_fleet.config([{"name": "ds-tc", "task": TASK, "model": path, "max_batch_size": 16}])
    module_fleet.worker(config, deployments=["ds-tc"])
    return path


def command(fleet, model: str, source: Path, output: Path, chunk_size: int) -> list[str]:
    return [sys.executable, "-m", "producers.cli", "--broker-url", fleet.broker_url,
            "--result-backend", fleet.result_backend, "run-dataset", "--task", TASK, "--model", model,
            "--input", str(source), "--column", "text", "--id-column", "id", "--output", str(output),
            "--chunk-size", str(chunk_size), "--max-in-flight", "2"]


def read_output(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def check_output(output: Path, data: list[dict], model: str) -> None:
    written = read_output(output)
    assert [row["index"] for row in written] == list(range(len(data)))
    assert [row["id"] for row in written] == [row["id"] for row in data]
    # In-process in batches: one by one, 3,000 rows take minutes on a loaded CPU.
    local = local_pipeline(TASK, model)([row["text"] for row in data], batch_size=64)
    assert_same([row["output"] for row in written], local)


def test_resume_after_kill_skips_written_chunks(module_fleet, model, tmp_path):
    data = rows(3000)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in data))
    chunk_size = 20
    first = subprocess.Popen(command(module_fleet, model, source, output, chunk_size), cwd=REPO_ROOT,
                             env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if output.exists() and output.read_bytes().count(b"\n") >= 200:
            break
        time.sleep(0.01)
    assert first.poll() is None, f"the first run ended before it could be killed: {first.communicate()}"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    first_err = first.stderr.read().decode()
    assert "it/s" in first_err or "items/s" in first_err, f"no rate in the progress bar: {first_err[-500:]}"
    written = output.read_bytes().count(b"\n")
    assert 200 <= written < 3000

    second = subprocess.run(command(module_fleet, model, source, output, chunk_size), cwd=REPO_ROOT,
                            env=worker_env(), capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed_at = int(second.stderr.split("resuming")[1].split("after ")[1].split(" ")[0])
    assert resumed_at >= written and resumed_at % chunk_size == 0
    check_output(output, data, model)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_inputs(module_fleet, model, tmp_path, fmt):
    import argparse

    from producers.datasets import run_dataset

    data = rows(45)
    source, output = tmp_path / f"in.{fmt}", tmp_path / "out.jsonl"
    if fmt == "csv":
        import csv

        with source.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "text"])
            writer.writeheader()
            writer.writerows(data)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(data), source, row_group_size=10)
    args = argparse.Namespace(task=TASK, model=model, deployment=None, input=str(source), column="text",
                              id_column="id", output=str(output), params=None, chunk_size=8, max_in_flight=3)
    with module_fleet.client() as client:
        assert run_dataset(client, args) == 0
        check_output(output, data, model)
        assert run_dataset(client, args) == 0  # a finished output is left as it is
    check_output(output, data, model)
