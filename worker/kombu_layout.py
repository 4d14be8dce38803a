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

UNACKED_KEY = "unacked"
"""kombu's hash of delivered, unacknowledged messages (``Channel.unacked_key``)."""

UNACKED_INDEX_KEY = "unacked_index"
"""kombu's sorted set of unacked delivery tags by delivery time (``Channel.unacked_index_key``)."""

PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's separator between a queue name and its priority step (``Channel.sep``)."""

DEAD_LETTER_KEY = "pipefleet:dead-letter"
"""Messages that are not kombu JSON (no delivery tag) end here instead of being dropped."""


def priority_queue_keys(queues: list[str], priority_steps: tuple[int, ...]) -> list[str]:
    """The Redis lists of ``queues`` as kombu names them: every queue's most urgent step first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}"
            for step in sorted(priority_steps) for queue in queues]


CLAIM_SCRIPT = """
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] dead-letter list, KEYS[4..] queue lists (urgent first)
-- ARGV[1] most messages to take, ARGV[2] now (unix seconds)
local limit = tonumber(ARGV[1])
local taken = {}
for k = 4, #KEYS do
  if #taken >= limit then break end
  local raws = redis.call('RPOP', KEYS[k], limit - #taken)
  if raws then
    for _, raw in ipairs(raws) do
      local ok, message = pcall(cjson.decode, raw)
      local properties = ok and type(message) == 'table' and message.properties
      local tag = type(properties) == 'table' and properties.delivery_tag
      if type(tag) == 'string' then
        local info = type(properties.delivery_info) == 'table' and properties.delivery_info or {}
        local exchange = type(info.exchange) == 'string' and info.exchange or ''
        local routing_key = type(info.routing_key) == 'string' and info.routing_key or ''
        -- The raw text is kept verbatim: re-encoding through cjson would change floats and empty arrays.
        redis.call('HSET', KEYS[1], tag,
                   '[' .. raw .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[2], tag)
        taken[#taken + 1] = raw
      else
        redis.call('LPUSH', KEYS[3], raw)
      end
    end
  end
end
return taken
"""
"""Atomically pop up to ARGV[1] messages and record each as unacked, as kombu's ``QoS.append`` does.

A message is never only in a worker's memory: it is either in a queue list or in
the unacked hash, whatever moment the worker dies at.
"""


def claim_keys(queue_keys: list[str]) -> list[str]:
    """KEYS of :data:`CLAIM_SCRIPT` for these queue lists."""
    return [UNACKED_KEY, UNACKED_INDEX_KEY, DEAD_LETTER_KEY, *queue_keys]


def ack_commands(pipe, tags: list[str]) -> None:
    """Queue on ``pipe`` the removal of ``tags`` from the unacked bookkeeping (kombu's ``QoS.ack``)."""
    pipe.hdel(UNACKED_KEY, *tags)
    pipe.zrem(UNACKED_INDEX_KEY, *tags)
