"""``pipefleet fleet``: the live fleet as workers advertise it, plus Redis queue depths.

    snapshot = fleet_snapshot(FleetClient.from_env())
    print(format_fleet(snapshot))

Client-side only: it reads the advertisements (``pipefleet:ad:*``) and runs
``LLEN`` over each deployment's queue, so it never imports torch or the worker.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from producers.constants import PRIORITY_STEPS
from producers.discovery import read_ads
from producers.schemas import DeploymentAd

PRIORITY_SEPARATOR = "\x06\x16"
"""Kombu's Redis transport keeps priority ``p`` of queue ``q`` in the list ``q + SEP + str(p)``."""


class WorkerView(BaseModel):
    """One live worker: where it runs, what it serves, and how fresh its heartbeat is."""

    name: str
    pid: int
    devices: list[str]
    deployments: list[str]
    in_flight: int
    pending_items: int
    heartbeat_age_s: float
    uptime_s: float


class DeploymentView(BaseModel):
    """One live deployment: its queue depth and the workers serving it."""

    name: str
    task: str
    model: str
    queue: str
    queue_depth: int
    workers: list[str]
    devices: list[str]
    in_flight: int
    pending_items: int


class FleetSnapshot(BaseModel):
    """The fleet at one instant (``taken_at`` is a Unix time)."""

    taken_at: float = Field(default_factory=time.time)
    workers: list[WorkerView] = Field(default_factory=list)
    deployments: list[DeploymentView] = Field(default_factory=list)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding a queue's messages: the queue itself and its priority sub-queues."""
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS if step]


def queue_depths(redis: Any, queues: list[str]) -> dict[str, int]:
    """Messages waiting (not yet delivered to a worker) per queue."""
    pipe = redis.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue):
            pipe.llen(key)
    counts = pipe.execute()
    per_queue = len(PRIORITY_STEPS)
    return {queue: sum(counts[i * per_queue:(i + 1) * per_queue]) for i, queue in enumerate(queues)}


def build_snapshot(ads: list[DeploymentAd], depths: dict[str, int], *, now: float | None = None) -> FleetSnapshot:
    """Group advertisements by worker and by deployment."""
    now = time.time() if now is None else now
    by_worker: dict[str, list[DeploymentAd]] = {}
    by_deployment: dict[str, list[DeploymentAd]] = {}
    for ad in ads:
        by_worker.setdefault(ad.worker, []).append(ad)
        by_deployment.setdefault(ad.name, []).append(ad)
    workers = [
        WorkerView(
            name=name, pid=group[0].pid, devices=sorted({ad.device for ad in group}),
            deployments=sorted(ad.name for ad in group), in_flight=sum(ad.in_flight for ad in group),
            pending_items=sum(ad.pending_items for ad in group),
            heartbeat_age_s=round(max(0.0, now - max(ad.heartbeat_at for ad in group)), 3),
            uptime_s=round(max(0.0, now - min(ad.started_at for ad in group)), 3),
        )
        for name, group in sorted(by_worker.items())
    ]
    deployments = [
        DeploymentView(
            name=name, task=group[0].task, model=group[0].model, queue=group[0].queue,
            queue_depth=depths.get(group[0].queue, 0), workers=sorted(ad.worker for ad in group),
            devices=sorted({ad.device for ad in group}), in_flight=sum(ad.in_flight for ad in group),
            pending_items=sum(ad.pending_items for ad in group),
        )
        for name, group in sorted(by_deployment.items())
    ]
    return FleetSnapshot(taken_at=now, workers=workers, deployments=deployments)


def fleet_snapshot(client: Any) -> FleetSnapshot:
    """Read the live fleet through a :class:`~producers.FleetClient` (or anything with ``.redis``)."""

    def read() -> FleetSnapshot:
        ads = read_ads(client.redis)
        return build_snapshot(ads, queue_depths(client.redis, sorted({ad.queue for ad in ads})))

    access = getattr(client, "access", None)
    return access.call(read) if access is not None else read()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def format_fleet(snapshot: FleetSnapshot) -> str:
    """A human-readable table of workers and deployments."""
    if not snapshot.workers:
        return "no live worker (is a worker running against this broker?)"
    lines = ["WORKERS"]
    lines += _table(["NAME", "PID", "DEVICE", "DEPLOYMENTS", "IN FLIGHT", "HEARTBEAT AGE", "UPTIME"], [
        [w.name, str(w.pid), ",".join(w.devices), ",".join(w.deployments), str(w.in_flight),
         f"{w.heartbeat_age_s:.1f}s", f"{w.uptime_s:.0f}s"] for w in snapshot.workers])
    lines += ["", "DEPLOYMENTS"]
    lines += _table(["NAME", "TASK", "QUEUED", "IN FLIGHT", "WORKERS", "MODEL"], [
        [d.name, d.task, str(d.queue_depth), str(d.in_flight), ",".join(d.workers), d.model]
        for d in snapshot.deployments])
    return "\n".join(lines)
