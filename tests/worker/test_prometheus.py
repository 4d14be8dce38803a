"""The worker's Prometheus ``/metrics``, scraped after real jobs."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet import free_port


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples, name: str, **labels) -> float:
    matches = [v for (n, l), v in samples.items() if n == name and set(labels.items()) <= set(l)]
    assert matches, f"no sample {name} {labels}"
    return sum(matches)


@pytest.fixture(scope="module")
def served(module_fleet, model_dir):
    model = str(model_dir("text-classification"))
    config = module_fleet.config([{"name": "pm-tc", "task": "text-classification", "model": model,
                                   "max_batch_size": 4}])
    port = free_port()
    worker = module_fleet.worker(config, deployments=["pm-tc"], args=["--metrics-port", str(port)])
    return {"port": port, "worker": worker}


def test_scrape_after_jobs_counts_every_job_and_item(module_fleet, served):
    sizes = [1, 3, 2, 5, 1, 4, 2, 1]
    with module_fleet.client() as client:
        jobs = [client.submit(deployment="pm-tc", inputs=[f"text {j} {i}" for i in range(n)])
                for j, n in enumerate(sizes)]
        for job in jobs:
            job.result(timeout=60)
        failed = client.submit(deployment="pm-tc", inputs="x", params={"function_to_apply": "cube"})
        with pytest.raises(Exception):
            failed.result(timeout=60)
    samples = _scrape(served["port"])
    labels = {"deployment": "pm-tc", "worker": served["worker"].name}
    items = sum(sizes)  # the failing job is refused before its item reaches the batcher
    assert _value(samples, "pipefleet_jobs_total", state="SUCCESS", **labels) == len(sizes)
    assert _value(samples, "pipefleet_jobs_total", state="FAILURE", **labels) == 1
    assert _value(samples, "pipefleet_items_total", **labels) == items
    assert _value(samples, "pipefleet_batch_size_sum", **labels) == items
    assert _value(samples, "pipefleet_queue_wait_seconds_count", **labels) == items
    batches = _value(samples, "pipefleet_batch_size_count", **labels)
    assert items / 4 <= batches <= items
    assert _value(samples, "pipefleet_batch_size_bucket", le="+Inf", **labels) == batches
    assert _value(samples, "pipefleet_batch_size_bucket", le="4", **labels) == batches  # max_batch_size
    assert _value(samples, "pipefleet_forward_seconds_count", **labels) == batches
    assert _value(samples, "pipefleet_forward_seconds_sum", **labels) > 0
    assert _value(samples, "pipefleet_model_load_seconds", **labels) > 0
    assert _value(samples, "pipefleet_oom_splits_total", **labels) == 0
    assert _value(samples, "pipefleet_pending_items", **labels) == 0
    assert _value(samples, "pipefleet_items_per_second", **labels) >= 0
    worker = {"worker": served["worker"].name}
    assert _value(samples, "pipefleet_recovered_jobs_total", **worker) >= 0
    assert _value(samples, "pipefleet_orphaned_claims_total", **worker) == 0
    assert _value(samples, "pipefleet_dead_lettered_messages_total", **worker) == 0
    assert _value(samples, "pipefleet_oldest_claim_age_seconds", **worker) >= 0
    for thread in ("claim", "commit", "acker", "lease", "deadlines", "watch-0", "device-cpu"):
        assert _value(samples, "pipefleet_thread_tick_age_seconds", thread=thread, **worker) >= 0, thread
