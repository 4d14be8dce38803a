"""``pipefleet flower``: a real Flower on a loopback port, read through its HTTP API with basic auth."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from tests.fleet import REPO_ROOT, free_port, worker_env

CREDENTIALS = "admin:s3cret"


def _get(url: str, credentials: str | None = CREDENTIALS, timeout_s: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _wait_until(predicate, timeout_s: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _flower_sees_a_probe(client, base: str) -> bool:
    """Workers send task events only once Flower has asked; a probe job shows when they do."""
    import json

    probe = client.submit(deployment="fl-tc", inputs="probe")
    probe.result(timeout=60)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if probe.id in json.loads(_get(f"{base}/api/tasks")[1]):
            return True
        time.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def served(module_fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = module_fleet.config([{"name": "fl-tc", "task": "text-classification", "model": model,
                                   "max_batch_size": 4}])
    worker = module_fleet.worker(config, deployments=["fl-tc"])
    return {"config": config, "worker": worker}


@pytest.fixture(scope="module")
def flower(module_fleet, served):
    port = free_port()
    log_path = module_fleet.directory / "flower.log"
    command = [sys.executable, "-m", "producers.cli", "flower", "--config", str(served["config"]),
               "--address", "127.0.0.1", "--port", str(port)]
    env = worker_env({"PIPEFLEET_FLOWER__BASIC_AUTH": f'["{CREDENTIALS}"]'})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"flower exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return _get(f"{base}/healthcheck", None, timeout_s=2)[0] == 200
        except OSError:
            return False

    _wait_until(up, 60, "Flower to listen")
    yield base
    proc.terminate()
    proc.wait(15)


def test_flower_refuses_to_start_without_credentials(served):
    result = subprocess.run([sys.executable, "-m", "producers.cli", "flower", "--config", str(served["config"]),
                             "--port", str(free_port())], cwd=REPO_ROOT, env=worker_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--insecure" in result.stderr and "basic_auth" in result.stderr


def test_requests_without_credentials_are_refused(flower):
    for path in ("/api/workers", "/api/tasks", "/api/queues/length", "/metrics", "/"):
        assert _get(flower + path, None)[0] == 401, path
        assert _get(flower + path, "admin:wrong")[0] == 401, path


def test_jobs_show_by_deployment_with_readable_args(module_fleet, served, flower):
    import json

    with module_fleet.client() as client:
        _wait_until(lambda: _flower_sees_a_probe(client, flower), 40, "Flower to receive task events")
        jobs = [client.submit(deployment="fl-tc", inputs=[f"flower job {i}", "second"]) for i in range(3)]
        for job in jobs:
            job.result(timeout=60)

    def tasks_seen():
        status, body = _get(f"{flower}/api/tasks")
        assert status == 200, body
        tasks = json.loads(body)
        done = {tid: t for tid, t in tasks.items() if t.get("state") == "SUCCESS"}
        return done if all(job.id in done for job in jobs) else None

    tasks = _wait_until(tasks_seen, 30, "Flower to see the jobs succeed")
    for job in jobs:
        task = tasks[job.id]
        assert task["name"] == "infer:fl-tc"
        assert "flower job" in task["kwargs"] and "fl-tc" in task["kwargs"]
        assert served["worker"].name in task["worker"]

    status, body = _get(f"{flower}/api/workers?refresh=1")
    assert status == 200
    assert any(served["worker"].name in name for name in json.loads(body))

    status, body = _get(f"{flower}/api/queues/length")
    assert status == 200
    queues = {q["name"]: q["messages"] for q in json.loads(body)["active_queues"]}
    assert queues.get("pipefleet.fl-tc") == 0

    status, body = _get(f"{flower}/metrics")
    assert status == 200
    assert 'task="infer:fl-tc"' in body and "flower_events_total" in body


def test_a_hundred_jobs_and_a_bad_one_while_flower_watches(module_fleet, served, flower):
    """More jobs than job threads with task events on: every one ends, Flower shows each outcome, no traceback."""
    import json

    from producers.constants import INFER_TASK

    with module_fleet.client() as client:
        _wait_until(lambda: _flower_sees_a_probe(client, flower), 40, "Flower to receive task events")
        jobs = [client.submit(deployment="fl-tc", inputs=f"watched job {i}") for i in range(100)]
        bad = client.celery.send_task(INFER_TASK, queue="pipefleet.fl-tc",
                                      kwargs={"spec": {"deployment": "fl-tc", "inputs": {"not": "text"}}})
        for job in jobs:
            job.result(timeout=60)
        with pytest.raises(Exception, match="input"):
            client.job(bad.id).result(timeout=60)

    def states_seen():
        tasks = json.loads(_get(f"{flower}/api/tasks?limit=1000")[1])
        seen = {job.id: tasks.get(job.id, {}).get("state") for job in jobs}
        seen[bad.id] = tasks.get(bad.id, {}).get("state")
        return seen if all(state in ("SUCCESS", "FAILURE") for state in seen.values()) else None

    seen = _wait_until(states_seen, 30, "Flower to see every job end")
    assert seen.pop(bad.id) == "FAILURE"
    assert set(seen.values()) == {"SUCCESS"}
    log = served["worker"].log()
    assert "Traceback" not in log, log[-4000:]
