"""Webhook events and the durable outbox they wait in: what is sent, to whom, and when it is due.

An event is queued once per (event, URL) in Redis, so a delivery outlives the
process that queued it; :mod:`producers.webhook_delivery` sends what is due.

- ``pipefleet:webhooks:delivery:<delivery id>``: the delivery (URL, body, attempts), written
  with ``SET NX``, so queuing the same event twice (two gateways finalising one batch, a
  watcher that looked twice) queues it once, even after it was delivered;
- ``pipefleet:webhooks:due``: delivery ids scored by when they are next due;
- ``pipefleet:webhooks:job:<job id>`` and ``pipefleet:webhooks:watch``: a job's webhook, and the
  unfinished jobs that have one, so a job's outcome is turned into an event from its stored
  result, by whichever worker or gateway looks first.

Every event has OpenAI's shape, ``{"id": "evt_…", "object": "event", "type", "created_at",
"data"}``; its ``id`` is the ``webhook-id`` of every attempt, so receivers can deduplicate.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producers.constants import WEBHOOK_DUE_KEY, WEBHOOK_KEY_PREFIX, WEBHOOK_WATCH_KEY
from producers.errors import InvalidParams
from producers.urlguard import URL_SCHEMES, redact


class JobEventType(str, enum.Enum):
    """Events a job's webhook can receive."""

    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"


class BatchEventType(str, enum.Enum):
    """Events every ``[webhooks] endpoints`` URL receives, as OpenAI names them."""

    COMPLETED = "batch.completed"
    FAILED = "batch.failed"
    CANCELLED = "batch.cancelled"
    EXPIRED = "batch.expired"


class DeliveryState(str, enum.Enum):
    """Where one delivery stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DROPPED = "dropped"


MAX_URL_CHARS = 2048
"""The longest webhook URL accepted."""

INLINE_RESULT_BYTES = 256 * 1024
"""A ``job.succeeded`` event carries the job's outputs up to this size; larger ones are read from the result."""


class JobWebhook(BaseModel):
    """Where one job's events go: ``client.submit(..., webhook=URL, webhook_events=[...])``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(max_length=MAX_URL_CHARS)
    events: tuple[JobEventType, ...] = tuple(JobEventType)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme.lower() not in URL_SCHEMES or not parts.hostname:
            raise ValueError(f"webhook must be an http(s) URL with a host, not {redact(url)!r}")
        return url


def job_webhook(url: Any, events: Any = None) -> JobWebhook:
    """A checked :class:`JobWebhook`; raises InvalidParams naming what is wrong."""
    try:
        return JobWebhook(url=url, events=tuple(events) if events is not None else tuple(JobEventType))
    except (ValueError, TypeError) as error:
        raise InvalidParams(f"webhook: {error}") from None


class Delivery(BaseModel):
    """One event on its way to one URL."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """The delivery's own id: the event id and a digest of the URL."""
    webhook_id: str
    """The event id, sent as ``webhook-id`` on every attempt."""
    url: str
    body: str
    created_at: float
    attempts: int = 0
    state: DeliveryState = DeliveryState.PENDING
    last_error: str | None = None


def event_body(event_id: str, event_type: str, data: dict[str, Any], created_at: float | None = None) -> str:
    """The JSON body of an event, in OpenAI's event shape."""
    return json.dumps({"id": event_id, "object": "event", "type": event_type,
                       "created_at": int(created_at or time.time()), "data": data}, separators=(",", ":"))


def event_id_for(*parts: str) -> str:
    """A stable event id from what identifies the event (the same event always gets the same id)."""
    return "evt_" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def delivery_key(delivery_id: str) -> str:
    """The Redis key of one delivery record."""
    return f"{WEBHOOK_KEY_PREFIX}delivery:{delivery_id}"


def job_webhook_key(job_id: str) -> str:
    """The Redis key of one job's webhook."""
    return f"{WEBHOOK_KEY_PREFIX}job:{job_id}"


def enqueue(redis: Any, url: str, event_id: str, body: str, *, keep_s: float) -> bool:
    """Queue ``body`` for ``url`` unless this event was already queued for it; True if it was new.

    The record is kept ``keep_s`` (the retry horizon and a margin), so the same
    event queued again later, after its delivery, is still recognised.
    """
    delivery = Delivery(id=f"{event_id}.{hashlib.sha256(url.encode()).hexdigest()[:16]}", webhook_id=event_id,
                        url=url, body=body, created_at=time.time())
    new = redis.eval(_ENQUEUE_LUA, 2, delivery_key(delivery.id), WEBHOOK_DUE_KEY, delivery.model_dump_json(),
                     max(1, int(keep_s)), delivery.created_at, delivery.id)
    return bool(new)


# One step, so a record that exists (pending, delivered or dropped) is never scheduled again.
_ENQUEUE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""


def watch_job(redis: Any, job_id: str, webhook: JobWebhook, *, ttl_s: int) -> None:
    """Record that job ``job_id`` has a webhook; its outcome becomes an event once its result is stored."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.set(job_webhook_key(job_id), webhook.model_dump_json(), ex=ttl_s)
        pipe.zadd(WEBHOOK_WATCH_KEY, {job_id: time.time()})
        pipe.execute()
