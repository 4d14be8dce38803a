"""``pipefleet fleet``: the live fleet as workers advertise it, every registered deployment, and their backlogs.

    snapshot = fleet_snapshot(FleetClient.from_env())
    print(format_fleet(snapshot))

Client-side only: it reads the advertisements (``pipefleet:ad:*``), the
registrations, and each deployment's backlog (:mod:`producers.backlog`), so it
never imports torch or the worker.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from producers.constants import PRIORITY_STEPS
from producers.discovery import read_ads, read_registrations
from producers.schemas import DeploymentAd, DeploymentRegistration

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
    """One known deployment: its backlog and the workers serving it now (maybe none)."""

    name: str
    task: str
    model: str
    queue: str
    queue_depth: int
    """Jobs waiting in the queue, every priority step."""
    claimed: int = 0
    """Jobs a worker took and has not acknowledged (waiting in its batcher, or running)."""
    backlog: int = 0
    """``queue_depth + claimed``: what an autoscaler scales on (``pipefleet_backlog``)."""
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


def build_snapshot(ads: list[DeploymentAd], depths: dict[str, int], *, now: float | None = None,
                   registrations: list[DeploymentRegistration] | None = None,
                   claimed: dict[str, int] | None = None) -> FleetSnapshot:
    """Group advertisements by worker and by deployment; registered deployments without a worker are listed too."""
    now = time.time() if now is None else now
    claimed = claimed or {}
    by_worker: dict[str, list[DeploymentAd]] = {}
    by_deployment: dict[str, list[Any]] = {}
    for ad in ads:
        by_worker.setdefault(ad.worker, []).append(ad)
        by_deployment.setdefault(ad.name, []).append(ad)
    idle = {r.name: r for r in registrations or [] if r.name not in by_deployment}
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
            queue_depth=depths.get(group[0].queue, 0), claimed=claimed.get(group[0].queue, 0),
            backlog=depths.get(group[0].queue, 0) + claimed.get(group[0].queue, 0),
            workers=sorted(ad.worker for ad in group), devices=sorted({ad.device for ad in group}),
            in_flight=sum(ad.in_flight for ad in group), pending_items=sum(ad.pending_items for ad in group),
        )
        for name, group in sorted(by_deployment.items())
    ]
    deployments += [
        DeploymentView(name=name, task=r.task, model=r.model, queue=r.queue, queue_depth=depths.get(r.queue, 0),
                       claimed=claimed.get(r.queue, 0), backlog=depths.get(r.queue, 0) + claimed.get(r.queue, 0),
                       workers=[], devices=[], in_flight=0, pending_items=0)
        for name, r in sorted(idle.items())
    ]
    deployments.sort(key=lambda view: view.name)
    return FleetSnapshot(taken_at=now, workers=workers, deployments=deployments)


def fleet_snapshot(client: Any) -> FleetSnapshot:
    """Read the live fleet through a :class:`~producers.FleetClient` (or anything with ``.redis``)."""

    from producers.backlog import claimed_counts

    def read() -> FleetSnapshot:
        ads = read_ads(client.redis)
        registrations = read_registrations(client.redis)
        queues = sorted({ad.queue for ad in ads} | {r.queue for r in registrations})
        return build_snapshot(ads, queue_depths(client.redis, queues) if queues else {}, registrations=registrations,
                              claimed=claimed_counts(client.redis, queues))

    access = getattr(client, "access", None)
    return access.call(read) if access is not None else read()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def format_fleet(snapshot: FleetSnapshot) -> str:
    """A human-readable table of workers and deployments."""
    if not snapshot.workers and not snapshot.deployments:
        return "no live worker and no registered deployment (is a worker running against this broker?)"
    lines = ["WORKERS"] if snapshot.workers else ["WORKERS", "(none live)"]
    lines += _table(["NAME", "PID", "DEVICE", "DEPLOYMENTS", "IN FLIGHT", "HEARTBEAT AGE", "UPTIME"], [
        [w.name, str(w.pid), ",".join(w.devices), ",".join(w.deployments), str(w.in_flight),
         f"{w.heartbeat_age_s:.1f}s", f"{w.uptime_s:.0f}s"] for w in snapshot.workers])
    lines += ["", "DEPLOYMENTS"]
    lines += _table(["NAME", "TASK", "BACKLOG", "QUEUED", "CLAIMED", "IN FLIGHT", "WORKERS", "MODEL"], [
        [d.name, d.task, str(d.backlog), str(d.queue_depth), str(d.claimed), str(d.in_flight),
         ",".join(d.workers) or "-", d.model]
        for d in snapshot.deployments])
    return "\n".join(lines)
