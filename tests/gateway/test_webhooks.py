"""Job webhooks on a real fleet: signed per Standard Webhooks, retried, durable in Redis, SSRF-checked.

The receiver is a real local HTTP server; signatures are checked by the ``standardwebhooks`` package.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
import standardwebhooks

from tests.gateway.conftest import API_KEY, SECRET
from tests.gateway.server import start_gateway

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def submit(gateway, path_or_url: str, receiver=None, **fields) -> httpx.Response:
    url = path_or_url if receiver is None else f"{receiver.url}{path_or_url}"
    body = {"deployment": "bt-emb", "inputs": "a document", "webhook": url, **fields}
    return httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=AUTH, timeout=30)


def unique(name: str) -> str:
    """A receiver path of this test run alone (the receiver outlives the test)."""
    return f"/jobs/{name}-{uuid.uuid4().hex[:8]}"


def verified(delivery) -> dict:
    """The event, after standardwebhooks checked its signature against the fleet's secret."""
    return standardwebhooks.Webhook(SECRET).verify(delivery.body, delivery.headers)


def test_a_job_webhook_is_signed_and_carries_the_result(batch_gateway, receiver):
    signed_path = unique("signed")
    response = submit(batch_gateway, signed_path, receiver)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    [delivery] = receiver.wait_for(lambda: receiver.accepted(signed_path))
    event = verified(delivery)
    assert event["type"] == "job.succeeded" and event["object"] == "event"
    assert delivery.headers["webhook-id"] == event["id"]
    result = httpx.get(f"{batch_gateway.url}/v1/jobs/{job_id}/result", headers=AUTH).json()
    assert event["data"]["id"] == job_id and event["data"]["state"] == "SUCCESS"
    assert event["data"]["result"] == result["result"]
    tampered = delivery.body.replace(b"SUCCESS", b"FAILURE")
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(tampered, delivery.headers)


def test_client_submit_sends_failed_and_cancelled_events_as_filtered(batch_setup, batch_gateway, receiver):
    failed_path, filtered_path = unique("failed"), unique("filtered")
    with batch_setup.fleet.client() as client:
        failing = client.submit(deployment="bt-gen", inputs="hello", params={"max_new_tokens": 10**7},
                                webhook=f"{receiver.url}{failed_path}")
        only_failures = client.submit(deployment="bt-emb", inputs="fine",
                                      webhook=f"{receiver.url}{filtered_path}", webhook_events=["job.failed"])
        only_failures.result(timeout=60)
        [delivery] = receiver.wait_for(lambda: receiver.accepted(failed_path))
    event = verified(delivery)
    assert event["type"] == "job.failed" and event["data"]["id"] == failing.id
    assert event["data"]["error_type"] == "InvalidParams" and "max_new_tokens" in event["data"]["error"]
    time.sleep(1.0)  # several dispatcher polls: a succeeded job must not be sent to a job.failed-only hook
    assert receiver.attempts(filtered_path) == []


def test_a_refusing_receiver_gets_the_same_event_again_with_backoff(batch_gateway, receiver):
    flaky_path = unique("flaky")
    receiver.refuse[flaky_path] = 2
    submit(batch_gateway, flaky_path, receiver).raise_for_status()
    receiver.wait_for(lambda: receiver.accepted(flaky_path))
    attempts = receiver.attempts(flaky_path)
    assert [a.status for a in attempts] == [503, 503, 200]
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    assert all(verified(a)["type"] == "job.succeeded" for a in attempts)
    stamps = [int(a.headers["webhook-timestamp"]) for a in attempts]
    assert stamps == sorted(stamps)
    metrics = httpx.get(f"{batch_gateway.url}/metrics").text
    for name in ("pipefleet_webhook_deliveries_total", "pipefleet_webhook_failures_total",
                 "pipefleet_webhook_backlog"):
        assert name in metrics


@pytest.mark.parametrize("url, reason", [
    ("http://localhost:{port}/private", "resolves to a private address"),
    ("http://example.org/hook", "is not on the allowlist"),
    ("ftp://127.0.0.1/hook", "unsupported URL scheme"),
])
def test_a_webhook_to_a_private_or_unlisted_address_is_refused(batch_gateway, receiver, url, reason):
    port = receiver.url.rsplit(":", 1)[1]
    response = submit(batch_gateway, url.format(port=port))
    assert response.status_code == 422, response.text
    assert reason in response.json()["message"]
    assert response.json()["error"] in ("UnsafeURL", "InvalidParams")


def test_a_queued_delivery_survives_the_processes_that_queued_it(batch_setup, batch_gateway, receiver):
    """Every dispatcher that saw the event is frozen; a gateway started afterwards delivers it from Redis."""
    durable_path = unique("durable")
    receiver.refuse[durable_path] = 10**6
    submit(batch_gateway, durable_path, receiver).raise_for_status()
    receiver.wait_for(lambda: receiver.attempts(durable_path))
    frozen = [batch_setup.worker.proc.pid, batch_gateway.proc.pid]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        receiver.refuse[durable_path] = 0
        time.sleep(1.5)  # several polls: the frozen processes were the only dispatchers
        assert receiver.accepted(durable_path) == []
        fresh = start_gateway(batch_setup.base, batch_setup.logs)
        try:
            [delivery] = receiver.wait_for(lambda: receiver.accepted(durable_path), 30)
            assert verified(delivery)["type"] == "job.succeeded"
        finally:
            fresh.stop()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
