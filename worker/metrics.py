"""Per-deployment batching metrics, kept in the worker and readable as a snapshot."""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
"""Upper bounds of the batch-size histogram buckets."""

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the queue-wait and forward-time histogram buckets."""

ITEMS_PER_S_WINDOW_S = 10.0
"""Items per second are measured over this trailing window."""


@dataclass
class Histogram:
    """A cumulative-bucket histogram (Prometheus style) with count and sum."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.total += value

    def snapshot(self) -> dict:
        """Buckets as ``{"le": cumulative count}`` plus count and sum."""
        cumulative, running = {}, 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += n
            cumulative[bound] = running
        return {"buckets": cumulative, "count": self.count, "sum": self.total}


class DeploymentMetrics:
    """Batch sizes, queue wait, forward time, throughput and OOM splits of one deployment."""

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)
        self.queue_wait_s = Histogram(SECONDS_BUCKETS)
        self.forward_s = Histogram(SECONDS_BUCKETS)
        self.items_total = 0
        self.oom_splits = 0
        self.jobs_by_state: dict[str, int] = {}
        self.model_load_s = 0.0
        self._recent: list[tuple[float, int]] = []
        self.tokens_total = 0
        self.running_requests = 0
        self.kv_cache_usage = 0.0
        self._recent_tokens: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def observe_batch(self, size: int, forward_s: float) -> None:
        """Record one forward pass of ``size`` items."""
        now = time.monotonic()
        with self._lock:
            self.batch_size.observe(size)
            self.forward_s.observe(forward_s)
            self.items_total += size
            self._recent.append((now, size))
            cutoff = now - ITEMS_PER_S_WINDOW_S
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.pop(0)

    def observe_tokens(self, count: int) -> None:
        """Record ``count`` generated tokens (continuous batching)."""
        now = time.monotonic()
        with self._lock:
            self.tokens_total += count
            self._recent_tokens.append((now, count))
            cutoff = now - ITEMS_PER_S_WINDOW_S
            while self._recent_tokens and self._recent_tokens[0][0] < cutoff:
                self._recent_tokens.pop(0)

    def set_generation_state(self, *, running_requests: int, kv_cache_usage: float) -> None:
        """The continuous batching engine's prompts in flight and KV-cache share in use (0..1)."""
        self.running_requests = running_requests
        self.kv_cache_usage = kv_cache_usage

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the trailing window."""
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._recent_tokens if t >= now - ITEMS_PER_S_WINDOW_S)
        return recent / ITEMS_PER_S_WINDOW_S

    def observe_queue_wait(self, waits_s: list[float]) -> None:
        """Record how long each item waited between hand-over and its batch."""
        with self._lock:
            for wait in waits_s:
                self.queue_wait_s.observe(wait)

    def observe_job(self, state: str) -> None:
        """Count one job that ended in ``state``."""
        with self._lock:
            self.jobs_by_state[state] = self.jobs_by_state.get(state, 0) + 1

    def items_per_s(self) -> float:
        """Throughput over the trailing window."""
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - ITEMS_PER_S_WINDOW_S]
        return sum(n for _, n in recent) / ITEMS_PER_S_WINDOW_S

    def snapshot(self) -> dict:
        """Everything above as plain JSON data."""
        with self._lock:
            data = {
                "deployment": self.deployment,
                "batch_size": self.batch_size.snapshot(),
                "queue_wait_s": self.queue_wait_s.snapshot(),
                "forward_s": self.forward_s.snapshot(),
                "items_total": self.items_total,
                "oom_splits": self.oom_splits,
                "jobs_by_state": dict(self.jobs_by_state),
                "model_load_s": self.model_load_s,
                "tokens_total": self.tokens_total,
                "running_requests": self.running_requests,
                "kv_cache_usage": self.kv_cache_usage,
            }
        data["items_per_s"] = self.items_per_s()
        data["tokens_per_s"] = self.tokens_per_s()
        return data
