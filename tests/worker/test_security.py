"""Nobody reaches what they should not: models, remote code, URLs, Redis credentials, results."""

from __future__ import annotations

import io
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producers import FleetClient, InvalidParams, MediaError, UnknownDeployment
from producers.constants import INFER_TASK
from producers.errors import FleetUnavailable
from producers.redis_access import safe_url
from tests.conftest import Fleet
from tests.fleet import RedisServer
from tests.oracle import assert_same, local_pipeline

LOOPBACK = "127.0.0.1"
RESULT_TTL_S = 2


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        port = self.server.server_port
        if self.path == "/image.png":
            body = _png()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/to-elsewhere":
            self._redirect("http://elsewhere.invalid/image.png")
        elif self.path == "/to-localhost":
            self._redirect(f"http://localhost:{port}/image.png")
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def media_server():
    httpd = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_port
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", autouse=True)
def served(module_fleet, model_dir, media_server):
    models = {kind: str(model_dir(kind)) for kind in ("text-classification", "image-classification")}
    deployments = [
        {"name": "sec-tc", "task": "text-classification", "model": models["text-classification"]},
        {"name": "sec-img", "task": "image-classification", "model": models["image-classification"]},
    ]
    # localhost is allowlisted but resolves to loopback, which only 127.0.0.1 may use.
    config = module_fleet.config(deployments, result_ttl_s=RESULT_TTL_S,
                                 media={"allowed_hosts": [LOOPBACK, "localhost"], "allow_private_hosts": [LOOPBACK]})
    worker = module_fleet.worker(config, deployments=["sec-tc", "sec-img"])
    return {"models": models, "worker": worker}


def _forge(client, spec: dict, queue: str = "pipefleet.sec-tc"):
    return client.job(client.celery.send_task(INFER_TASK, kwargs={"spec": spec}, queue=queue).id)


def test_the_client_refuses_models_and_revisions_that_are_not_deployed(client, served):
    with pytest.raises(UnknownDeployment, match="evil/model"):
        client.submit(task="text-classification", model="evil/model", inputs="x")
    with pytest.raises(UnknownDeployment, match="revision='deadbeef'"):
        client.submit(deployment="sec-tc", revision="deadbeef", inputs="x")


def test_forged_revision_and_remote_code_are_refused_by_the_worker(client, served):
    with pytest.raises(UnknownDeployment, match="deadbeef"):
        _forge(client, {"deployment": "sec-tc", "inputs": ["x"], "revision": "deadbeef"}).result(timeout=30)
    for params in ({"generate_kwargs": {"trust_remote_code": True}}, {"model_kwargs": {"trust_remote_code": True}},
                   {"model": "evil/model"}, {"pipeline_class": "os.system"}):
        with pytest.raises(InvalidParams, match="not allowed"):
            _forge(client, {"deployment": "sec-tc", "inputs": ["x"], "params": params}).result(timeout=30)
    text = "still serving"
    assert_same(client.submit(deployment="sec-tc", inputs=text).result(timeout=30),
                local_pipeline("text-classification", served["models"]["text-classification"])(text))


def test_urls_are_fetched_only_from_allowlisted_public_hosts_with_redirects_rechecked(client, served, media_server):
    base = f"http://{LOOPBACK}:{media_server}"
    assert client.submit(deployment="sec-img", inputs=f"{base}/image.png").result(timeout=30)
    refused = {
        f"http://localhost:{media_server}/image.png": "private address",
        f"{base}/to-localhost": "private address",
        f"{base}/to-elsewhere": "not on the allowlist",
        "http://elsewhere.invalid/image.png": "not on the allowlist",
        "file:///etc/passwd": "paths are not allowed|unsupported",
    }
    for url, message in refused.items():
        with pytest.raises(MediaError, match=message):
            client.submit(deployment="sec-img", inputs=url).result(timeout=30)


def test_results_are_keyed_by_an_unguessable_id_and_expire(client, served, module_fleet):
    job = client.submit(deployment="sec-tc", inputs="expiring result")
    assert uuid.UUID(job.id).version == 4
    assert job.result(timeout=30)
    results = module_fleet.server.client(1)
    key = f"celery-task-meta-{job.id}"
    assert 0 < results.ttl(key) <= RESULT_TTL_S
    time.sleep(RESULT_TTL_S + 0.5)
    assert not results.exists(key)
    with pytest.raises(InvalidParams, match="UUID4"):
        client.submit(deployment="sec-tc", inputs="x", job_id="job-1")


def test_a_password_protected_redis_refuses_clients_without_the_password(tmp_path, model_dir):
    server = RedisServer(password="s3cret-pw").start()
    fleet = Fleet(server, tmp_path)
    try:
        config = fleet.config([{"name": "sec-auth", "task": "text-classification",
                                "model": str(model_dir("text-classification"))}])
        fleet.worker(config, deployments=["sec-auth"])
        with fleet.client() as allowed:
            job = allowed.submit(deployment="sec-auth", inputs="with the password")
            assert job.result(timeout=30)
        bare = f"redis://{LOOPBACK}:{server.port}"
        wrong = f"redis://:wrong@{LOOPBACK}:{server.port}"
        for broker, message in ((bare, "needs a password|Authentication required"),
                                (wrong, "refused the credentials|invalid username-password")):
            with FleetClient(f"{broker}/0", f"{broker}/1") as intruder:
                started = time.monotonic()
                with pytest.raises(FleetUnavailable, match=message):
                    intruder.deployments()
                with pytest.raises(FleetUnavailable, match=message):
                    intruder.submit(deployment="sec-auth", inputs="x")
                with pytest.raises(FleetUnavailable, match=message):
                    intruder.job(job.id).result(timeout=5)
                with pytest.raises(FleetUnavailable, match=message):
                    intruder.job(job.id).status()
                assert time.monotonic() - started < 10
                assert "wrong" not in safe_url(intruder.broker_url)
    finally:
        fleet.stop()
        server.cleanup()
