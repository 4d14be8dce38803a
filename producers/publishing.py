"""Celery task messages, laid out as kombu's Redis transport stores them, published in one pipeline.

``celery.send_task`` costs about 0.7 ms of CPU per job here: routing, signals,
a pooled producer, ``connection.ensure``, a Redis client per call, and a
pub/sub subscribe to the result channel. A burst of jobs needs none of that
per job. This module builds the very same message and pushes many of them in
one round trip:

- headers and body come from Celery itself (``app.amqp.create_task_message``,
  task protocol 2), so a stock Celery worker consumes them unchanged;
- the envelope is kombu's virtual-transport layout: the JSON body base64-encoded,
  ``properties`` with ``delivery_mode``, ``priority``, ``delivery_info`` and a
  unique ``delivery_tag``;
- the message is ``LPUSH``-ed onto the list of its priority step, ``q`` for
  step 0 and ``q\\x06\\x16<step>`` for the others, as kombu's ``_q_for_pri`` names it.

With ``wait_replicas`` (on by default with Sentinel), the pipeline ends in
``WAIT``: ``submit()`` returns once a replica holds the jobs, so a failover
cannot lose a job the caller was told is queued.

``tests/producers/test_publishing.py`` pins this layout against what
``celery.send_task`` pushes with the installed kombu. A connection error retries
the whole pipeline with the client's publish retry policy, as kombu's
``ensure`` does for one message: delivery is at least once.
"""

from __future__ import annotations

import base64
import bisect
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import redis as redis_lib
from kombu.utils.json import dumps as kombu_dumps

from producers.constants import PRIORITY_STEPS
from producers.redis_clients import NO_WAIT, ReplicaWait, replication_barrier

logger = logging.getLogger(__name__)

PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's separator between a queue name and its priority step (``Channel.sep``)."""

MAX_PRIORITY = 9
"""kombu clamps a message's priority into 0..9 before choosing its step."""

PERSISTENT_DELIVERY_MODE = 2
"""What Celery's queues ask for; kept in the envelope as kombu writes it."""

PIPELINE_MAX_MESSAGES = 1000
"""Messages per pipeline round trip: bounds the client's buffer on very large bursts."""


@dataclass(frozen=True)
class TaskMessage:
    """One ready message: the Redis list it goes to and its raw JSON."""

    task_id: str
    key: str
    raw: str


def priority_key(queue: str, priority: int | None, steps: tuple[int, ...] = PRIORITY_STEPS) -> str:
    """The Redis list kombu keeps ``queue``'s messages of this priority in."""
    clamped = max(min(int(priority or 0), MAX_PRIORITY), 0)
    step = steps[bisect.bisect(steps, clamped) - 1]
    return f"{queue}{PRIORITY_SEPARATOR}{step}" if step else queue


def build_message(app: Any, task: str, *, task_id: str, kwargs: dict[str, Any], queue: str, priority: int,
                  shadow: str | None = None, expires_s: float | None = None, argsrepr: str | None = None,
                  kwargsrepr: str | None = None) -> TaskMessage:
    """The message ``app.send_task(task, kwargs=kwargs, task_id=..., queue=..., ...)`` would push."""
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id, task, (), kwargs, expires=expires_s, shadow=shadow, argsrepr=argsrepr, kwargsrepr=kwargsrepr,
        reply_to=app.thread_oid, ignore_result=None)
    # send_task passes its options on as message properties too; so do we, to stay byte-for-byte alike.
    if argsrepr is not None:
        properties["argsrepr"] = argsrepr
    if kwargsrepr is not None:
        properties["kwargsrepr"] = kwargsrepr
    properties["delivery_mode"] = PERSISTENT_DELIVERY_MODE
    if expires_s is not None:
        properties["expiration"] = str(int(expires_s * 1000))
    properties["delivery_info"] = {"exchange": "", "routing_key": queue}
    properties["priority"] = priority
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = str(uuid.uuid4())
    encoded_body = base64.b64encode(kombu_dumps(body).encode("utf-8")).decode("ascii")
    envelope = {"body": encoded_body, "content-encoding": "utf-8", "content-type": "application/json",
                "headers": headers, "properties": properties}
    return TaskMessage(task_id=task_id, key=priority_key(queue, priority), raw=kombu_dumps(envelope))


class Publisher:
    """Builds and pushes one client's task messages: ``publisher.publish([publisher.message(...), ...])``."""

    def __init__(self, app: Any, redis: Any, *, wait: ReplicaWait = NO_WAIT) -> None:
        self.app = app
        self.redis = redis
        self.wait = wait
        """Replicas that must hold a published batch before :meth:`publish` returns."""

    def message(self, task: str, **options: Any) -> TaskMessage:
        """:func:`build_message` with this client's Celery app."""
        return build_message(self.app, task, **options)

    def publish(self, messages: list[TaskMessage]) -> None:
        """:func:`publish` on this client's broker, with its Celery publish retry policy."""
        if messages:
            publish(self.redis, messages, retry_policy=self.app.conf.task_publish_retry_policy, wait=self.wait)

    def replicated(self) -> None:
        """Return once a replica holds every write made so far, by any connection (after chords and splits)."""
        replication_barrier(self.redis, self.wait)


def _retry_delays(policy: dict[str, Any]) -> Iterable[float]:
    """Pauses between publish attempts, as kombu's ``ensure`` spaces them."""
    delay = float(policy.get("interval_start", 0.2))
    for _ in range(int(policy.get("max_retries", 20))):
        yield delay
        delay = min(delay + float(policy.get("interval_step", 0.5)), float(policy.get("interval_max", 2.0)))


def publish(redis: Any, messages: list[TaskMessage], *, retry_policy: dict[str, Any] | None = None,
            wait: ReplicaWait = NO_WAIT) -> None:
    """Push ``messages`` in order, in as few round trips as :data:`PIPELINE_MAX_MESSAGES` allows.

    Consecutive messages for the same list go out in one ``LPUSH``; a consumer
    popping from the right takes them in the order given. Through a Redis
    outage the batch is retried with ``retry_policy`` (kombu's ``ensure`` keys).
    With ``wait``, each round trip ends once its replicas hold it (see :class:`ReplicaWait`).
    """
    for start in range(0, len(messages), PIPELINE_MAX_MESSAGES):
        _publish_once_or_retry(redis, messages[start:start + PIPELINE_MAX_MESSAGES], retry_policy or {}, wait)


def _publish_once_or_retry(redis: Any, messages: list[TaskMessage], policy: dict[str, Any],
                           wait: ReplicaWait) -> None:
    delays = iter(_retry_delays(policy))
    while True:
        try:
            _push(redis, messages, wait)
            return
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as error:
            if isinstance(error, redis_lib.AuthenticationError):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            logger.warning("publishing %d job(s) failed (%s); retrying in %.1f s", len(messages), error, delay)
            time.sleep(delay)


def _push(redis: Any, messages: list[TaskMessage], wait: ReplicaWait = NO_WAIT) -> None:
    runs: list[tuple[str, list[str]]] = []
    for message in messages:
        if runs and runs[-1][0] == message.key:
            runs[-1][1].append(message.raw)
        else:
            runs.append((message.key, [message.raw]))
    if len(runs) == 1 and not wait.replicas:
        redis.lpush(runs[0][0], *runs[0][1])
        return
    with redis.pipeline(transaction=False) as pipe:
        for key, raws in runs:
            pipe.lpush(key, *raws)
        # In the same pipeline: WAIT counts the writes of its own connection.
        wait.execute(pipe, f"{len(messages)} published job(s)")
