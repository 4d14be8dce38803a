"""Sends the webhook outbox (:mod:`producers.webhooks`): signed, retried with backoff, at least once.

Every worker and every gateway runs one :class:`WebhookDispatcher` thread. Each
poll it

1. turns finished jobs that have a webhook into events: it claims a slice of
   ``pipefleet:webhooks:watch`` (pushing their scores one poll on, so other
   processes skip them meanwhile), reads their stored results in one MGET, and
   queues an event for each job that ended; a job whose result is not there yet
   stays watched. The outcome is read from the result store, so no job's commit
   path waits on a webhook and a result is never lost because a delivery failed;
2. sends what is due: it claims due ids from ``pipefleet:webhooks:due`` with a
   lease (their score moves past the attempt's timeout), posts each one signed per
   Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``,
   by the ``standardwebhooks`` package), and on failure schedules the next attempt
   after an exponential backoff, until ``max_retry_s`` after the event. A process
   killed mid-attempt leaves the id in the sorted set: it is due again when the
   lease ends, and the same ``webhook-id`` goes out again.

URLs pass :mod:`producers.urlguard` on every attempt (and every redirect): the
allowlist, and no private address unless allowed. A refused URL is dropped at once.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin, urlsplit

from producers.constants import WEBHOOK_DUE_KEY, WEBHOOK_WATCH_KEY
from producers.errors import JobCancelled, UnsafeURL
from producers.job import error_from_meta
from producers.urlguard import check_url, normalise_hosts, pinned_connection, redact
from producers.webhooks import (INLINE_RESULT_BYTES, Delivery, DeliveryState, JobEventType, JobWebhook,
                                delivery_key, enqueue, event_body, event_id_for, job_webhook_key)

logger = logging.getLogger(__name__)

CLAIM_BATCH = 200
"""Due deliveries (or watched jobs) one poll claims at most."""

SEND_THREADS = 8
"""Deliveries in flight at once per process: one slow receiver does not hold up the others."""

MAX_REDIRECTS = 3
"""307/308 hops followed (each one checked) before an attempt fails."""

RESPONSE_READ_BYTES = 64 * 1024
"""Bytes of a receiver's answer read (and ignored) before the connection is closed."""


