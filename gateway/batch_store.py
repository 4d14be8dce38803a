"""Batches in Redis: the objects, their lines and answers, and the lease of the gateway that advances each.

Per batch, under ``pipefleet:batch:<id>``:

- the key itself: the :class:`BatchRecord` (the OpenAI object, plus ``lines`` and ``cursor``);
- ``…:lines``: the valid lines, in file order, as the holder submits them;
- ``…:pending``: lines submitted and not yet answered, by position in ``…:lines``;
- ``…:out`` / ``…:err``: output and error-file lines by their 1-based line number, written with
  ``HSET`` (an answer written twice is still one line: every ``custom_id`` appears exactly once);
- ``…:lease``: the token of the gateway advancing the batch, with a TTL;
- ``…:cancel``: set by ``POST /v1/batches/{id}/cancel`` on any replica.

``pipefleet:batches`` lists every batch by creation time; ``pipefleet:batches:active``
holds the unfinished ones, which every gateway's runner looks at.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis as redis_lib

from gateway.batch_protocol import BatchRecord, BatchRequestCounts
from producers.constants import ACTIVE_BATCHES_KEY, BATCH_KEY_PREFIX, BATCHES_INDEX_KEY

# Renew our lease, or take a free one. 1: renewed, 2: taken (a new holder), 0: another gateway holds it.
_LEASE_LUA = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""


def new_batch_id() -> str:
    """A fresh, unguessable batch id."""
    return f"batch_{uuid.uuid4().hex}"


def line_job_id(batch_id: str, position: int) -> str:
    """The fleet job id of line ``position``: the same on every gateway, so resubmitting is idempotent.

    A UUID4 in form (the client requires one) made from the batch id, which is random.
    """
    return str(uuid.UUID(bytes=uuid.uuid5(uuid.NAMESPACE_URL, f"{batch_id}/{position}").bytes, version=4))


class LeaseLost(Exception):
    """This gateway's lease on a batch passed to another (it stalled): it must not write that batch any more.

    Internal to the batch runner, never shown to a client.
    """


class BatchStore:
    """Batch records and their per-line state in the broker's Redis."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    def key(self, batch_id: str, part: str = "") -> str:
        """The Redis key of ``part`` (``lines``, ``out``, ``err``, …) of a batch."""
        return f"{BATCH_KEY_PREFIX}{batch_id}{':' + part if part else ''}"

    def create(self, record: BatchRecord) -> None:
        """Store a new batch and make it active."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.key(record.id), record.model_dump_json(), ex=self.ttl_s)
            # Scored to the microsecond: batches created within one second still list in creation order.
            pipe.zadd(BATCHES_INDEX_KEY, {record.id: time.time()})
            pipe.sadd(ACTIVE_BATCHES_KEY, record.id)
            pipe.execute()

    def get(self, batch_id: str) -> BatchRecord | None:
        """The record, or None."""
        raw = self.redis.get(self.key(batch_id))
        return BatchRecord.model_validate_json(raw) if raw else None

    def guarded(self, batch_id: str, token: str, fill: Any) -> None:
        """Run ``fill(pipe)``'s writes in one transaction, only while ``token`` holds the batch's lease.

        Raises LeaseLost otherwise: a holder that stalled past its lease never
        overwrites what the new holder wrote (a final status with an older one).
        """
        lease_key = self.key(batch_id, "lease")
        with self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(lease_key)
                if pipe.get(lease_key) != token.encode():
                    raise LeaseLost(batch_id)
                pipe.multi()
                fill(pipe)
                pipe.execute()
            except redis_lib.WatchError:
                raise LeaseLost(batch_id) from None

    def active(self) -> list[str]:
        """Ids of the batches not yet final."""
        return sorted(member.decode() for member in self.redis.smembers(ACTIVE_BATCHES_KEY))

    def retire(self, record: BatchRecord) -> None:
        """The batch is final: no runner looks at it again, and its working keys expire with it."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(ACTIVE_BATCHES_KEY, record.id)
            pipe.delete(self.key(record.id, "lines"), self.key(record.id, "pending"), self.key(record.id, "lease"))
            for part in ("out", "err", "cancel"):
                pipe.expire(self.key(record.id, part), self.ttl_s)
            pipe.execute()

    def forget(self, batch_id: str) -> None:
        """Drop an id whose record expired from the active set."""
        self.redis.srem(ACTIVE_BATCHES_KEY, batch_id)

    def hold(self, batch_id: str, token: str, lease_s: float) -> int:
        """Take or renew the lease on a batch: 1 renewed, 2 newly taken, 0 held by another gateway."""
        return int(self.redis.eval(_LEASE_LUA, 1, self.key(batch_id, "lease"), token, int(lease_s * 1000)))

    def request_cancel(self, batch_id: str) -> int:
        """Flag the batch for cancelling (its holder stops it on its next step); returns when it was first asked."""
        self.redis.set(self.key(batch_id, "cancel"), now_s(), ex=self.ttl_s, nx=True)
        return self.cancel_requested(batch_id) or now_s()

    def cancel_requested(self, batch_id: str) -> int | None:
        """When a cancel was first asked for (Unix seconds), or None."""
        raw = self.redis.get(self.key(batch_id, "cancel"))
        return int(raw) if raw else None

    def counts(self, record: BatchRecord) -> BatchRequestCounts:
        """``request_counts`` now: lines answered 200 and lines in the error file."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(self.key(record.id, "out"))
            pipe.hlen(self.key(record.id, "err"))
            completed, failed = pipe.execute()
        return BatchRequestCounts(total=record.request_counts.total, completed=completed, failed=failed)

    def answers(self, batch_id: str, part: str) -> list[tuple[int, bytes]]:
        """Every line of ``out`` or ``err``, in line order."""
        found = self.redis.hgetall(self.key(batch_id, part))
        return sorted((int(line), value) for line, value in found.items())

    def add_answers(self, batch_id: str, out: dict[int, str], err: dict[int, str]) -> None:
        """Record answered lines (the same line again overwrites: still one answer)."""
        with self.redis.pipeline(transaction=True) as pipe:
            if out:
                pipe.hset(self.key(batch_id, "out"), mapping=out)
            if err:
                pipe.hset(self.key(batch_id, "err"), mapping=err)
            pipe.execute()

    def page(self, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """Batches newest first, after the batch ``after``; and whether more follow."""
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(BATCHES_INDEX_KEY, after)
            start = 0 if rank is None else rank + 1
        ids = [i.decode() for i in self.redis.zrevrange(BATCHES_INDEX_KEY, start, start + limit)]
        raws = self.redis.mget([self.key(i) for i in ids]) if ids else []
        records = [BatchRecord.model_validate_json(raw) for raw in raws if raw]
        return records[:limit], len(ids) > limit

    def pending(self, batch_id: str) -> dict[int, dict[str, Any]]:
        """Submitted lines not yet answered: position in ``…:lines`` → the line."""
        return {int(position): json.loads(raw)
                for position, raw in self.redis.hgetall(self.key(batch_id, "pending")).items()}


def now_s() -> int:
    """Unix seconds, as the batch object's timestamps are written."""
    return int(time.time())
