"""Jobs accepted while no worker runs: durable registrations, scale from zero, deadlines and removal.

Real redis-server, real ``pipefleet worker`` processes, the real CLI; the oracle is the in-process pipeline.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from producers import JobState, JobTimeout, UnknownDeployment
from producers.constants import REGISTRY_KEY
from producers.schemas import DeploymentRegistration
from tests.conftest import Fleet
from tests.fleet import REPO_ROOT, worker_env
from tests.oracle import assert_same, local_pipeline

DEPLOYMENT = "zero-tc"
N_JOBS = 200


@pytest.fixture(scope="module")
def zero(redis_server, tmp_path_factory, model_dir):
    """A fleet on its own databases with one registered deployment and, at first, no worker."""
    fleet = Fleet(redis_server, tmp_path_factory.mktemp("zero"), db_pair=(6, 7))
    model = str(model_dir("text-classification"))
    config = fleet.config([{"name": DEPLOYMENT, "task": "text-classification", "model": model,
                            "max_batch_size": 16}])
    with fleet.client() as client:
        yield {"fleet": fleet, "config": config, "model": model, "client": client}
    fleet.stop()


def _cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producers.cli", "--broker-url", fleet.broker_url,
                           "--result-backend", fleet.result_backend, *args],
                          cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)


def _doc_blocks() -> list[str]:
    text = (REPO_ROOT / "docs" / "production.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_docs_have_python_blocks_to_run():
    assert _doc_blocks()


def test_an_unknown_deployment_is_still_rejected_at_once(zero):
    with pytest.raises(UnknownDeployment, match="no-such-deployment"):
        zero["client"].submit(deployment="no-such-deployment", inputs="hello")


def test_scale_from_zero_accepts_200_jobs_and_a_later_worker_completes_them(zero):
    fleet, client = zero["fleet"], zero["client"]
    registered = subprocess.run([sys.executable, "-m", "worker", "--config", str(zero["config"]), "--register-only"],
                                cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr
    info = next(i for i in client.deployments() if i.name == DEPLOYMENT)
    assert info.workers == [] and info.model == zero["model"]

    texts = [f"review number {i}: {'great' if i % 3 else 'awful'} service" for i in range(N_JOBS)]
    jobs = client.submit_many([{"deployment": DEPLOYMENT, "inputs": text} for text in texts])
    status = jobs[0].status()
    assert (status.state, status.queued, status.live_workers) == (JobState.PENDING, True, 0)
    for block in _doc_blocks():  # docs/production.md's python blocks, on this deployment, while no worker runs
        exec(block.replace('"sentiment"', f'"{DEPLOYMENT}"'), {"client": client})

    fleet.worker(zero["config"], deployments=[DEPLOYMENT])  # as KEDA would start one on the backlog
    outputs = client.results(jobs, timeout=300)
    local = local_pipeline("text-classification", zero["model"])
    for text, output in zip(texts, outputs):
        assert_same(output, local(text))
    assert client.live_workers(DEPLOYMENT) == 1


def test_registration_outlives_its_worker_deadlines_hold_and_removal_fails_queued_jobs(zero):
    fleet, client = zero["fleet"], zero["client"]
    if not any(w.alive() for w in fleet.workers):
        fleet.worker(zero["config"], deployments=[DEPLOYMENT])
    for worker in fleet.workers:
        assert worker.terminate() == 0
    raw = fleet.server.client(6).hget(REGISTRY_KEY, DEPLOYMENT)
    registration = DeploymentRegistration.model_validate_json(raw)
    assert registration.registered_by == fleet.workers[-1].name and registration.construction is not None
    assert next(i for i in client.deployments() if i.name == DEPLOYMENT).workers == []

    late = client.submit(deployment=DEPLOYMENT, inputs="nobody will run me in time", timeout_s=0.5)
    with pytest.raises(JobTimeout, match="before a worker ran it .*0 live worker"):
        late.result(timeout=60)
    assert late.status().error_type == "JobTimeout"

    waiting = client.submit(deployment=DEPLOYMENT, inputs="queued while no worker runs")
    chunked = client.submit(deployment=DEPLOYMENT, inputs=["a", "b", "c", "d", "e"], chunk_size=2)
    assert waiting.status().queued and waiting.status().live_workers == 0

    removed = _cli(fleet, "deployments", "remove", DEPLOYMENT)
    assert removed.returncode == 0, removed.stderr
    for job in (waiting, chunked):
        with pytest.raises(UnknownDeployment, match=f"'{DEPLOYMENT}' was removed"):
            job.result(timeout=30)
    with pytest.raises(UnknownDeployment, match=DEPLOYMENT):
        client.submit(deployment=DEPLOYMENT, inputs="too late")
    again = _cli(fleet, "deployments", "remove", DEPLOYMENT)
    assert again.returncode == 1 and "UnknownDeployment" in again.stderr
