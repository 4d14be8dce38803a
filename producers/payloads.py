"""Claim checks: large inputs stored once in Redis with a TTL, referenced by key."""

from __future__ import annotations

import json
import uuid
from typing import Any

from producers.constants import PAYLOAD_KEY_PREFIX
from producers.errors import InvalidInput
from producers.schemas import PayloadRef


def store_payload(redis: Any, inputs: list[Any], *, ttl_s: int) -> PayloadRef:
    """Store ``inputs`` (already JSON-safe) once; returns the reference to send instead."""
    key = f"{PAYLOAD_KEY_PREFIX}{uuid.uuid4()}"
    redis.set(key, json.dumps(inputs, allow_nan=False), ex=ttl_s)
    return PayloadRef(key=key, start=0, stop=len(inputs))


def load_payload(redis: Any, ref: PayloadRef) -> list[Any]:
    """Read the slice ``ref`` points to; raises :class:`InvalidInput` when it expired."""
    if not ref.key.startswith(PAYLOAD_KEY_PREFIX):
        raise InvalidInput(f"payload reference {ref.key!r} is not a pipefleet payload key")
    raw = redis.get(ref.key)
    if raw is None:
        raise InvalidInput(f"payload {ref.key} is gone (expired or deleted); resubmit the job")
    data = json.loads(raw)
    if not isinstance(data, list):
        raise InvalidInput(f"payload {ref.key} does not hold a list of inputs")
    return data[ref.start:ref.stop]
