"""Serve the worker's metrics in Prometheus text format on ``/metrics``."""

from __future__ import annotations

import logging
from typing import Any, Iterator

logger = logging.getLogger(__name__)


class RuntimeCollector:
    """A ``prometheus_client`` collector reading the runtime's per-deployment metrics."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        """Yield one family per metric, labelled by deployment (and device)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        worker = self.runtime.worker_name
        histograms = {
            "batch_size": HistogramMetricFamily("pipefleet_batch_size", "Items per forward pass",
                                                labels=["deployment", "worker"]),
            "queue_wait_s": HistogramMetricFamily("pipefleet_queue_wait_seconds",
                                                  "Wait from hand-over to batch start, per item",
                                                  labels=["deployment", "worker"]),
            "forward_s": HistogramMetricFamily("pipefleet_forward_seconds", "Duration of one forward pass",
                                               labels=["deployment", "worker"]),
        }
        items = CounterMetricFamily("pipefleet_items", "Items run through the pipeline",
                                    labels=["deployment", "worker"])
        items_per_s = GaugeMetricFamily("pipefleet_items_per_second", "Items per second over the last 10 s",
                                        labels=["deployment", "worker"])
        jobs = CounterMetricFamily("pipefleet_jobs", "Jobs by final state", labels=["deployment", "worker", "state"])
        ooms = CounterMetricFamily("pipefleet_oom_splits", "Batches halved after out-of-memory",
                                   labels=["deployment", "worker"])
        load = GaugeMetricFamily("pipefleet_model_load_seconds", "Time to load and warm the model",
                                 labels=["deployment", "worker"])
        pending = GaugeMetricFamily("pipefleet_pending_items", "Items waiting in the batcher",
                                    labels=["deployment", "worker"])
        for name, served in list(self.runtime.deployments.items()):
            snapshot = served.metrics.snapshot()
            labels = [name, worker]
            for key, family in histograms.items():
                data = snapshot[key]
                family.add_metric(labels, list(data["buckets"].items()), data["sum"])
            items.add_metric(labels, snapshot["items_total"])
            items_per_s.add_metric(labels, snapshot["items_per_s"])
            for state, count in snapshot["jobs_by_state"].items():
                jobs.add_metric([*labels, state], count)
            ooms.add_metric(labels, snapshot["oom_splits"])
            load.add_metric(labels, snapshot["model_load_s"])
            pending.add_metric(labels, served.batcher.pending_count())
        yield from histograms.values()
        yield from (items, items_per_s, jobs, ooms, load, pending)
        yield from self._device_memory(worker)

    def _device_memory(self, worker: str) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        used = GaugeMetricFamily("pipefleet_device_memory_bytes", "CUDA memory allocated by this worker",
                                 labels=["device", "worker"])
        for index in range(torch.cuda.device_count()):
            used.add_metric([f"cuda:{index}", worker], torch.cuda.memory_allocated(index))
        yield used


def serve_metrics(runtime: Any, port: int, address: str = "0.0.0.0") -> None:
    """Start the ``/metrics`` HTTP server in a daemon thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(RuntimeCollector(runtime))
    start_http_server(port, addr=address, registry=registry)
    logger.info("Prometheus metrics on http://%s:%d/metrics", address, port)
