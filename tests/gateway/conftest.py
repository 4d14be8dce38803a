"""One worker serving the gateway tests' deployments, and one gateway in front of it, per module."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.gateway.server import GatewayProcess, start_gateway
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
