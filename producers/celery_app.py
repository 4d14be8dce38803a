"""The Celery settings every pipefleet process shares (JSON only, late acks, priorities)."""

from __future__ import annotations

from celery import Celery

from producers.constants import PRIORITY_STEPS


MAX_RESTORE_INTERVAL_S = 10
"""Longest pause between two sweeps that give a dead worker's unacked jobs back to the queue."""


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between unacked-message sweeps: a quarter of the visibility timeout, 1 to 10 s."""
    return max(1, min(MAX_RESTORE_INTERVAL_S, visibility_timeout_s // 4))


def celery_settings(*, broker_url: str, result_backend: str, result_ttl_s: int = 86_400,
                    visibility_timeout_s: int = 3600) -> dict:
    """Celery configuration shared by the client and the workers."""
    transport_options = {
        "visibility_timeout": visibility_timeout_s,
        # kombu sweeps a dead consumer's unacked messages back into the queue only every
        # interval * throttle seconds (100 s by default); sweep often enough that redelivery
        # happens about visibility_timeout_s after a worker dies, not minutes later.
        "unacked_restore_interval": restore_interval_s(visibility_timeout_s),
        "unacked_restore_throttle": 1,
        "priority_steps": list(PRIORITY_STEPS),
        "queue_order_strategy": "priority",
    }
    return {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "result_extended": True,
        "result_expires": result_ttl_s,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # A result stored while Redis restarts must wait for it, not fail the finished job.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        "result_backend_max_sleep_between_retries_ms": 2000,
        # Events cost a publish per job; Flower switches worker events on while it watches.
        "task_send_sent_event": False,
        "worker_send_task_events": False,
        "task_create_missing_queues": True,
        "task_default_priority": None,
        "redis_backend_health_check_interval": 30,
        "broker_heartbeat": 0,
    }


def make_celery(name: str = "pipefleet", **settings) -> Celery:
    """A Celery app configured with :func:`celery_settings`."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_settings(**settings))
    return app
