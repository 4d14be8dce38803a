"""The Celery settings every pipefleet process shares (JSON only, late acks, priorities)."""

from __future__ import annotations

from celery import Celery
from celery.backends.redis import RedisBackend
from celery.result import GroupResult

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


class ProducerRedisBackend(RedisBackend):
    """Celery's Redis result backend without the pub/sub subscription Celery opens for each task it sends.

    Producers wait through :mod:`producers.result_waiter`. The subscriptions Celery
    would open for each sent task and each chord chunk are never read, so their
    messages would only pile up on an idle connection, and unsubscribing them
    when their ``AsyncResult`` is collected needs Redis still up (at interpreter
    exit it retries for a minute). ``AsyncResult.get`` still subscribes when called.
    """

    def on_task_call(self, producer, task_id):
        return None

    def apply_chord(self, header_result_args, body, **kwargs):
        # Celery builds a GroupResult here, subscribing to every chunk, only to learn whether a
        # chunk is itself a group; pipefleet's chunks never are.
        results = header_result_args[1] if len(header_result_args) > 1 else None
        if isinstance(results, (list, tuple)) and not any(isinstance(r, GroupResult) for r in results):
            return None
        return super().apply_chord(header_result_args, body, **kwargs)


def producer_backend_url(url: str) -> str:
    """The ``result_backend`` setting that makes a client use :class:`ProducerRedisBackend` for ``url``."""
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return f"{__name__}:ProducerRedisBackend+{url}"
    return url
