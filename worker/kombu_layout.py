"""Everything pipefleet knows about kombu's Redis data layout, in one place.

pipefleet's bulk consumer (:mod:`worker.consumer`) takes messages off the queues
itself, but it records them exactly where kombu's Redis transport records the
messages it delivers, so kombu's own sweeper (``QoS.restore_visible``, run by
every worker) redelivers them when a worker dies. That layout, as of kombu
5.6/5.7:

- A queue ``q`` with priority steps is one list per step: ``q`` for step 0,
  ``q\\x06\\x16<step>`` for the others. Producers ``LPUSH``; consumers pop from
  the right, most urgent step first.
- A message is a JSON object whose ``properties`` hold a unique
  ``delivery_tag`` and ``delivery_info`` (``exchange``, ``routing_key``).
- A delivered, unacknowledged message is a field of the hash ``unacked``
  (tag -> JSON ``[message, exchange, routing_key]``) plus a member of the
  sorted set ``unacked_index`` scored by the delivery time. Acking removes
  both; the sweeper restores entries older than the visibility timeout.

``tests/worker/test_kombu_layout.py`` pins this against the installed kombu.
"""

from __future__ import annotations

from typing import NamedTuple

from producers import constants

UNACKED_KEY = "unacked"
"""kombu's hash of delivered, unacknowledged messages (``Channel.unacked_key``)."""

UNACKED_INDEX_KEY = "unacked_index"
"""kombu's sorted set of unacked delivery tags by delivery time (``Channel.unacked_index_key``)."""

PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's separator between a queue name and its priority step (``Channel.sep``)."""

DEAD_LETTER_KEY = constants.DEAD_LETTER_KEY
"""Poison messages end here (a JSON record each) instead of being dropped or blocking a sweep."""


def priority_queue_keys(queues: list[str], priority_steps: tuple[int, ...]) -> list[str]:
    """The Redis lists of ``queues`` as kombu names them: every queue's most urgent step first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}"
            for step in sorted(priority_steps) for queue in queues]


def lease_key(worker: str) -> str:
    """The key that exists while ``worker``'s lease lives (see :mod:`worker.lease`)."""
    return f"{constants.LEASE_KEY_PREFIX}{worker}"


def claims_key(worker: str) -> str:
    """The hash of the delivery tags ``worker`` holds (see :mod:`worker.lease`)."""
    return f"{constants.CLAIMS_KEY_PREFIX}{worker}"


CLAIM_SCRIPT = """
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] dead-letter list, KEYS[4] this worker's claims hash,
-- KEYS[5] lease holders set, KEYS[6] this worker's lease key, KEYS[7] the set of tags put back from dead workers,
-- KEYS[8..] queue lists: one group of ARGV[4] lists per priority step, urgent first
-- ARGV[1] most messages to take, ARGV[2] now (unix seconds), ARGV[3] worker name, ARGV[4] lists per step,
-- ARGV[5] which list of a step goes first (round robin), ARGV[6] the cancel flags' key prefix,
-- ARGV[7..] quantum of each list of a step
-- A worker whose lease lapsed takes nothing until it renews it: the fleet may be putting its jobs back.
if redis.call('EXISTS', KEYS[6]) == 0 then return {} end
local limit = tonumber(ARGV[1])
local per_step = tonumber(ARGV[4])
local first = tonumber(ARGV[5])
local taken = {}
local count = 0
local function take(key, raw)
  local ok, message = pcall(cjson.decode, raw)
  local properties = ok and type(message) == 'table' and message.properties
  local tag = type(properties) == 'table' and properties.delivery_tag
  if type(tag) ~= 'string' then
    redis.call('LPUSH', KEYS[3], cjson.encode({reason = 'not a kombu message (no delivery tag)', tag = false,
                                                 job_id = false, at = tonumber(ARGV[2]), message = raw}))
    taken[#taken + 1] = ''  -- reported to the worker (log line, metric) with an empty tag
    taken[#taken + 1] = raw
    taken[#taken + 1] = 0
    taken[#taken + 1] = 0
    return
  end
  local info = type(properties.delivery_info) == 'table' and properties.delivery_info or {}
  local exchange = type(info.exchange) == 'string' and info.exchange or ''
  local routing_key = type(info.routing_key) == 'string' and info.routing_key or ''
  -- The raw text is kept verbatim: re-encoding through cjson would change floats and empty arrays.
  redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
  redis.call('ZADD', KEYS[2], ARGV[2], tag)
  count = count + 1
  -- claimed at, order within the claim, length of the raw message, the list it came from
  redis.call('HSET', KEYS[4], tag, ARGV[2] .. ' ' .. count .. ' ' .. #raw .. ' ' .. key)
  taken[#taken + 1] = tag
  taken[#taken + 1] = raw
  taken[#taken + 1] = redis.call('SREM', KEYS[7], tag)  -- 1: put back from a dead worker, which may have stored it
  -- The cancel flag (a key outside KEYS: pipefleet runs on one Redis or a Sentinel group, never a cluster)
  local headers = message.headers
  local id = type(headers) == 'table' and headers.id
  taken[#taken + 1] = type(id) == 'string' and redis.call('EXISTS', ARGV[6] .. id) or 0
end
local steps = (#KEYS - 7) / per_step
for step = 0, steps - 1 do
  while count < limit do
    local found = false
    for j = 0, per_step - 1 do
      if count >= limit then break end
      local q = (first + j) % per_step
      local quantum = math.min(tonumber(ARGV[7 + q]), limit - count)
      local key = KEYS[8 + step * per_step + q]
      local raws = redis.call('RPOP', key, quantum)
      if raws then
        found = true
        for _, raw in ipairs(raws) do take(key, raw) end
      end
    end
    if not found then break end
  end
end
if count > 0 then redis.call('SADD', KEYS[5], ARGV[3]) end
local lengths = {}
for i = 8, #KEYS do lengths[#lengths + 1] = redis.call('LLEN', KEYS[i]) end
return {taken, lengths}
"""
"""Atomically pop up to ARGV[1] messages, record each as unacked (as kombu's ``QoS.append`` does) and as held
by this worker; returns ``{messages, lengths}`` (read it with :func:`parse_claim_reply`): ``messages`` is
``[tag, raw, redelivered, cancelled, ...]``, where an empty tag marks a message that had none and went straight
to the dead-letter list, ``redelivered`` is 1 for a message the reap put back from a dead worker
(:mod:`worker.lease`) and ``cancelled`` is 1 when the job's cancel flag is set; ``lengths`` is the length of each
queue list after the claim, so the worker knows without another round trip whether more jobs are ready.

A message is never only in a worker's memory: it is either in a queue list or in
the unacked hash, whatever moment the worker dies at. Within a priority step the
lists (one per deployment) are served round robin, up to each one's quantum per
turn (deficit round robin by batch), starting at ARGV[5].
"""


