"""The decode step of the hot path: which claimed messages are plain ``infer`` jobs, and their spec.

A plain job is an ``infer`` task message that is not part of a chord, group or chain, has no ETA, callbacks or
errbacks, has not expired and was not revoked, and carries one JSON spec that is not a chunk's. Anything else
stays with Celery's own strategy, which keeps Celery's semantics for it.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, NamedTuple

from celery.worker import state as worker_state

from producers.constants import INFER_TASK

logger = logging.getLogger(__name__)


class PlainJob(NamedTuple):
    """A decoded plain job: its id, its spec, and a stand-in for Celery's task request.

    The stand-in has what Celery's result backend reads off a request when it stores a result.
    """

    job_id: str
    spec: dict
    request: Any


def is_plain_infer(message: Any) -> bool:
    """True if the message's headers name an ``infer`` task outside any group, without ETA, unexpired, unrevoked."""
    headers = message.headers or {}
    if headers.get("task") != INFER_TASK or headers.get("group") or headers.get("eta"):
        return False
    expires = headers.get("expires")
    if expires:
        when = datetime.fromisoformat(expires)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        if when <= datetime.now(timezone.utc):
            return False  # Celery's strategy records the expiry as it always does
    return headers.get("id") not in worker_state.revoked


def decode_body(message: Any) -> tuple[list, dict, dict] | None:
    """``(args, kwargs, embed)`` of a JSON task body without callbacks, errbacks, chain or chord; else None."""
    body = message.body
    if message.content_type != "application/json":
        return None
    try:
        args, kwargs, embed = json.loads(body)
    except (ValueError, TypeError):
        return None
    if any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord")):
        return None
    return args, kwargs, embed


def plain_job(message: Any, *, hostname: str) -> PlainJob | None:
    """The plain job a claimed message carries, or None when Celery's own strategy must run it."""
    if not is_plain_infer(message):
        return None
    decoded = decode_body(message)
    if decoded is None:
        return None
    args, kwargs, _ = decoded
    # infer(spec): clients pass the spec as a keyword, Celery canvases positionally.
    if len(args) == 1 and not kwargs:
        spec = args[0]
    elif not args and set(kwargs) == {"spec"}:
        spec = kwargs["spec"]
    else:
        return None
    if not isinstance(spec, dict) or spec.get("chunk_index") is not None:
        return None
    headers = message.headers
    request = SimpleNamespace(task=headers.get("shadow") or INFER_TASK, args=args, kwargs=kwargs,
                              hostname=hostname, retries=headers.get("retries", 0),
                              delivery_info=message.delivery_info, children=[], group=None,
                              parent_id=headers.get("parent_id"), stamps=None,
                              # Celery's mark_as_failure/mark_as_revoked read these off the request.
                              chord=None, chain=None, errbacks=None)
    return PlainJob(headers["id"], spec, request)
