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


@inspect_command(name="pipefleet_reliability")
def pipefleet_reliability(state) -> dict:
    """Jobs recovered from dead workers, dead letters, held jobs and their oldest age, thread liveness."""
    from worker.supervision import reliability_snapshot

    return reliability_snapshot(get_runtime())


@inspect_command(name="active_queues")
def active_queues(state) -> list[dict]:
    """The queues this worker consumes: Celery's own (private) one plus every deployment queue.

    Replaces Celery's command of the same name, which only knows the queues of Celery's
    own consumer; the deployment queues are claimed by :mod:`worker.consumer`. Flower and
    ``celery inspect active_queues`` read this.
    """
    from producers.constants import queue_name

    queues = list(state.consumer.task_consumer.queues) if state.consumer.task_consumer else []
    queues += [state.app.amqp.queues[queue_name(name)] for name in get_runtime().deployments]
    return [dict(queue.as_dict(recurse=True)) for queue in queues]
