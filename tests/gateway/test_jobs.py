"""The jobs API over plain HTTP (httpx) against a real gateway and fleet: every route and error code."""

from __future__ import annotations

import json
import time

import httpx
import numpy
import pytest

from tests.fault_pipelines import BATCH_LOG_PREFIX
from tests.fleet import free_port, write_config
from tests.gateway.conftest import API_KEY, CORS_ORIGIN, MAX_BODY_BYTES, MAX_INPUTS
from tests.gateway.server import start_gateway
from tests.gateway.sse import read_events
from tests.oracle import assert_same, local_pipeline

TEXTS = ["the cat sat on the mat", "a stormy night", "I love this film"]


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


def submit(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def result(http: httpx.Client, job_id: str, wait: float = 60) -> httpx.Response:
    return http.get(f"/v1/jobs/{job_id}/result", params={"wait": wait})


def wait_for_slow_batch(module_fleet, seen: int) -> None:
    """Block until the worker has started slow batch number ``seen + 1`` (it holds the inference thread)."""
    worker = module_fleet.workers[-1]
    deadline = time.monotonic() + 60
    while worker.log().count(BATCH_LOG_PREFIX) <= seen:
        assert time.monotonic() < deadline, "the slow batch never started"
        time.sleep(0.05)


def slow_batches(module_fleet) -> int:
    return module_fleet.workers[-1].log().count(BATCH_LOG_PREFIX)


def test_submit_poll_and_read_the_result(http, models):
    created = submit(http, {"deployment": "gw-slow", "inputs": TEXTS, "params": {"top_k": 2}})
    assert set(created) >= {"id", "state", "status_url", "result_url"}
    assert created["state"] == "PENDING"
    assert created["status_url"].endswith(f"/v1/jobs/{created['id']}")
    body = httpx.get(created["result_url"], params={"wait": 60}, headers=http.headers, timeout=120).json()
    assert body["id"] == created["id"] and body["state"] == "SUCCESS"
    assert_same(body["result"], local_pipeline("text-classification", models["gw-slow"])(TEXTS, top_k=2))
    status = http.get(f"/v1/jobs/{created['id']}").json()
    assert status == {"id": created["id"], "state": "SUCCESS", "done": 3, "total": 3, "error": None,
                      "error_type": None, "queued": False, "live_workers": None}


def test_task_and_model_name_a_deployment(http, models):
    created = submit(http, {"task": "feature-extraction", "model": models["gw-emb"], "inputs": "hello there",
                            "params": {"pool": "mean", "normalize": True}})
    vector = result(http, created["id"]).json()["result"]
    tokens = numpy.asarray(local_pipeline("feature-extraction", models["gw-emb"])("hello there"))[0]
    expected = tokens.mean(axis=0) / numpy.linalg.norm(tokens.mean(axis=0))
    assert numpy.allclose(vector, expected, atol=1e-4)


def test_chunked_job_reports_progress_and_the_whole_result(http, models):
    texts = [f"text number {i}" for i in range(12)]
    created = submit(http, {"deployment": "gw-slow", "inputs": texts, "chunk_size": 4, "priority": 0})
    assert http.get(f"/v1/jobs/{created['id']}").json()["total"] == 12
    body = result(http, created["id"]).json()
    assert_same(body["result"], local_pipeline("text-classification", models["gw-slow"])(texts))
    assert http.get(f"/v1/jobs/{created['id']}").json()["done"] == 12


def test_result_is_202_until_the_job_is_done(http, module_fleet):
    seen = slow_batches(module_fleet)
    created = submit(http, {"deployment": "gw-slow", "inputs": "SLOW one"})
    wait_for_slow_batch(module_fleet, seen)
    pending = result(http, created["id"], wait=0)
    assert pending.status_code == 202
    assert pending.json()["state"] in ("PENDING", "RUNNING")
    assert result(http, created["id"]).status_code == 200


def test_cancel_a_queued_job_then_its_result_is_409(http, module_fleet):
    seen = slow_batches(module_fleet)
    blocker = submit(http, {"deployment": "gw-slow", "inputs": "SLOW blocker"})
    wait_for_slow_batch(module_fleet, seen)
    queued = submit(http, {"deployment": "gw-slow", "inputs": "queued behind the slow batch"})
    cancelled = http.delete(f"/v1/jobs/{queued['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "CANCELLED"
    refused = result(http, queued["id"])
    assert refused.status_code == 409
    assert refused.json()["error"] == "JobCancelled"
    assert result(http, blocker["id"]).status_code == 200


def test_a_job_past_its_deadline_is_504(http, module_fleet):
    seen = slow_batches(module_fleet)
    blocker = submit(http, {"deployment": "gw-slow", "inputs": "SLOW blocker"})
    wait_for_slow_batch(module_fleet, seen)
    late = submit(http, {"deployment": "gw-slow", "inputs": "too late", "deadline_s": 0.2})
    response = result(http, late["id"])
    assert response.status_code == 504, response.text
    assert response.json()["error"] == "JobTimeout"
    assert result(http, blocker["id"]).status_code == 200


def test_a_job_failing_on_the_worker_is_500_with_its_message(http):
    created = submit(http, {"deployment": "gw-faulty", "inputs": "POISON pill"})
    response = result(http, created["id"])
    assert response.status_code == 500
    assert response.json()["error"] == "JobError"
    assert "POISON" in response.json()["message"]
    status = http.get(f"/v1/jobs/{created['id']}").json()
    assert status["state"] == "FAILURE" and "POISON" in status["error"]


def test_unknown_deployment_is_404(http):
    response = http.post("/v1/jobs", json={"deployment": "no-such-deployment", "inputs": "x"})
    assert response.status_code == 404
    assert response.json()["error"] == "UnknownDeployment"
    assert "gw-emb" in response.json()["message"]  # it lists the live ones


def test_refused_inputs_and_params_are_422(http):
    empty = http.post("/v1/jobs", json={"deployment": "gw-slow", "inputs": []})
    assert empty.status_code == 422 and empty.json()["error"] == "InvalidInput"
    unknown_field = http.post("/v1/jobs", json={"deployment": "gw-slow", "inputs": "x", "frobnicate": 1})
    assert unknown_field.status_code == 422 and "frobnicate" in unknown_field.json()["message"]
    bad_priority = http.post("/v1/jobs", json={"deployment": "gw-slow", "inputs": "x", "priority": 42})
    assert bad_priority.status_code == 422
    # Limits the worker enforces fail the job; its result carries the same class.
    created = submit(http, {"deployment": "gw-gen", "inputs": "hi", "params": {"max_new_tokens": 10**9}})
    refused = result(http, created["id"])
    assert refused.status_code == 422 and refused.json()["error"] == "InvalidParams"
    assert http.get("/v1/jobs/not-a-uuid").status_code == 422


def test_oversize_requests_are_413_before_any_work(http):
    too_many = http.post("/v1/jobs", json={"deployment": "gw-slow", "inputs": ["x"] * (MAX_INPUTS + 1)})
    assert too_many.status_code == 413 and too_many.json()["error"] == "PayloadTooLarge"
    big = {"deployment": "gw-slow", "inputs": ["y" * (MAX_BODY_BYTES // 4)] * 5}
    declared = http.post("/v1/jobs", json=big)
    assert declared.status_code == 413 and declared.json()["error"] == "PayloadTooLarge"
    payload = json.dumps(big).encode()

    def chunks():  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(payload), 16_384):
            yield payload[start:start + 16_384]

    streamed = http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"] == "PayloadTooLarge"
    openai_face = http.post("/v1/embeddings", json={"model": "gw-emb", "input": ["z" * MAX_BODY_BYTES]})
    assert openai_face.status_code == 413 and openai_face.json()["error"]["code"] == "PayloadTooLarge"


def test_keys_guard_everything_but_healthz_and_metrics(gateway):
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": API_KEY}):
        response = httpx.get(f"{gateway.url}/v1/deployments", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "AuthenticationError"
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200


def test_cors_answers_preflights_for_the_configured_origin_only(gateway):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{gateway.url}/v1/jobs", headers={"Origin": CORS_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = httpx.options(f"{gateway.url}/v1/jobs", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_deployments_and_healthz_list_the_live_deployments(http):
    names = {d["name"] for d in http.get("/v1/deployments").json()}
    assert {"gw-emb", "gw-gen", "gw-slow", "gw-faulty"} <= names
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["redis"] == "ok"
    assert {"gw-emb", "gw-gen"} <= {d["name"] for d in health["deployments"]}


def collect(http: httpx.Client, job_id: str, last_event_id: str | None = None) -> list:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(read_events(response))


@pytest.mark.parametrize("body", [
    {"deployment": "gw-gen", "inputs": "the quick brown fox", "params": {"max_new_tokens": 8, "do_sample": False}},
    {"deployment": "gw-slow", "inputs": [f"text {i}" for i in range(8)], "chunk_size": 2},
], ids=["generation", "chunked"])
def test_events_stream_ends_with_done_and_resumes_after_last_event_id(http, body):
    created = submit(http, body)
    events = collect(http, created["id"])
    assert events and events[-1].event == "done"
    assert json.loads(events[-1].data)["state"] == "SUCCESS"
    assert all(event.event in ("progress", "text", "restart", "done") for event in events)
    for index, event in enumerate(events[:-1]):
        resumed = collect(http, created["id"], last_event_id=event.id)
        assert [(e.event, e.data) for e in resumed] == [(e.event, e.data) for e in events[index + 1:]]
    replayed = collect(http, created["id"], last_event_id="0-0")
    assert [(e.event, e.data) for e in replayed] == [(e.event, e.data) for e in events]


def test_events_of_a_failed_job_end_with_error(http):
    created = submit(http, {"deployment": "gw-faulty", "inputs": "POISON pill"})
    events = collect(http, created["id"])
    assert events[-1].event == "error"
    data = json.loads(events[-1].data)
    assert data["type"] == "JobError" and "POISON" in data["message"]
    assert http.get(f"/v1/jobs/{created['id']}/events", headers={"Last-Event-ID": "bogus"}).status_code == 422


def test_metrics_count_requests_by_route_and_code(http, gateway):
    http.get("/v1/jobs/not-a-uuid")
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'pipefleet_gateway_requests_total{code="422",method="GET",route="/v1/jobs/{job_id}"}' in text
    assert "pipefleet_gateway_request_duration_seconds_bucket" in text
    assert "pipefleet_gateway_open_streams" in text


def test_unreachable_redis_is_503(module_fleet, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "dead.toml", broker_url=f"{dead}/0", result_backend=f"{dead}/1",
                          deployments=[], gateway={"api_keys": [API_KEY]})
    gateway = start_gateway(config, tmp_path)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        response = httpx.post(f"{gateway.url}/v1/jobs", json={"deployment": "gw-slow", "inputs": "x"},
                              headers=headers, timeout=120)
        assert response.status_code == 503 and response.json()["error"] == "FleetUnavailable"
        assert httpx.get(f"{gateway.url}/healthz", timeout=60).status_code == 503
    finally:
        gateway.stop()


def test_no_key_means_loopback_only_unless_insecure(module_fleet, tmp_path):
    config = module_fleet.config([])
    refused = start_gateway(config, tmp_path, args=["--host", "0.0.0.0"], wait=False)
    assert refused.proc.wait(60) != 0
    assert "without API keys" in refused.log()
    insecure = start_gateway(config, tmp_path, args=["--host", "0.0.0.0", "--insecure", "--workers", "2"])
    try:
        assert httpx.get(f"{insecure.url}/v1/deployments").status_code == 200  # no key needed
    finally:
        insecure.stop()