class ClaimedMessage(NamedTuple):
    """One message of a claim: its delivery tag ("" when it had none and was dead-lettered), raw text, whether
    the reap put it back from a dead worker, and whether its job's cancel flag was set when it was claimed."""

    tag: str
    raw: bytes
    redelivered: bool
    cancelled: bool


class Claim(NamedTuple):
    """A :data:`CLAIM_SCRIPT` reply: the messages taken, and each queue list's length after the claim (None when
    the worker's lease had lapsed and nothing was read)."""

    messages: list[ClaimedMessage]
    lengths: dict[str, int] | None


def claim_keys(queue_keys: list[str], worker: str) -> list[str]:
    """KEYS of :data:`CLAIM_SCRIPT` for these queue lists (as :func:`priority_queue_keys` orders them)."""
    return [UNACKED_KEY, UNACKED_INDEX_KEY, DEAD_LETTER_KEY, claims_key(worker), constants.LEASE_HOLDERS_KEY,
            lease_key(worker), constants.REDELIVERED_KEY, *queue_keys]


def parse_claim_reply(reply: list, queue_keys: list[str]) -> Claim:
    """Read a :data:`CLAIM_SCRIPT` reply for the ``queue_keys`` it was called with."""
    if not reply:
        return Claim([], None)
    entries, lengths = reply
    messages = [ClaimedMessage(tag.decode(errors="replace") if isinstance(tag, bytes) else str(tag), raw,
                               bool(again), bool(cancelled))
                for tag, raw, again, cancelled in zip(entries[0::4], entries[1::4], entries[2::4], entries[3::4])]
    return Claim(messages, dict(zip(queue_keys, lengths)))


def claim_args(limit: int, now: float, worker: str, quanta: list[int], first: int) -> list:
    """ARGV of :data:`CLAIM_SCRIPT`: ``quanta`` has one entry per queue of a priority step."""
    return [limit, repr(now), worker, len(quanta), first % len(quanta), constants.CANCEL_KEY_PREFIX, *quanta]


ACK_SCRIPT = """
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] this worker's claims hash; ARGV delivery tags
local acked = 0
for _, tag in ipairs(ARGV) do
  if redis.call('HDEL', KEYS[3], tag) == 1 then
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
    acked = acked + 1
  end
end
return acked
"""
"""Ack the tags this worker still holds; a tag its lease lost (another worker may hold it now) is left alone."""


def ack_keys(worker: str) -> list[str]:
    """KEYS of :data:`ACK_SCRIPT`."""
    return [UNACKED_KEY, UNACKED_INDEX_KEY, claims_key(worker)]


DEAD_LETTER_SCRIPT = """
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] dead-letter list, KEYS[4] claims hash (or any key)
-- ARGV[1] delivery tag, ARGV[2] the dead-letter record (JSON)
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[2])
return 1
"""
"""Move one unacked message to the dead-letter list in one atomic step (0 if it was no longer unacked)."""


def dead_letter_keys(worker: str) -> list[str]:
    """KEYS of :data:`DEAD_LETTER_SCRIPT`."""
    return [UNACKED_KEY, UNACKED_INDEX_KEY, DEAD_LETTER_KEY, claims_key(worker)]
