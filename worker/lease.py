"""Job ownership by lease: a claimed job belongs to its worker while that worker's lease lives.

Every worker holds a lease, ``pipefleet:lease:<worker>``, a key with a short TTL
(``lease_ttl_s``, 5 s by default) that its lease thread renews three times per
TTL. The claim script (:data:`worker.kombu_layout.CLAIM_SCRIPT`) records each
message it takes in kombu's unacked hash *and* in the worker's claims hash,
``pipefleet:claims:<worker>`` (tag -> claim time, order, length, source list).

- **Renew** (:data:`RENEW_SCRIPT`, every ``lease_ttl_s / 3``): refresh the lease
  key and move the score in kombu's ``unacked_index`` of every job the worker
  really has in hand to now, so kombu's own sweep (``visibility_timeout_s``)
  never takes a job from a live worker, however long the job runs. The worker
  names the tags it has in hand (claimed, not yet acked, handed back or
  dead-lettered); a claim in its hash that it does not name is put back on its
  queue like a dead worker's. Such orphans come from writes Redis lost (an ack
  or hand-back made on a master that died before its replica got it), from a
  write refused past ``redis_write_retry_s``, or from an earlier process under
  the same worker name: without this, a live lease would keep them from every
  worker for good.
- **Reap** (:data:`REAP_SCRIPT`, every worker, every second): for each worker in
  ``pipefleet:lease-holders`` whose lease key is gone, push each job it held
  back onto the head of the list it came from, in claim order, mark it as
  redelivered (``pipefleet:redelivered``), and forget its claims, in one atomic
  step. The dead worker may have stored a job's result and died before its ack:
  the claim that takes a marked job finds that result and acks the job without
  running it again. A killed worker's jobs are claimable again within
  ``lease_ttl_s`` plus one second.
- **Release** (:data:`RELEASE_SCRIPT`): a worker hands one job back (warm
  shutdown, Celery's requeue) to the head of its list.

Acks go through :data:`worker.kombu_layout.ACK_SCRIPT`, which only removes a
tag the worker still holds: a worker that lost its lease (paused past it) can
never ack away the record of another worker's claim of the same message.

Hand-written rather than Redis Streams' consumer groups (which have idle-time
claiming built in) because the queues stay kombu lists: producers, Flower and
``celery inspect`` keep working unchanged, and kombu's sweep stays a last resort.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import redis as redis_lib

from producers import constants
from worker import kombu_layout
from worker.supervision import guarded

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 1.0
"""How often every worker looks for lapsed leases."""

PUT_BACK_LUA = """
-- A claims-hash entry as {claim time, order in its claim, tag, message, source list}, or nil if it has none.
local function claim_entry(tag, claim, record)
  local at, order, length, list = string.match(claim, '^(%S+) (%d+) (%d+) (.+)$')
  if record and list then
    return {tonumber(at), tonumber(order), tag, string.sub(record, 2, 1 + tonumber(length)), list}
  end
end
-- Push entries back, newest claim first, so the oldest ends at the head of its list (consumers pop from the
-- right); mark them redelivered and drop them from kombu's unacked bookkeeping. Returns how many.
local function put_back(entries, unacked, index, redelivered)
  table.sort(entries, function(a, b) if a[1] ~= b[1] then return a[1] > b[1] end return a[2] > b[2] end)
  for _, entry in ipairs(entries) do
    redis.call('RPUSH', entry[5], entry[4])
    redis.call('SADD', redelivered, entry[3])
    redis.call('HDEL', unacked, entry[3])
    redis.call('ZREM', index, entry[3])
  end
  return #entries
