"""Shared fixtures: a real redis-server, tiny offline models, real worker processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from producers.constants import REGISTRY_KEY
from tests import tiny_models
from tests.fleet import RedisServer, WorkerProcess, start_worker, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``model_dir(kind)``: the path of a tiny offline model, built once per session."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = tiny_models.build(kind, root / kind.replace("/", "_"))
        return built[kind]

    return get


class Fleet:
    """Writes fleet configs and starts workers against one Redis; stops them all at teardown."""

    def __init__(self, server: RedisServer, directory: Path, db_pair: tuple[int, int] = (0, 1)) -> None:
        self.server = server
        self.directory = directory
        self.broker_url = f"{server.url}/{db_pair[0]}"
        self.result_backend = f"{server.url}/{db_pair[1]}"
        self.workers: list[WorkerProcess] = []
        self.deployment_names: set[str] = set()
        self._configs = 0

    def config(self, deployments: list[dict[str, Any]], **settings: Any) -> Path:
        """Write a config with these deployments and settings; returns its path.

        Task events are on unless a test says otherwise: every fleet test runs the way it does while Flower watches.
        """
        self._configs += 1
        settings.setdefault("task_events", True)
        self.deployment_names.update(d["name"] for d in deployments)
        return write_config(self.directory / f"fleet{self._configs}.toml", broker_url=self.broker_url,
                            result_backend=self.result_backend, deployments=deployments, **settings)

    def worker(self, config_path: Path, **kwargs: Any) -> WorkerProcess:
        """Start a worker on ``config_path`` and wait until it is consuming."""
        kwargs.setdefault("redis_client", self.server.client(int(self.broker_url.rsplit("/", 1)[1])))
        worker = start_worker(config_path, self.directory, **kwargs)
        self.workers.append(worker)
        return worker

    def client(self, **kwargs: Any):
        """A :class:`producers.FleetClient` for this fleet."""
        from producers import FleetClient

        return FleetClient(self.broker_url, self.result_backend, discovery_ttl_s=0.5, **kwargs)

    def stop(self) -> None:
        """Kill the workers, withdraw their advertisements and registrations, so later tests never see them."""
        redis_client = self.server.client(int(self.broker_url.rsplit("/", 1)[1]))
        for worker in self.workers:
            worker.kill()
            stale = redis_client.keys(f"pipefleet:ad:*:{worker.name}")
            if stale:
                redis_client.delete(*stale)
        if self.deployment_names:
            redis_client.hdel(REGISTRY_KEY, *self.deployment_names)


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet whose workers live for one test."""
    instance = Fleet(redis_server, tmp_path)
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def module_fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A fleet whose workers live for one test module."""
    instance = Fleet(redis_server, tmp_path_factory.mktemp("fleet"))
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def client(module_fleet: Fleet):
    """A :class:`producers.FleetClient` on the module's fleet."""
    with module_fleet.client() as fleet_client:
        yield fleet_client


#: The deployments docs/sampling.md runs against: one tiny Llama, static and through continuous batching.
SAMPLING_DEPLOYMENTS = {"chat": True, "chat-static": False}


@pytest.fixture(scope="module")
def sampling_fleet(module_fleet: Fleet, model_dir, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[dict[str, Any]]:
    """A worker serving ``chat`` (continuous batching) and ``chat-static`` on the module's fleet (a docs fixture).

    Sets ``PIPEFLEET_BROKER_URL`` / ``PIPEFLEET_RESULT_BACKEND`` so ``FleetClient.from_env()`` finds it;
    returns the names the page's blocks may use (none beyond what they define).
    """
    from tests.tasks.private_models import private_models

    path = private_models(model_dir, tmp_path_factory.mktemp("models-sampling"),
                          {"llama": "text-generation-llama"})["llama"]
    deployments = [{"name": name, "task": "text-generation", "model": path, "continuous_batching": continuous,
                    **({"continuous_batching_options": {"num_blocks": 32, "page_size": 64}} if continuous else {})}
                   for name, continuous in SAMPLING_DEPLOYMENTS.items()]
    module_fleet.worker(module_fleet.config(deployments), deployments=list(SAMPLING_DEPLOYMENTS))
    # Only what this fixture changes is undone at the module's end: the docs test's own per-test environment
    # (the same fleet) may be in place now and gone by then, and must not be written back.
    wanted = {"PIPEFLEET_BROKER_URL": module_fleet.broker_url, "PIPEFLEET_RESULT_BACKEND": module_fleet.result_backend}
    changed = {name: os.environ.get(name) for name, value in wanted.items() if os.environ.get(name) != value}
    os.environ.update({name: wanted[name] for name in changed})
    yield {}
    for name, value in changed.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
