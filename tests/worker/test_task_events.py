"""Celery task events follow the worker's switch: off by default, on for Flower's ``enable_events``.

Celery enables a worker's event dispatcher for its heartbeats even with ``task_events`` off, with only the
``worker`` group; the plain-job path must send task events only while the ``task`` group is on, as Celery's
own requests do. Observed on the broker itself: every event is a Redis PUBLISH on a ``celeryev`` channel.
"""

from __future__ import annotations

import base64
import json
import socket
import time

from tests.conftest import Fleet


def _task_events_during(broker, run) -> list[str]:
    """The task event types published while ``run()`` runs (and a second after, for buffered ones)."""
    pubsub = broker.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celeryev*")
    try:
        run()
        seen: list[str] = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is None:
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            payload = json.loads(body)
            events = payload if isinstance(payload, list) else [payload]
            seen += [event.get("type", "") for event in events if isinstance(event, dict)]
        return [kind for kind in seen if kind.startswith("task-")]
    finally:
        pubsub.close()


def test_plain_jobs_send_task_events_only_while_the_task_group_is_on(fleet: Fleet, model_dir):
    config = fleet.config([{"name": "te-tc", "task": "text-classification",
                            "model": str(model_dir("text-classification"))}], task_events=False)
    worker = fleet.worker(config, deployments=["te-tc"])
    broker = fleet.server.client(int(fleet.broker_url.rsplit("/", 1)[1]))
    with fleet.client() as client:
        def run_jobs() -> None:
            for job in [client.submit(deployment="te-tc", inputs=f"text {i}") for i in range(5)]:
                job.result(timeout=30)

        assert _task_events_during(broker, run_jobs) == [], "task events sent with task_events off"
        replies = client.celery.control.enable_events(destination=[f"{worker.name}@{socket.gethostname()}"],
                                                      reply=True, timeout=10)
        assert replies, "the worker did not answer enable_events"
        events = _task_events_during(broker, run_jobs)
    assert events.count("task-succeeded") == 5, events
    assert events.count("task-received") == 5 and events.count("task-started") == 5, events
