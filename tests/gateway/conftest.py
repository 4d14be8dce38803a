"""One worker serving the gateway tests' deployments, and one gateway in front of it, per module."""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from tests.conftest import Fleet
from tests.gateway.server import GatewayProcess, start_gateway
from tests.gateway.webhook_receiver import Receiver, start_receiver
from tests.tasks.private_models import private_models

API_KEY = "test-key-0123456789abcdef"
"""The gateway's one API key in these tests."""

MAX_INPUTS = 40
"""``[gateway].max_inputs_per_request`` of the test gateway."""

MAX_BODY_BYTES = 100_000
"""``[gateway].max_body_bytes`` of the test gateway."""

CORS_ORIGIN = "https://app.example"
"""The one origin the test gateway allows by CORS."""

SLOW_S = 3.0
"""How long a gw-slow batch holding ``SLOW`` sleeps (it holds the worker's one inference thread)."""

#: deployment -> (task, tiny model kind, pipeline class or None).
DEPLOYMENTS = {
    "gw-emb": ("feature-extraction", "feature-extraction", None),
    "gw-gen": ("text-generation", "text-generation", None),
    "gw-slow": ("text-classification", "text-classification", "tests.fault_pipelines.SlowTextClassification"),
    "gw-faulty": ("text-classification", "text-classification", "tests.fault_pipelines.FaultyTextClassification"),
    "gw-llama": ("text-generation", "text-generation-llama", None),
    "gw-llama-cb": ("text-generation", "text-generation-llama", None),
    "gw-vlm": ("image-text-to-text", "image-text-to-text", None),
}

#: deployment -> its continuous batching options (the same tiny Llama as gw-llama, through the engine).
CONTINUOUS = {"gw-llama-cb": {"num_blocks": 32, "page_size": 64}}


@pytest.fixture(scope="module")
def models(module_fleet, model_dir, tmp_path_factory):
    """deployment -> model path, once the worker serving them all is up."""
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-gateway"),
                           {name: kind for name, (_, kind, _) in DEPLOYMENTS.items()})
    deployments = []
    for name, (task, _, pipeline_class) in DEPLOYMENTS.items():
        deployment = {"name": name, "task": task, "model": paths[name], "max_batch_size": 8}
        if pipeline_class:
            deployment["pipeline_kwargs"] = {"pipeline_class": pipeline_class}
        if name in CONTINUOUS:
            deployment.update(continuous_batching=True, continuous_batching_options=CONTINUOUS[name])
        deployments.append(deployment)
    config = module_fleet.config(deployments, gateway={
        "api_keys": [API_KEY], "max_inputs_per_request": MAX_INPUTS, "max_body_bytes": MAX_BODY_BYTES,
        "max_wait_s": 60.0, "cors_origins": [CORS_ORIGIN]})
    module_fleet.worker(config, deployments=list(DEPLOYMENTS), env={"PIPEFLEET_TEST_SLOW_S": str(SLOW_S)})
    module_fleet.gateway_config = config
    return paths


@pytest.fixture(scope="module")
def gateway(models, module_fleet, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A real ``pipefleet gateway`` in front of the module's fleet."""
    process = start_gateway(module_fleet.gateway_config, tmp_path_factory.mktemp("gateway-logs"))
    yield process
    process.stop()


SECRET = "whsec_" + base64.b64encode(b"pipefleet batches test secret 32").decode()
"""The batch fleet's ``[webhooks] secret``."""

BATCHES = {"max_lines": 300, "max_in_flight": 8, "poll_interval_s": 0.2, "lease_s": 2.0}
"""``[batches]`` of the batch fleet's gateways: a small window, so a batch is mid-way for a while."""

BATCH_DEPLOYMENTS = {"bt-emb": "feature-extraction", "bt-gen": "text-generation"}
"""The batch fleet's deployments: name -> task (and tiny model kind)."""


@pytest.fixture(scope="package")
def receiver() -> Iterator[Receiver]:
    """A local webhook receiver for the batch and webhook tests."""
    instance = start_receiver()
    yield instance
    instance.close()


@pytest.fixture(scope="package")
def batch_setup(redis_server, model_dir, tmp_path_factory, receiver) -> Iterator[SimpleNamespace]:
    """One worker shared by test_batches and test_webhooks, with ``[webhooks]`` on; ``.config(**batches)``
    writes a gateway config on its fleet (``.base`` is the default one)."""
    fleet = Fleet(redis_server, tmp_path_factory.mktemp("batch-fleet"), db_pair=(4, 5))
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-batches"), BATCH_DEPLOYMENTS)
    deployments = [{"name": name, "task": task, "model": paths[name], "max_batch_size": 8}
                   for name, task in BATCH_DEPLOYMENTS.items()]
    webhooks = {"secret": SECRET, "endpoints": [f"{receiver.url}/batches"],
                "allowed_hosts": ["127.0.0.1", "localhost"], "allow_private_hosts": ["127.0.0.1"],
                "initial_backoff_s": 0.3, "max_backoff_s": 1.0, "poll_interval_s": 0.2, "timeout_s": 5.0}

    def config(**batches: Any) -> Path:
        return fleet.config(deployments, visibility_timeout_s=4, webhooks=webhooks,
                            gateway={"api_keys": [API_KEY], "max_wait_s": 60.0}, batches={**BATCHES, **batches})

    base = config()
    worker = fleet.worker(base, deployments=list(BATCH_DEPLOYMENTS))
    yield SimpleNamespace(config=config, base=base, worker=worker, fleet=fleet,
                          logs=tmp_path_factory.mktemp("batch-gateways"))
    fleet.stop()


@pytest.fixture(scope="package")
def batch_gateway(batch_setup) -> Iterator[GatewayProcess]:
    """The batch fleet's always-on gateway."""
    process = start_gateway(batch_setup.base, batch_setup.logs)
    yield process
    process.stop()