@dataclass(frozen=True)
class DeliveryPolicy:
    """The ``[webhooks]`` settings a dispatcher needs (``DeliveryPolicy.from_settings(config.webhooks)``)."""

    secret: str
    endpoints: tuple[str, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()
    allow_private_hosts: frozenset[str] = frozenset()
    timeout_s: float = 10.0
    max_retry_s: float = 86_400.0
    initial_backoff_s: float = 5.0
    max_backoff_s: float = 3600.0
    poll_interval_s: float = 0.5
    result_ttl_s: int = 86_400

    @classmethod
    def from_settings(cls, settings: Any, *, result_ttl_s: int = 86_400) -> "DeliveryPolicy":
        """From a ``config.models.WebhookSettings`` (the hosts of ``endpoints`` are allowed too)."""
        endpoint_hosts = {urlsplit(url).hostname or "" for url in settings.endpoints}
        return cls(secret=settings.secret, endpoints=tuple(settings.endpoints),
                   allowed_hosts=normalise_hosts(set(settings.allowed_hosts) | endpoint_hosts - {""}),
                   allow_private_hosts=normalise_hosts(settings.allow_private_hosts), timeout_s=settings.timeout_s,
                   max_retry_s=settings.max_retry_s, initial_backoff_s=settings.initial_backoff_s,
                   max_backoff_s=settings.max_backoff_s, poll_interval_s=settings.poll_interval_s,
                   result_ttl_s=result_ttl_s)

    @property
    def keep_s(self) -> float:
        """How long a delivery record is kept: past its last retry, so a late duplicate is still recognised."""
        return self.max_retry_s + 86_400

    def backoff_s(self, attempts: int) -> float:
        """The pause after ``attempts`` failed attempts."""
        return min(self.initial_backoff_s * 2 ** max(0, attempts - 1), self.max_backoff_s)

    def check(self, url: str) -> None:
        """Raise UnsafeURL unless ``url`` passes the allowlist and the SSRF rules now."""
        check_url(url, self.allowed_hosts, self.allow_private_hosts, UnsafeURL)


@dataclass
class DeliveryStats:
    """What one dispatcher did, for metrics."""

    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        """Count one ``delivered``, ``failed_attempts`` or ``dropped``."""
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


# Claim up to ARGV[3] members due by ARGV[1], pushing their scores to ARGV[2] (the lease).
_CLAIM_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


def post_signed(policy: DeliveryPolicy, delivery: Delivery) -> int:
    """One attempt: POST the signed body to the delivery's URL; returns the final HTTP status."""
    from standardwebhooks.webhooks import Webhook

    now = datetime.datetime.now(tz=datetime.timezone.utc)
    signature = Webhook(policy.secret).sign(delivery.webhook_id, now, delivery.body)
    headers = {"Content-Type": "application/json", "User-Agent": "pipefleet-webhooks",
               "webhook-id": delivery.webhook_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": signature}
    url = delivery.url
    for _ in range(MAX_REDIRECTS + 1):
        checked = check_url(url, policy.allowed_hosts, policy.allow_private_hosts, UnsafeURL)
        connection = pinned_connection(checked, policy.timeout_s)
        try:
            connection.request("POST", checked.target, body=delivery.body.encode(), headers=headers)
            response = connection.getresponse()
            response.read(RESPONSE_READ_BYTES)
            location = response.getheader("Location")
        finally:
            connection.close()
        # Only 307/308 keep the method and body; the next URL passes every check again.
        if response.status in (307, 308) and location:
            url = urljoin(url, location)
            continue
        return response.status
    raise UnsafeURL(f"more than {MAX_REDIRECTS} redirects from {redact(delivery.url)}")


def job_event(job_id: str, meta: dict[str, Any]) -> tuple[JobEventType, dict[str, Any]] | None:
    """The event a stored Celery result stands for, with its ``data``; None while the job is unfinished."""
    status = meta.get("status")
    data: dict[str, Any] = {"id": job_id, "error": None, "error_type": None}
    if status == "SUCCESS":
        result = meta.get("result")
        outputs = result.get("outputs") if isinstance(result, dict) else result
        encoded = json.dumps(outputs, separators=(",", ":"))
        data.update(state="SUCCESS", result_inline=len(encoded) <= INLINE_RESULT_BYTES)
        if data["result_inline"]:
            data["result"] = outputs
        return JobEventType.SUCCEEDED, data
    if status in ("FAILURE", "REVOKED"):
        error = error_from_meta(meta.get("result")) if status == "FAILURE" else JobCancelled("the job was cancelled")
        cancelled = isinstance(error, JobCancelled)
        data.update(state="CANCELLED" if cancelled else "FAILURE", error=str(error), error_type=type(error).__name__)
        return (JobEventType.CANCELLED if cancelled else JobEventType.FAILED), data
    return None


class WebhookDispatcher:
    """One process's sender of webhook deliveries, and watcher of jobs with webhooks (see the module docstring)."""

    def __init__(self, redis: Any, policy: DeliveryPolicy, *, backend: Any = None, name: str = "webhooks") -> None:
        self.redis = redis
        self.policy = policy
        self.backend = backend
        """Celery's result backend, to read finished jobs' results (None: this process watches no jobs)."""
        self.stats = DeliveryStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(SEND_THREADS, thread_name_prefix=f"{name}-send")
        self._name = name

    def start(self) -> "WebhookDispatcher":
        """Start the polling thread (a daemon)."""
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling; deliveries in flight finish or are retried by another process after their lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def backlog(self) -> int:
        """Deliveries queued and not yet delivered or dropped (due now or waiting for a retry)."""
        return int(self.redis.zcard(WEBHOOK_DUE_KEY))

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                if self.backend is not None:
                    busy = self.watch_jobs() >= CLAIM_BATCH
                busy = self.deliver_due() >= CLAIM_BATCH or busy
            except Exception:  # the loop must outlive a Redis outage or a bad record
                logger.exception("webhook dispatcher poll failed; retrying")
            if not busy:  # a full claim means more is waiting: claim again at once
                self._stop.wait(self.policy.poll_interval_s)

    def _claim(self, key: str, lease_s: float) -> list[str]:
        now = time.time()
        ids = self.redis.eval(_CLAIM_LUA, 1, key, now, now + lease_s, CLAIM_BATCH)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def watch_jobs(self) -> int:
        """Queue the events of watched jobs that have ended; returns how many watched jobs were looked at."""
        job_ids = self._claim(WEBHOOK_WATCH_KEY, self.policy.poll_interval_s * 2)
        if not job_ids:
            return 0
        backend = self.backend
        metas = backend.client.mget([backend.get_key_for_task(job_id) for job_id in job_ids])
        targets = self.redis.mget([job_webhook_key(job_id) for job_id in job_ids])
        finished = []
        for job_id, raw_meta, raw_target in zip(job_ids, metas, targets):
            if raw_target is None:  # its registration expired with the job's results
                finished.append(job_id)
                continue
            event = job_event(job_id, backend.decode(raw_meta)) if raw_meta is not None else None
            if event is None:
                continue
            event_type, data = event
            target = JobWebhook.model_validate_json(raw_target)
            if event_type in target.events:
                event_id = event_id_for("job", job_id, event_type.value)
                enqueue(self.redis, target.url, event_id, event_body(event_id, event_type.value, data),
                        keep_s=self.policy.keep_s)
            finished.append(job_id)
        if finished:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(WEBHOOK_WATCH_KEY, *finished)
                pipe.delete(*[job_webhook_key(job_id) for job_id in finished])
                pipe.execute()
        return len(job_ids)

    def deliver_due(self) -> int:
        """Attempt every due delivery (up to :data:`CLAIM_BATCH`); returns how many were attempted."""
        ids = self._claim(WEBHOOK_DUE_KEY, self.policy.timeout_s * (MAX_REDIRECTS + 1) + 5)
        if ids:
            list(self._pool.map(self._attempt, ids))
        return len(ids)

    def _attempt(self, delivery_id: str) -> None:
        key = delivery_key(delivery_id)
        raw = self.redis.get(key)
        if raw is None:
            self.redis.zrem(WEBHOOK_DUE_KEY, delivery_id)
            return
        delivery = Delivery.model_validate_json(raw)
        if delivery.state is not DeliveryState.PENDING:
            self.redis.zrem(WEBHOOK_DUE_KEY, delivery_id)
            return
        delivery.attempts += 1
        permanent = False
        try:
            status = post_signed(self.policy, delivery)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except UnsafeURL as refused:
            error, permanent = str(refused), True
        except Exception as failure:  # any transport failure is one failed attempt
            error = f"{type(failure).__name__}: {failure}"
        if error is None:
            delivery.state, delivery.last_error = DeliveryState.DELIVERED, None
            self.stats.add("delivered")
            self._settle(key, delivery, None)
            return
        self.stats.add("failed_attempts")
        delivery.last_error = error
        next_due = time.time() + self.policy.backoff_s(delivery.attempts)
        if permanent or next_due - delivery.created_at > self.policy.max_retry_s:
            delivery.state = DeliveryState.DROPPED
            self.stats.add("dropped")
            logger.error("webhook %s to %s dropped after %d attempt(s): %s", delivery.webhook_id,
                         redact(delivery.url), delivery.attempts, error)
            self._settle(key, delivery, None)
            return
        logger.warning("webhook %s to %s failed (attempt %d: %s); next try in %.1f s", delivery.webhook_id,
                       redact(delivery.url), delivery.attempts, error, next_due - time.time())
        self._settle(key, delivery, next_due)

    def _settle(self, key: str, delivery: Delivery, next_due: float | None) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, delivery.model_dump_json(), keepttl=True)
            if next_due is None:
                pipe.zrem(WEBHOOK_DUE_KEY, delivery.id)
            else:
                pipe.zadd(WEBHOOK_DUE_KEY, {delivery.id: next_due})
            pipe.execute()


class WebhookCollector:
    """A ``prometheus_client`` collector of a dispatcher: deliveries, failed attempts, drops, retry backlog."""

    def __init__(self, dispatcher: WebhookDispatcher, labels: Iterable[tuple[str, str]] = ()) -> None:
        self.dispatcher = dispatcher
        self.labels = dict(labels)

    def collect(self) -> Iterator[Any]:
        """Yield the families (the backlog is read from Redis at scrape time)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names, values = list(self.labels), list(self.labels.values())
        stats = self.dispatcher.stats
        for metric, text, value in (
                ("pipefleet_webhook_deliveries", "Webhook deliveries accepted by their receiver (2xx)",
                 stats.delivered),
                ("pipefleet_webhook_failures", "Webhook delivery attempts that failed", stats.failed_attempts),
                ("pipefleet_webhook_dropped", "Webhook deliveries given up (retry horizon passed, URL refused)",
                 stats.dropped)):
            family = CounterMetricFamily(metric, text, labels=names)
            family.add_metric(values, value)
            yield family
        backlog = GaugeMetricFamily("pipefleet_webhook_backlog",
                                    "Webhook deliveries queued in Redis, due or waiting for a retry", labels=names)
        try:
            backlog.add_metric(values, self.dispatcher.backlog())
        except Exception:  # a scrape during a Redis outage still answers
            backlog.add_metric(values, float("nan"))
        yield backlog


def start_dispatcher(settings: Any, redis: Any, *, backend: Any = None, result_ttl_s: int = 86_400,
                     name: str = "webhooks") -> WebhookDispatcher | None:
    """Start a dispatcher for a ``[webhooks]`` table; None (and nothing started) when it sets no ``secret``."""
    if not settings.secret:
        return None
    policy = DeliveryPolicy.from_settings(settings, result_ttl_s=result_ttl_s)
    return WebhookDispatcher(redis, policy, backend=backend, name=name).start()
