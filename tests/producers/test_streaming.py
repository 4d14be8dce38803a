"""``client.map`` and ``pipe(generator)``: ordered, equal to in-process, bounded in flight (counted in Redis)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from producers import pipeline as fleet_pipeline
from producers.constants import queue_name
from tests.oracle import assert_same, local_pipeline
from tests.tiny_models.text import numbered_texts as texts

DEPLOYMENT = "stream-tc"



@pytest.fixture(scope="module", autouse=True)
def model(module_fleet, model_dir):
    path = str(model_dir("text-classification"))
    config = module_fleet.config([{"name": DEPLOYMENT, "task": "text-classification", "model": path,
                                   "max_batch_size": 8}])
    module_fleet.worker(config, deployments=[DEPLOYMENT], args=["--concurrency", "8"])
    return path


def test_map_over_a_generator_equals_in_process(client, model):
    inputs = texts(300)
    fleet = list(client.map((t for t in inputs), deployment=DEPLOYMENT, chunk_size=16, max_in_flight=3))
    assert_same(fleet, local_pipeline("text-classification", model)(inputs))


class InFlightCounter:
    """Samples Redis: ids of map chunks queued, reserved (unacked) or holding an unread result."""

    def __init__(self, fleet, broker, results) -> None:
        self.broker, self.results = broker, results
        self.queues = [queue_name(DEPLOYMENT)] + [f"{queue_name(DEPLOYMENT)}\x06\x16{p}" for p in (3, 6, 9)]
        self.known_results = set(results.keys("celery-task-meta-*"))
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _map_chunk_id(message: bytes) -> str | None:
        headers = json.loads(message)["headers"]
        return headers["id"] if str(headers.get("shadow", "")).startswith("map:") else None

    def sample(self) -> int:
        ids = set()
        for queue in self.queues:
            ids.update(self._map_chunk_id(m) for m in self.broker.lrange(queue, 0, -1))
        for raw in self.broker.hvals("unacked"):
            ids.add(self._map_chunk_id(json.dumps(json.loads(raw)[0]).encode()))
        ids.discard(None)
        for key in set(self.results.keys("celery-task-meta-*")) - self.known_results:
            ids.add(key.decode().removeprefix("celery-task-meta-"))
        return len(ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self.samples += 1
            time.sleep(0.002)

    def __enter__(self) -> "InFlightCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_map_never_has_more_than_max_in_flight_chunks_in_redis(module_fleet, client, model):
    broker = module_fleet.server.client(0)
    results = module_fleet.server.client(1)
    pulled = 0
    max_ahead = 0
    yielded = 0

    def generate():
        nonlocal pulled
        for text in texts(400):
            pulled += 1
            yield text

    outputs = []
    with InFlightCounter(module_fleet, broker, results) as counter:
        for out in client.map(generate(), deployment=DEPLOYMENT, chunk_size=10, max_in_flight=3):
            outputs.append(out)
            yielded += 1
            max_ahead = max(max_ahead, pulled - yielded)
            time.sleep(0.002)  # a slow consumer: the fleet must wait for it, not run ahead
    assert len(outputs) == 400
    assert counter.samples > 50
    assert 1 <= counter.peak <= 3, f"{counter.peak} chunks in Redis at once"
    assert max_ahead <= 3 * 10, f"map read {max_ahead} inputs ahead of the consumer"
    assert counter.sample() == 0, "map left chunk results behind in Redis"


def test_map_accepts_a_dataset_column_and_shows_progress(client, model, capsys):
    datasets = pytest.importorskip("datasets")
    inputs = texts(50)
    ds = datasets.Dataset.from_dict({"text": inputs, "id": list(range(50))})
    local = local_pipeline("text-classification", model)(inputs)
    fleet = list(client.map(ds, deployment=DEPLOYMENT, column="text", chunk_size=8, progress=True))
    assert_same(fleet, local)
    err = capsys.readouterr().err
    assert "50/50" in err and "items" in err

    from transformers.pipelines.pt_utils import KeyDataset

    assert_same(list(client.map(KeyDataset(ds, "text"), deployment=DEPLOYMENT, chunk_size=8)), local)


def test_pipeline_streams_generators_like_in_process(client, model):
    inputs = texts(40)
    pipe = fleet_pipeline("text-classification", model=model, client=client, deployment=DEPLOYMENT)

    def data():
        yield from inputs

    fleet = [out for out in pipe(data(), batch_size=8)]
    local = [out for out in local_pipeline("text-classification", model)(data(), batch_size=8)]
    assert_same(fleet, local)
