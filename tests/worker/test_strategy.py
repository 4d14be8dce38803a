"""The seam with Celery: ``infer``'s own Celery strategy offers plain jobs to the hot path (worker/strategy.py).

Celery's default strategy logs ``Task <name>[<id>] received`` for each request it builds, under its logger
``celery.worker.strategy`` (at INFO, the level fleet workers log at); the hot path logs the same line under
``worker.hotpath``. So on a real worker a plain job's line comes from the hot path, and a chunk of a list job
(part of a chord: the hot path refuses it) from Celery's default strategy.
"""

from __future__ import annotations

import re

from tests.conftest import Fleet


def test_infer_names_the_pipefleet_strategy():
    from tasks.infer import infer

    assert infer.Strategy == "worker.strategy:infer_strategy"


def test_plain_jobs_take_the_hot_path_and_chunks_take_celerys_default_strategy(fleet: Fleet, model_dir):
    config = fleet.config([{"name": "st-tc", "task": "text-classification",
                            "model": str(model_dir("text-classification"))}])
    worker = fleet.worker(config, deployments=["st-tc"])
    with fleet.client() as client:
        plain = [client.submit(deployment="st-tc", inputs=f"text {i}") for i in range(5)]
        for job in plain:
            assert job.result(timeout=60)
        listed = client.submit(deployment="st-tc", inputs=[f"item {i}" for i in range(6)], chunk_size=2)
        assert len(listed.result(timeout=60)) == 6
    received = re.compile(r" INFO (\S+): Task \S+\[([^\]]+)\] received")
    by_logger: dict[str, set[str]] = {}
    for logger, job_id in received.findall(worker.log()):
        by_logger.setdefault(logger, set()).add(job_id)
    assert by_logger.get("worker.hotpath") == {job.id for job in plain}, by_logger
    assert {f"{listed.id}:chunk:{i}" for i in range(3)} <= by_logger.get("celery.worker.strategy", set()), by_logger
