"""Poison messages: recognise them, and move each to the dead-letter list in one atomic step.

A message is poison when this worker can never run it: not JSON to Python
(garbage, hex numbers, ``nan``: Lua's decoder accepts some of these, Python's
does not), not the shape of a Celery message, no job id, an unknown task, a
content type other than JSON. Leaving it unacked would block kombu's sweep (it
raises on the first entry it cannot decode) and pin it to this worker; handing
it to Celery crashes Celery's own handlers on some of them. Instead
:data:`worker.kombu_layout.DEAD_LETTER_SCRIPT` removes it from the unacked
bookkeeping and pushes a record (reason, tag, job id, the raw message) onto
``pipefleet:dead-letter`` in one step, and a job id, when the message has one,
gets a :class:`~producers.errors.DeadLettered` failure so a waiting client is
told at once instead of hanging.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Collection

import redis as redis_lib
from celery import states

from producers.constants import QUEUE_PREFIX
from producers.errors import DeadLettered
from worker import kombu_layout

logger = logging.getLogger(__name__)

SWEEP_BATCH = 200
"""Unacked entries examined per sweep round at most."""

SWEEP_LEAD_S = 5.0
"""The poison sweep looks at entries this long before kombu's own sweep would (kombu raises on poison)."""


class PoisonMessage(ValueError):
    """A message no worker can run; the message says why."""


def _refuse_constant(name: str) -> Any:
    raise PoisonMessage(f"JSON with {name}, which only some decoders accept")


def decode_strict(raw: bytes | str) -> Any:
    """Python's reading of a message, refusing what JSON does not allow (``NaN``, ``Infinity``)."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except PoisonMessage:
        raise
    except (ValueError, TypeError) as error:
        raise PoisonMessage(f"not JSON to Python: {error}") from None


def envelope_problem(payload: Any, known_tasks: Collection[str]) -> str | None:
    """Why a decoded kombu message cannot be run here, or None when it has the shape of a runnable job."""
    if not isinstance(payload, dict):
        return f"the message is a JSON {type(payload).__name__}, not an object"
    headers = payload.get("headers")
    if not isinstance(headers, dict):
        return "the message has no headers object"
    task = headers.get("task")
    if not isinstance(task, str):
        return "the message names no task"
    if task not in known_tasks:
        return f"unknown task {task!r}"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "the message has no job id"
    if not isinstance(payload.get("body"), str):
        return "the message has no body"
    if payload.get("content-type") != "application/json":
        return f"content type {payload.get('content-type')!r} is refused (JSON only)"
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_info"), dict):
        return "the message has no delivery properties"
    return None


def job_id_of(payload: Any) -> str | None:
    """The job id a message carries, if it carries a usable one."""
    headers = payload.get("headers") if isinstance(payload, dict) else None
    job_id = headers.get("id") if isinstance(headers, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


class DeadLetters:
    """Moves poison messages to the dead-letter list and fails their jobs; counts them."""

    def __init__(self, client: redis_lib.Redis, worker: str, backend: Any = None) -> None:
        self.client = client
        self.worker = worker
        self.backend = backend
        self.count = 0
        """Messages this worker dead-lettered."""
        self._script = client.register_script(kombu_layout.DEAD_LETTER_SCRIPT)

    def record(self, raw: bytes | str, reason: str) -> None:
        """Count and log a message the claim script dead-lettered itself (it had no delivery tag)."""
        self.count += 1
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        logger.error("dead-lettered message without a tag: %s (%r)", reason, text[:200])

    def send(self, tag: str, reason: str, raw: bytes | str, job_id: str | None = None) -> bool:
        """Dead-letter the unacked message ``tag``; False if it was no longer unacked (someone else did)."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        record = json.dumps({"reason": reason, "tag": tag, "job_id": job_id, "worker": self.worker,
                             "at": time.time(), "message": text})
        moved = bool(self._script(keys=kombu_layout.dead_letter_keys(self.worker), args=[tag, record]))
        if not moved:
            return False
        self.count += 1
        logger.error("dead-lettered message %s (job %s): %s", tag, job_id or "without an id", reason)
        if job_id is not None and self.backend is not None:
            try:
                self.backend.store_result(job_id, DeadLettered(f"the job's message was dead-lettered: {reason}"),
                                          states.FAILURE)
            except Exception:  # the record is in the dead-letter list either way
                logger.warning("could not store the failure of dead-lettered job %s", job_id, exc_info=True)
        return True

    def sweep_unacked(self, visibility_timeout_s: float, known_tasks: Collection[str]) -> int:
        """Dead-letter unacked entries kombu's sweep could not restore, or whose job no worker could run.

        Looks only at entries kombu's sweep is about to see (older than the
        visibility timeout, less :data:`SWEEP_LEAD_S`), so live claims, whose
        scores the lease keeps fresh, are never read. Entries of other apps'
        queues (another Celery app on the same Redis) are only dead-lettered
        when they are not JSON, since kombu's sweep stops at those for everyone.
        Returns how many were moved.
        """
        lead = min(SWEEP_LEAD_S, visibility_timeout_s / 2)
        due = self.client.zrangebyscore(kombu_layout.UNACKED_INDEX_KEY, "-inf",
                                        time.time() - visibility_timeout_s + lead, start=0, num=SWEEP_BATCH)
        if not due:
            return 0
        records = self.client.hmget(kombu_layout.UNACKED_KEY, due)
        moved = 0
        for tag, record in zip(due, records):
            if record is None:
                continue
            tag_text = tag.decode(errors="replace") if isinstance(tag, bytes) else tag
            reason, payload = self._record_problem(record, known_tasks)
            if reason is not None and self.send(tag_text, f"unrestorable unacked entry: {reason}", record,
                                                job_id_of(payload)):
                moved += 1
        return moved

    @staticmethod
    def _record_problem(record: bytes, known_tasks: Collection[str]) -> tuple[str | None, Any]:
        try:
            entry = decode_strict(record)
        except PoisonMessage as error:
            return str(error), None
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], dict)
                and all(isinstance(part, str) for part in entry[1:])):
            return "not a [message, exchange, routing key] entry", None
        if not entry[2].startswith(QUEUE_PREFIX):
            return None, entry[0]
        # kombu's restore would drop a message whose headers or properties are not objects; none of these can run.
        return envelope_problem(entry[0], known_tasks), entry[0]
