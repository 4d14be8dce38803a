"""Claim checks: large inputs stored once in Redis with a TTL, referenced by key."""

from __future__ import annotations

import json
import uuid
from typing import Any

from producers.constants import PAYLOAD_KEY_PREFIX
from producers.errors import InvalidInput
from producers.schemas import PayloadRef

ITEMS_KEY_MARK = "items:"
"""Payload keys ``pipefleet:payload:items:<uuid>`` hold a Redis list, one JSON input per entry."""


def store_payload(redis: Any, inputs: list[Any], *, ttl_s: int) -> PayloadRef:
    """Store ``inputs`` (already JSON-safe) once; returns the reference to send instead."""
    key = f"{PAYLOAD_KEY_PREFIX}{uuid.uuid4()}"
    redis.set(key, json.dumps(inputs, allow_nan=False), ex=ttl_s)
    return PayloadRef(key=key, start=0, stop=len(inputs))


def store_payload_items(redis: Any, inputs: list[Any], *, ttl_s: int, batch: int = 1000) -> PayloadRef:
    """Store ``inputs`` once as a Redis list, so each chunk reads only its slice (LRANGE)."""
    key = f"{PAYLOAD_KEY_PREFIX}{ITEMS_KEY_MARK}{uuid.uuid4()}"
    pipe = redis.pipeline(transaction=True)
    for start in range(0, len(inputs), batch):
        pipe.rpush(key, *(json.dumps(item, allow_nan=False) for item in inputs[start:start + batch]))
    pipe.expire(key, ttl_s)
    pipe.execute()
    return PayloadRef(key=key, start=0, stop=len(inputs))


def load_payload(redis: Any, ref: PayloadRef) -> list[Any]:
    """Read the slice ``ref`` points to; raises :class:`InvalidInput` when it expired."""
    if not ref.key.startswith(PAYLOAD_KEY_PREFIX):
        raise InvalidInput(f"payload reference {ref.key!r} is not a pipefleet payload key")
    if ref.key.startswith(f"{PAYLOAD_KEY_PREFIX}{ITEMS_KEY_MARK}"):
        return _load_items(redis, ref)
    raw = redis.get(ref.key)
    if raw is None:
        raise InvalidInput(f"payload {ref.key} is gone (expired or deleted); resubmit the job")
    data = json.loads(raw)
    if not isinstance(data, list):
        raise InvalidInput(f"payload {ref.key} does not hold a list of inputs")
    return data[ref.start:ref.stop]


def _load_items(redis: Any, ref: PayloadRef) -> list[Any]:
    if ref.stop is None:
        raw = redis.lrange(ref.key, ref.start, -1)
    else:
        raw = redis.lrange(ref.key, ref.start, ref.stop - 1) if ref.stop > ref.start else []
    if not raw or (ref.stop is not None and len(raw) != ref.stop - ref.start):
        raise InvalidInput(f"payload {ref.key} is gone (expired or deleted); resubmit the job")
    return [json.loads(item) for item in raw]
