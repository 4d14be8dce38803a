"""Prometheus metrics of one gateway process: requests by route and code, latency, open streams.

Each app has its own registry (several apps in one process, as in tests, do
not collide). With ``--workers N`` every worker process serves its own
``/metrics``; scrape each, or run one process per container.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Histogram buckets of request latency, from a cached status read to a long generation."""


class GatewayMetrics:
    """The gateway's counters, histogram and gauge, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pipefleet_gateway_requests", "HTTP requests by route and status code",
                                ["method", "route", "code"], registry=self.registry)
        self.latency = Histogram("pipefleet_gateway_request_duration_seconds",
                                 "Time from request to the end of the response (streams: to their end)",
                                 ["method", "route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.open_streams = Gauge("pipefleet_gateway_open_streams", "Server-sent event streams now open",
                                  ["route"], registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


def _route_label(scope: dict[str, Any]) -> str:
    # The route template, never the raw path: job ids would make one series per job.
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: counts each HTTP request and times it until its response ends."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
