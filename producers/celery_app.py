"""The Celery settings every pipefleet process shares (JSON only, late acks, priorities)."""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.result import GroupResult

from producers.constants import PRIORITY_STEPS
from producers.redis_clients import RedisOptions, ReplicaWait, is_sentinel

WAIT_REPLICAS_SETTING = "pipefleet_wait_replicas"
"""Celery setting (pipefleet's own) read by :class:`ReplicatedResults`: replicas each result write waits for."""

WAIT_TIMEOUT_SETTING = "pipefleet_wait_timeout_ms"
"""Celery setting (pipefleet's own): the longest a result write waits for its replicas."""


MAX_RESTORE_INTERVAL_S = 10
"""Longest pause between two sweeps that give a dead worker's unacked jobs back to the queue."""

SWEEP_MUTEX_EXPIRE_S = 15
"""How long kombu's sweep lock outlives a worker killed while sweeping (kombu's default: 300 s).

A sweep holds the lock for milliseconds; one left by a SIGKILLed worker stopped every worker's sweep for five
minutes. Two sweeps that overlap once it expires are harmless: kombu restores each entry in a WATCH transaction.
"""


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between unacked-message sweeps: a quarter of the visibility timeout, 1 to 10 s."""
    return max(1, min(MAX_RESTORE_INTERVAL_S, visibility_timeout_s // 4))


def _ssl_settings(options: RedisOptions) -> dict[str, Any]:
    """kombu's ``broker_use_ssl`` / Celery's ``redis_backend_use_ssl`` for ``rediss://``: verify the server."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **options.ssl_kwargs()}


def _sentinel_options(options: RedisOptions) -> dict[str, Any]:
    """Transport options that make kombu's and Celery's Sentinel clients find the master (over TLS with
    ``sentinel_tls``; the master's own TLS comes from ``broker_use_ssl`` / ``redis_backend_use_ssl``)."""
    sentinel_kwargs = {key: value for key, value in (("username", options.sentinel_username),
                                                     ("password", options.sentinel_password)) if value}
    sentinel_kwargs.update(options.sentinel_tls_kwargs())
    return {"master_name": options.sentinel_master_name, "sentinel_kwargs": sentinel_kwargs}


def bare_url(url: str) -> str:
    """``url`` without a ``module:Backend+`` prefix naming the backend class."""
    scheme = url.split("://", 1)[0]
    return url.split("+", 1)[1] if "+" in scheme else url


def redis_settings(*, broker_url: str, result_backend: str, options: RedisOptions | None) -> dict[str, Any]:
    """Celery settings for Sentinel and TLS URLs: both the broker and the result backend need their own."""
    options = options or RedisOptions()
    result_backend = bare_url(result_backend)
    settings: dict[str, Any] = {
        WAIT_REPLICAS_SETTING: options.replicas_to_wait_for(result_backend),
        WAIT_TIMEOUT_SETTING: options.wait_timeout_ms,
    }
    if broker_url.startswith("rediss://") or (options.sentinel_tls and is_sentinel(broker_url)):
        settings["broker_use_ssl"] = _ssl_settings(options)
    if result_backend.startswith("rediss://") or (options.sentinel_tls and is_sentinel(result_backend)):
        settings["redis_backend_use_ssl"] = _ssl_settings(options)
    return settings


def celery_settings(*, broker_url: str, result_backend: str, result_ttl_s: int = 86_400,
                    visibility_timeout_s: int = 3600, redis_options: RedisOptions | None = None) -> dict:
    """Celery configuration shared by the client and the workers."""
    transport_options = {
        "visibility_timeout": visibility_timeout_s,
        # kombu sweeps a dead consumer's unacked messages back into the queue only every
        # interval * throttle seconds (100 s by default); sweep often enough that redelivery
        # happens about visibility_timeout_s after a worker dies, not minutes later.
        "unacked_restore_interval": restore_interval_s(visibility_timeout_s),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": SWEEP_MUTEX_EXPIRE_S,
        "priority_steps": list(PRIORITY_STEPS),
        "queue_order_strategy": "priority",
    }
    backend_transport_options: dict[str, Any] = {"visibility_timeout": visibility_timeout_s}
    # Without its own master_name Celery's Sentinel result backend fails with "No master found for None".
    if is_sentinel(broker_url):
        transport_options.update(_sentinel_options(redis_options or RedisOptions()))
    if is_sentinel(bare_url(result_backend)):
        backend_transport_options.update(_sentinel_options(redis_options or RedisOptions()))
    return {
        **redis_settings(broker_url=broker_url, result_backend=result_backend, options=redis_options),
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
        "result_backend_transport_options": backend_transport_options,
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


class ReplicatedResults:
    """Mixin for Celery's Redis backends: each result write waits for a replica's acknowledgement (``WAIT``).

    A result the master took but never passed on would be lost when Sentinel
    promotes a replica, while the job's ack (written after it) may survive: the
    job would then be done without a result. ``WAIT`` in the same pipeline
    closes that window; see :mod:`producers.redis_clients`.
    """

    @property
    def replica_wait(self) -> ReplicaWait:
        """This backend's :class:`ReplicaWait`, from the app's ``pipefleet_wait_*`` settings."""
        wait = self.__dict__.get("_replica_wait")
        if wait is None:
            wait = self.__dict__["_replica_wait"] = ReplicaWait(
                int(self.app.conf.get(WAIT_REPLICAS_SETTING) or 0), int(self.app.conf.get(WAIT_TIMEOUT_SETTING)))
        return wait

    def _set(self, key, value, expires=None):
        wait = self.replica_wait
        if not wait.replicas:
            return super()._set(key, value, expires)
        expires = self.expires if expires is None else expires
        with self.client.pipeline(transaction=False) as pipe:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
            wait.execute(pipe, f"result {key!r}")


class WorkerRedisBackend(ReplicatedResults, RedisBackend):
    """The workers' Redis result backend: Celery's, with replicated result writes."""


class WorkerSentinelBackend(ReplicatedResults, SentinelBackend):
    """The workers' Sentinel result backend: Celery's, with replicated result writes."""


class _NoSubscriptions:
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


class ProducerRedisBackend(_NoSubscriptions, ReplicatedResults, RedisBackend):
    """The producers' Redis result backend (see :class:`_NoSubscriptions`)."""


class ProducerSentinelBackend(_NoSubscriptions, ReplicatedResults, SentinelBackend):
    """The producers' Sentinel result backend (see :class:`_NoSubscriptions`)."""


def _backend_url(url: str, redis_class: str, sentinel_class: str) -> str:
    scheme = url.split("://", 1)[0]
    if scheme in ("redis", "rediss", "unix"):
        return f"{__name__}:{redis_class}+{url}"
    if scheme == "sentinel":
        return f"{__name__}:{sentinel_class}+{url}"
    return url


def producer_backend_url(url: str) -> str:
    """The ``result_backend`` setting that makes a client use pipefleet's producer backend for ``url``."""
    return _backend_url(url, "ProducerRedisBackend", "ProducerSentinelBackend")


def worker_backend_url(url: str) -> str:
    """The ``result_backend`` setting that makes a worker use pipefleet's replicated result backend for ``url``."""
    return _backend_url(url, "WorkerRedisBackend", "WorkerSentinelBackend")
