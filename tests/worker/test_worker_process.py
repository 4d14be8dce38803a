"""A real worker process: GPU pinning, fail-fast loading, bad input, cancel and reattach."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from producers import (FleetClient, InvalidInput, InvalidParams, JobState, PayloadTooLarge, UnknownDeployment)
from tests.fleet import REPO_ROOT, control_replies, worker_env
from tests.oracle import assert_same, local_pipeline


@pytest.fixture(scope="module", autouse=True)
def served(module_fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = module_fleet.config(
        [{"name": "wp-tc", "task": "text-classification", "model": model, "max_batch_size": 4}],
        limits={"max_inputs_per_job": 5},
    )
    worker = module_fleet.worker(config, deployments=["wp-tc"], gpu="3")
    return {"model": model, "worker": worker, "config": config}


def test_worker_pins_cuda_visible_devices_from_gpu_flag(client, served):
    info = control_replies(client.celery, "pipefleet_info",
                           lambda answer: answer if answer.get("worker") == served["worker"].name else None)
    assert info["cuda_visible_devices"] == "3"
    assert info["deployments"] == {"wp-tc": "cpu"}


def test_a_length_grouped_deployment_holds_eight_batches_by_default(client, served):
    pool = control_replies(client.celery, "stats", lambda answer: answer.get("pool"),
                           destination=[f"{served['worker'].name}@{socket.gethostname()}"])
    # wp-tc: text-classification, max_batch_size 4, batches grouped by length: 8 x 4 jobs held, as many threads.
    assert pool["max-concurrency"] == 32


def test_unknown_deployment_lists_live_ones(client, served):
    with pytest.raises(UnknownDeployment, match="wp-tc"):
        client.submit(task="text-classification", model="not/configured", inputs="hi")


def test_too_many_inputs_rejected_before_enqueue(client, served):
    with pytest.raises(PayloadTooLarge, match="at most 5"):
        client.submit(deployment="wp-tc", inputs=["x"] * 6)


def test_bad_jobs_fail_clearly_and_the_worker_keeps_serving(client, served):
    bad_type = client.submit(deployment="wp-tc", inputs=[{"text": ["nested", {"garbage": 1}]}])
    with pytest.raises(InvalidInput, match="input 0"):
        bad_type.result(timeout=30)
    bad_param = client.submit(deployment="wp-tc", inputs="hello", params={"function_to_apply": "cube"})
    with pytest.raises(InvalidParams, match="function_to_apply|cube"):
        bad_param.result(timeout=30)
    denied = client.submit(deployment="wp-tc", inputs="hello", params={"trust_remote_code": True})
    with pytest.raises(InvalidParams, match="trust_remote_code"):
        denied.result(timeout=30)
    good = client.submit(deployment="wp-tc", inputs="still serving")
    assert_same(good.result(timeout=30), local_pipeline("text-classification", served["model"])("still serving"))


def test_forged_message_past_the_client_is_rejected_by_the_worker(client, served):
    from producers.constants import INFER_TASK

    too_many = client.celery.send_task(INFER_TASK, kwargs={"spec": {"deployment": "wp-tc", "inputs": ["a"] * 9}},
                                       queue="pipefleet.wp-tc")
    with pytest.raises(PayloadTooLarge, match="limit is 5"):
        client.job(too_many.id).result(timeout=30)
    other_model = client.celery.send_task(
        INFER_TASK, kwargs={"spec": {"deployment": "wp-tc", "inputs": ["a"], "model": "evil/model"}},
        queue="pipefleet.wp-tc")
    with pytest.raises(UnknownDeployment, match="evil/model"):
        client.job(other_model.id).result(timeout=30)


def test_cancel_a_queued_job_then_reattach_from_a_second_client(module_fleet, client, served):
    worker = served["worker"]
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        queued = client.submit(deployment="wp-tc", inputs="never runs")
        kept = client.submit(deployment="wp-tc", inputs="runs later")
        queued.cancel()
        assert queued.status().state is JobState.CANCELLED
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    with module_fleet.client() as second:
        again = second.job(kept.id)
        assert_same(again.result(timeout=30), local_pipeline("text-classification", served["model"])("runs later"))
        assert again.status().state is JobState.SUCCESS
        time.sleep(0.5)
        assert second.job(queued.id).status().state is JobState.CANCELLED


def test_a_model_that_fails_to_load_stops_the_worker_at_start_up(module_fleet, tmp_path):
    config = module_fleet.config([{"name": "wp-broken", "task": "text-classification", "model": str(tmp_path)}])
    result = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "--gpu", "none"],
                            cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert "wp-broken" in result.stderr and "cannot load" in result.stderr
    with FleetClient(module_fleet.broker_url, module_fleet.result_backend) as client:
        assert "wp-broken" not in {d.name for d in client.deployments()}


def test_quantization_bitsandbytes_cannot_run_here_fails_at_start_up(module_fleet, model_dir):
    # bitsandbytes quantizes on this CPU (tests/tasks/test_quantized_deployments.py), not on a GPU it lacks.
    config = module_fleet.config([{
        "name": "wp-q", "task": "text-classification", "model": str(model_dir("text-classification")),
        "device": 0, "model_kwargs": {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
    }])
    result = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "--gpu", "none"],
                            cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert ("pipefleet worker: deployment 'wp-q': quantization_config (4-bit nf4, compute float32) runs on 'cuda', "
            "and this worker has no such device") in result.stderr
