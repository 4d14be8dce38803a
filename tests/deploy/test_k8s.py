"""``deploy/k8s``: the kustomization renders, core resources validate against the Kubernetes schemas, and each
worker group's KEDA ScaledObject scales on the backlog metric of the deployment its workers serve."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import kubernetes_validate
import pytest
import yaml

from producers.backlog import BacklogCollector
from tests.deploy.kustomize import render
from tests.fleet import REPO_ROOT

OVERLAY = REPO_ROOT / "deploy" / "k8s" / "overlays" / "example"
KUBERNETES_VERSION = "1.30"
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet"}


@pytest.fixture(scope="module")
def documents():
    return render(OVERLAY)


def _metric_name() -> tuple[str, dict[str, str]]:
    """The name and labels of the gauge the backlog collector exports (read from the collector itself)."""
    from prometheus_client.core import GaugeMetricFamily

    families = list(BacklogCollector(_Redis(), lambda: ["x"]).collect())
    assert families and isinstance(families[0], GaugeMetricFamily)
    return families[0].name, families[0].samples[0].labels


class _Redis:
    """Just enough of a Redis client for the collector to name its metric (no server: naming only)."""

    def pipeline(self, transaction=False):
        return self

    def llen(self, key):
        return None

    def execute(self):
        return [0, 0, 0, 0]

    def eval(self, script, numkeys, *args):
        return [0]


def test_core_resources_validate_against_the_kubernetes_schemas(documents):
    core = [doc for doc in documents if doc["kind"] in CORE_KINDS]
    assert {doc["kind"] for doc in core} == CORE_KINDS
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_renderer_agrees_with_kubectl_where_kubectl_exists(documents):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # CI has no kubectl: the renderer above is what runs there
    rendered = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True)
    theirs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(theirs, key=key) == sorted(documents, key=key)


def test_gpu_workers_scale_on_the_backlog_of_the_deployment_they_serve(documents):
    metric, labels = _metric_name()
    assert metric == "pipefleet_backlog" and set(labels) == {"deployment"}
    config = next(doc for doc in documents if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "pipefleet-config")
    configured = {d["name"] for d in tomllib.loads(config["data"]["fleet.toml"])["deployments"]}
    workers = {doc["metadata"]["name"]: doc for doc in documents
               if doc["kind"] == "Deployment" and doc["metadata"]["name"].startswith("pipefleet-worker-")}
    scaled = [doc for doc in documents if doc["kind"] == "ScaledObject"]
    assert workers and {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(workers)
    for scaled_object in scaled:
        worker = workers[scaled_object["spec"]["scaleTargetRef"]["name"]]
        container = next(c for c in worker["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
        args = container["args"]
        served = args[args.index("--deployment") + 1]
        assert served in configured
        [trigger] = scaled_object["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert re.fullmatch(rf'max\({metric}\{{deployment="{re.escape(served)}"\}}\)', query), query
        assert scaled_object["spec"]["minReplicaCount"] == 0  # scale to zero
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # Readiness only after warm-up (the advertisement), a preStop hook, and a grace period that covers it.
        assert "--check" in container["readinessProbe"]["exec"]["command"]
        assert "--check" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        shutdown = tomllib.loads(config["data"]["fleet.toml"])["shutdown_timeout_s"]
        assert grace >= 120 + shutdown
        init = worker["spec"]["template"]["spec"]["initContainers"][0]
        assert "--register-only" in init["args"] and served in init["args"]


def test_redis_runs_with_sentinel_and_the_fleet_uses_it(documents):
    redis = next(doc for doc in documents if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "redis")
    containers = {c["name"] for c in redis["spec"]["template"]["spec"]["containers"]}
    assert containers == {"redis", "sentinel"} and redis["spec"]["replicas"] == 3
    secret = next(doc for doc in documents if doc["kind"] == "Secret")
    assert all(part.startswith("sentinel://") for part in secret["stringData"]["broker-url"].split(";"))
    config = next(doc for doc in documents if doc["kind"] == "ConfigMap")
    assert tomllib.loads(config["data"]["fleet.toml"])["sentinel_master_name"] == "pipefleet"
    names = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "Deployment"}
    assert {"pipefleet-gateway", "pipefleet-flower"} <= names
