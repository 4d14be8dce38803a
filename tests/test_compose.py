"""``docker-compose.yml`` agrees with ``config/fleet.toml``: every deployment served, GPUs pinned once."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from config import load_config
from tests.fleet import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _flags(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


def _workers(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s["command"][:2] == ["pipefleet", "worker"]}


def _config_of(service: dict):
    mounted = service["environment"]["PIPEFLEET_CONFIG"]
    assert mounted.startswith("/etc/pipefleet/"), "configs are mounted from ./config"
    return load_config(REPO_ROOT / "config" / Path(mounted).name, environ={})


def _gpu_ids(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [str(i) for d in devices if "gpu" in d.get("capabilities", []) for i in d.get("device_ids", [])]


def _served(service: dict) -> list[str]:
    return _flags(service["command"], "--deployment") or [d.name for d in _config_of(service).deployments]


def test_every_deployment_is_served_by_a_default_gpu_worker(compose):
    fleet = load_config(REPO_ROOT / "config" / "fleet.toml", environ={})
    default = [s for s in _workers(compose).values() if not s.get("profiles")]
    assert default and all(_config_of(s).source.endswith("fleet.toml") for s in default)
    served = {name for service in default for name in _served(service)}
    assert served == {d.name for d in fleet.deployments}


def test_gpu_workers_are_pinned_once_and_deployments_fit_what_they_see(compose):
    seen: list[str] = []
    for name, service in _workers(compose).items():
        ids = _gpu_ids(service)
        gpu = _flags(service["command"], "--gpu")
        assert len(gpu) == 1, f"{name} must pass --gpu"
        if not ids:
            assert gpu == ["none"] and service.get("profiles") == ["cpu"], name
            for deployment in _config_of(service).deployments:
                assert deployment.device in (None, -1, "cpu") and deployment.device_map is None, deployment.name
            continue
        seen += ids
        visible = [int(i) for i in gpu[0].split(",")]
        assert all(0 <= i < len(ids) for i in visible), f"{name}: --gpu indexes the container's GPUs"
        config = _config_of(service)
        for deployment_name in _served(service):
            device = config.deployment(deployment_name).device
            assert not isinstance(device, int) or device in (-1, *range(len(visible))), deployment_name
    assert len(seen) == len(set(seen)) >= 1, f"GPU ids pinned twice: {seen}"


def test_cpu_worker_serves_the_same_models_under_a_profile(compose):
    fleet = load_config(REPO_ROOT / "config" / "fleet.toml", environ={})
    cpu = [s for s in _workers(compose).values() if s.get("profiles")]
    assert cpu
    for service in cpu:
        for deployment in _config_of(service).deployments:
            twin = fleet.deployment(deployment.name)
            assert (deployment.task, deployment.model) == (twin.task, twin.model)


def test_redis_keeps_an_append_only_file_and_every_service_has_a_health_check(compose):
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_worker_health_checks_use_worker_check_with_the_same_deployments(compose):
    for name, service in _workers(compose).items():
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "pipefleet", "worker"] and test[-1] == "--check", name
        assert _flags(test, "--deployment") == _flags(service["command"], "--deployment"), name


def test_workers_share_one_model_cache_and_flower_has_auth(compose):
    for name, service in _workers(compose).items():
        assert f"hf-cache:{service['environment']['HF_HOME']}" in service["volumes"], name
        assert service["stop_signal"] == "SIGTERM"
    assert "hf-cache" in compose["volumes"]
    flower = compose["services"]["flower"]
    assert flower["command"][:2] == ["pipefleet", "flower"] and "--insecure" not in flower["command"]
    assert "FLOWER_PASSWORD:?" in flower["environment"]["PIPEFLEET_FLOWER__BASIC_AUTH"]


def test_dockerfile_installs_locked_torch_then_the_locked_worker_extras():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    install = 'pip install -c /app/lock.txt ".[${EXTRAS}]"'
    assert "ARG EXTRAS=worker,gpu,monitor" in dockerfile and install in dockerfile
    assert "COPY .ci/lock.txt /app/lock.txt" in dockerfile and "grep '^torch==' /app/lock.txt" in dockerfile
    assert dockerfile.index("--index-url") < dockerfile.index(install)


def test_the_lock_pins_every_dependency_exactly():
    lines = [line for line in (REPO_ROOT / ".ci" / "lock.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all("==" in line and "+" not in line for line in lines), [l for l in lines if "==" not in l]
    names = {line.split("==")[0].lower() for line in lines}
    assert {"celery", "kombu", "redis", "torch", "transformers", "pydantic"} <= names


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose here")
    env = dict(os.environ, FLOWER_PASSWORD="test", PIPEFLEET_API_KEYS="test-key-0123456789abcdef")
    for profile in ([], ["--profile", "cpu"]):
        result = subprocess.run([docker, "compose", "-f", str(COMPOSE), *profile, "config", "--quiet"],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_gateway_service_needs_api_keys_and_reads_the_fleet_config(compose):
    gateway = compose["services"]["gateway"]
    assert gateway["command"][:2] == ["pipefleet", "gateway"] and "--insecure" not in gateway["command"]
    assert "PIPEFLEET_API_KEYS:?" in gateway["environment"]["PIPEFLEET_GATEWAY__API_KEYS"]
    assert gateway["build"]["args"]["EXTRAS"] == "gateway"
    assert _config_of(gateway).source.endswith("fleet.toml")
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
