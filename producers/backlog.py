"""The backlog of each deployment: jobs queued in every priority list, plus jobs claimed by a worker (running or not).

This is the figure an autoscaler needs (KEDA reads ``pipefleet_backlog`` from
``/metrics``, or ``pipefleet backlog NAME``). ``LLEN`` of the queue alone is
wrong twice: kombu keeps each priority step in its own list (``q``,
``q\\x06\\x163``, …), and a claimed job has left every list while it waits in a
batcher or runs.

Claimed jobs are counted by :func:`claimed_counts`, the one place that knows
where claims are recorded (today: kombu's ``unacked`` hash, whose values end in
the message's routing key, the deployment's queue). A job counts once from
publish to ack whatever worker holds it, a paused or dead one included, until
its claim is given back to the queue.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from producers.constants import queue_name
from producers.fleet import queue_depths

CLAIMS_KEY = "unacked"
"""Where claimed jobs are recorded: kombu's hash of delivered, unacked messages (pinned by a test)."""

CLAIMED_COUNT_SCRIPT = """
-- KEYS[1] claims hash (tag -> '[message, exchange, routing_key]'); ARGV queue names; returns counts in ARGV order
local wanted = {}
for i, queue in ipairs(ARGV) do wanted[queue] = i end
local counts = {}
for i = 1, #ARGV do counts[i] = 0 end
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
  cursor = page[1]
  local entries = page[2]
  for j = 2, #entries, 2 do
    local routing_key = string.match(entries[j], ',%s*"([^"]*)"%]$')
    local index = routing_key and wanted[routing_key]
    if index then counts[index] = counts[index] + 1 end
  end
until cursor == '0'
return counts
"""
"""Count claims per queue on the server: no message crosses the network, only the counts."""


class Backlog(BaseModel):
    """One deployment's backlog: ``total = queued + claimed``."""

    deployment: str
    queued: int
    """In the deployment's queue lists, every priority step."""
    claimed: int
    """Taken by a worker and not yet acknowledged: waiting in its batcher, or running."""

    @property
    def total(self) -> int:
        """Jobs the deployment still owes: what to scale on."""
        return self.queued + self.claimed


def claimed_counts(redis: Any, queues: list[str]) -> dict[str, int]:
    """Jobs claimed from each queue and not yet acknowledged (the one function that counts claims)."""
    if not queues:
        return {}
    counts = redis.eval(CLAIMED_COUNT_SCRIPT, 1, CLAIMS_KEY, *queues)
    return {queue: int(count) for queue, count in zip(queues, counts)}


def backlogs(redis: Any, deployments: list[str]) -> list[Backlog]:
    """The backlog of each deployment, in the order given."""
    queues = [queue_name(name) for name in deployments]
    queued = queue_depths(redis, queues) if queues else {}
    claimed = claimed_counts(redis, queues)
    return [Backlog(deployment=name, queued=queued[queue], claimed=claimed[queue])
            for name, queue in zip(deployments, queues)]


class BacklogCollector:
    """A ``prometheus_client`` collector: ``pipefleet_backlog{deployment=...}`` read from Redis at each scrape.

    ``deployments()`` names the deployments to report. Every worker and gateway
    exports the same fleet-wide figure; aggregate with ``max`` (not ``sum``).
    """

    def __init__(self, redis: Any, deployments: Any) -> None:
        self.redis = redis
        self.deployments = deployments

    def collect(self) -> Any:
        """Yield the backlog gauges; nothing while Redis is unreachable (the scrape shows the gap)."""
        from prometheus_client.core import GaugeMetricFamily

        try:
            found = backlogs(self.redis, list(self.deployments()))
        except Exception:  # a scrape must not fail the whole /metrics page over a Redis outage
            return
        total = GaugeMetricFamily("pipefleet_backlog", "Jobs queued (every priority) plus claimed and unacked",
                                  labels=["deployment"])
        parts = GaugeMetricFamily("pipefleet_backlog_jobs", "The backlog by part: queued or claimed",
                                  labels=["deployment", "part"])
        for backlog in found:
            total.add_metric([backlog.deployment], backlog.total)
            parts.add_metric([backlog.deployment, "queued"], backlog.queued)
            parts.add_metric([backlog.deployment, "claimed"], backlog.claimed)
        yield total
        yield parts