end
"""
"""Lua shared by the renew and reap scripts: how a claimed job goes back to its queue."""

RENEW_SCRIPT = PUT_BACK_LUA + """
-- KEYS[1] lease key, KEYS[2] claims hash, KEYS[3] unacked hash, KEYS[4] unacked index, KEYS[5] holders set,
-- KEYS[6] set of tags put back (redelivered)
-- ARGV[1] lease TTL in ms, ARGV[2] now, ARGV[3] worker name, ARGV[4] cutoff: claims made since may still be
-- on their way to the worker's hand; ARGV[5..] the tags the worker has in hand
-- Returns {tags held, oldest claim time or false, 1 if the lease had lapsed, orphans put back}
local lapsed = redis.call('EXISTS', KEYS[1]) == 0
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
redis.call('SADD', KEYS[5], ARGV[3])
local in_hand = {}
for i = 5, #ARGV do in_hand[ARGV[i]] = true end
local cutoff = tonumber(ARGV[4])
local fields = redis.call('HGETALL', KEYS[2])
local held, oldest = 0, false
local orphans = {}
for i = 1, #fields, 2 do
  local tag = fields[i]
  local record = redis.call('HGET', KEYS[3], tag)
  if not record then
    redis.call('HDEL', KEYS[2], tag)  -- acked or restored by someone else: no longer ours to renew
  else
    local at = tonumber(string.match(fields[i + 1], '^(%S+)'))
    if in_hand[tag] or not at or at >= cutoff then
      redis.call('ZADD', KEYS[4], 'XX', ARGV[2], tag)
      held = held + 1
      if at and (not oldest or at < oldest) then oldest = at end
    else
      orphans[#orphans + 1] = claim_entry(tag, fields[i + 1], record)
    end
  end
end
for _, entry in ipairs(orphans) do redis.call('HDEL', KEYS[2], entry[3]) end
return {held, oldest and tostring(oldest) or false, lapsed and 1 or 0, put_back(orphans, KEYS[3], KEYS[4], KEYS[6])}
"""
"""Renew a worker's lease and the kombu scores of the jobs it has in hand; put its orphaned claims back."""

REAP_SCRIPT = PUT_BACK_LUA + """
-- KEYS[1] holders set, KEYS[2] unacked hash, KEYS[3] unacked index, KEYS[4] set of tags put back from dead workers
-- ARGV[1] lease key prefix, ARGV[2] claims key prefix
-- Returns {jobs put back, worker, worker, ...} for the workers whose lease had lapsed
local restored = 0
local reaped = {}
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. worker) == 0 then
    local claims_key = ARGV[2] .. worker
    local fields = redis.call('HGETALL', claims_key)
    local entries = {}
    for i = 1, #fields, 2 do
      entries[#entries + 1] = claim_entry(fields[i], fields[i + 1], redis.call('HGET', KEYS[2], fields[i]))
    end
    restored = restored + put_back(entries, KEYS[2], KEYS[3], KEYS[4])
    redis.call('DEL', claims_key)
    redis.call('SREM', KEYS[1], worker)
    reaped[#reaped + 1] = worker
  end
end
local result = {restored}
for _, worker in ipairs(reaped) do result[#result + 1] = worker end
return result
"""
"""Put every job held by a worker whose lease lapsed back at the head of its queue, atomically."""

RELEASE_SCRIPT = """
-- KEYS[1] claims hash, KEYS[2] unacked hash, KEYS[3] unacked index; ARGV[1] delivery tag
local claim = redis.call('HGET', KEYS[1], ARGV[1])
local record = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if not claim or not record then return 0 end
local length, list = string.match(claim, '^%S+ %d+ (%d+) (.+)$')
redis.call('RPUSH', list, string.sub(record, 2, 1 + tonumber(length)))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
"""Hand one held job back to the head of the list it came from (0 if this worker no longer holds it)."""


class LeaseKeeper:
    """Renews this worker's lease and reaps lapsed ones, on one thread; see the module docstring.

    ``healthy()`` is asked before each renewal: a worker with a stalled thread
    stops renewing, so the fleet takes its jobs back instead of waiting on it.
    ``chores`` run once per round after the reap (the poison sweep).
    """

    def __init__(self, client: redis_lib.Redis, worker: str, *, ttl_s: float = constants.LEASE_TTL_S,
                 healthy: Callable[[], bool] = lambda: True, tick: Callable[[], None] = lambda: None,
                 chores: list[Callable[[], Any]] | None = None) -> None:
        self.client = client
        self.worker = worker
        self.ttl_s = ttl_s
        self.recovered = 0
        """Jobs this worker put back from workers whose lease lapsed."""
        self.held = 0
        self.oldest_claim_at: float | None = None
        self.lapses = 0
        """Times this worker found its own lease lapsed (it was paused or cut off longer than the TTL)."""
        self.orphans = 0
        """Claims this worker's lease named but the worker no longer had in hand, put back by its renewals."""
        self._in_hand: set[str] = set()
        self._claiming_since: float | None = None
        self._healthy = healthy
        self._tick = tick
        self._chores = list(chores or [])
        self._renewed = False
        self._renew = client.register_script(RENEW_SCRIPT)
        self._reap = client.register_script(REAP_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._claims_key = kombu_layout.claims_key(worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=guarded("lease", self._loop), name="pipefleet-lease", daemon=True)

    @property
    def thread(self) -> threading.Thread:
        """The lease thread (for supervision)."""
        return self._thread

    @contextmanager
    def claiming(self) -> Iterator[float]:
        """Around one claim and its :meth:`hold`; yields the time to stamp the claim with.

        A renewal that runs meanwhile renews that claim's jobs rather than take them for orphans. Nothing
        blocks: the lease thread never waits on a claim, nor a claim on a renewal.
        """
        at = time.time()
        self._claiming_since = at
        try:
            yield at
        finally:
            self._claiming_since = None

    def hold(self, tags: Iterable[str]) -> None:
        """Record tags this worker just claimed (inside :meth:`claiming`)."""
        self._in_hand.update(tags)

    def let_go(self, tags: Iterable[str]) -> None:
        """Record tags this worker acked, handed back, dead-lettered or gave up on; a renewal puts back any
        whose removal from Redis did not stick."""
        self._in_hand.difference_update(tags)

    def renew(self) -> None:
        """Refresh the lease and the scores of the jobs in hand, put orphaned claims back (raises on a Redis
        error)."""
        # In this order: a claim that is not in the snapshot of the hand either began after `now` or is the
        # one in progress, and neither counts as an orphan (barring a wall clock stepped back in between).
        now = time.time()
        since = self._claiming_since
        in_hand = self._in_hand.copy()
        cutoff = now if since is None else min(now, since)
        held, oldest, lapsed, orphans = self._renew(
            keys=[kombu_layout.lease_key(self.worker), self._claims_key, kombu_layout.UNACKED_KEY,
                  kombu_layout.UNACKED_INDEX_KEY, constants.LEASE_HOLDERS_KEY, constants.REDELIVERED_KEY],
            args=[int(self.ttl_s * 1000), repr(now), self.worker, repr(cutoff), *in_hand])
        if orphans:
            self.orphans += int(orphans)
            logger.warning("worker %s put %d job(s) back on their queues: its lease still named them, but it no "
                           "longer had them in hand (an ack or hand-back lost with a failed-over master, a write "
                           "refused, or an earlier process of the same name)", self.worker, int(orphans))
        self.held = int(held)
        self.oldest_claim_at = float(oldest) if oldest else None
        first, self._renewed = not self._renewed, True
        if lapsed and not first:
            self.lapses += 1
            logger.warning("worker %s found its lease lapsed; jobs it held went back to their queues, and its "
                           "results for them are dropped if another worker already stored one", self.worker)

    def reap(self) -> int:
        """Put back the jobs of every worker whose lease lapsed; returns how many."""
        restored, *workers = self._reap(
            keys=[constants.LEASE_HOLDERS_KEY, kombu_layout.UNACKED_KEY, kombu_layout.UNACKED_INDEX_KEY,
                  constants.REDELIVERED_KEY],
            args=[constants.LEASE_KEY_PREFIX, constants.CLAIMS_KEY_PREFIX])
        restored = int(restored)
        if workers:
            names = ", ".join(w.decode() if isinstance(w, bytes) else str(w) for w in workers)
            logger.warning("lease of %s lapsed: put %d of its jobs back at the head of their queues", names,
                           restored)
        self.recovered += restored
        return restored

    def release(self, tag: str) -> bool:
        """Hand one held job back to the head of its queue; False if this worker no longer held it.

        Let go of either way: if Redis refused the hand-back, the next renewal puts the job back.
        """
        try:
            return bool(self._release(keys=[self._claims_key, kombu_layout.UNACKED_KEY,
                                            kombu_layout.UNACKED_INDEX_KEY], args=[tag]))
        finally:
            self.let_go([tag])

    def oldest_claim_age_s(self) -> float:
        """Age of the oldest job this worker holds (0 when it holds none), as of the last renewal."""
        return 0.0 if self.oldest_claim_at is None else max(0.0, time.time() - self.oldest_claim_at)

    def start(self) -> None:
        """Take the lease now, then keep it in the background."""
        self.renew()
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and give the lease up (jobs still held go back at once)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        try:
            self.client.delete(kombu_layout.lease_key(self.worker))
            self.reap()
        except redis_lib.RedisError as error:
            logger.warning("could not give the lease up (%s); it lapses in %ss", error, self.ttl_s)

    def _loop(self) -> None:
        renew_every = self.ttl_s / 3
        next_renew = time.monotonic() + renew_every
        while not self._stop.wait(min(REAP_INTERVAL_S, max(0.0, next_renew - time.monotonic()))):
            self._tick()
            try:
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + renew_every
                    if self._healthy():
                        self.renew()
                    else:
                        logger.error("worker %s has a stalled thread: not renewing its lease, so its jobs go "
                                     "to other workers", self.worker)
                self.reap()
                for chore in self._chores:
                    chore()
            except redis_lib.RedisError as error:
                logger.warning("lease thread: %s; retrying", error)
            except Exception:  # the lease thread must outlive any one failure
                logger.exception("lease thread failed one round")
