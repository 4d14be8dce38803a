"""Celery remote-control commands a worker answers: ``pipefleet_info`` and ``pipefleet_metrics``.

    client.celery.control.broadcast("pipefleet_metrics", reply=True)
"""

from __future__ import annotations

import os

from celery.worker.control import inspect_command

from worker.runtime import get_runtime


@inspect_command(name="pipefleet_info")
def pipefleet_info(state) -> dict:
    """Worker name, pid, pinned GPUs and served deployments with their devices."""
    runtime = get_runtime()
    return {
        "worker": runtime.worker_name,
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "deployments": {name: served.device for name, served in runtime.deployments.items()},
    }


@inspect_command(name="pipefleet_metrics")
def pipefleet_metrics(state) -> dict:
    """Per-deployment batching metrics (batch sizes, queue wait, forward time, OOM splits)."""
    runtime = get_runtime()
    return {name: served.metrics.snapshot() for name, served in runtime.deployments.items()}
