"""The Celery settings every pipefleet process shares (JSON only, late acks, priorities)."""

from __future__ import annotations

from celery import Celery

from producers.constants import PRIORITY_STEPS


def celery_settings(*, broker_url: str, result_backend: str, result_ttl_s: int = 86_400,
                    visibility_timeout_s: int = 3600) -> dict:
    """Celery configuration shared by the client and the workers."""
    transport_options = {
        "visibility_timeout": visibility_timeout_s,
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
        "task_send_sent_event": True,
        "worker_send_task_events": True,
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
