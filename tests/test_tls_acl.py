"""TLS and a least-privilege ACL user, end to end: submit, result, streaming, cancel and the gateway.

A real redis-server listens only on ``--tls-port`` with certificates this test makes
(``cryptography``), asks clients for their certificate, and has its default user off.
Workers, producers and the gateway connect as the ACL user of ``pipefleet_acl_line``
(the line docs/production.md shows). The ACL log must stay empty: nothing pipefleet
did was refused, and the user cannot run an administrative command.
"""

from __future__ import annotations

import httpx
import pytest
import redis

from producers import FleetClient, JobCancelled
from producers import RedisOptions
from tests.fleet import start_worker, write_config
from tests.gateway.server import start_gateway
from tests.ha_infra import TlsAclRedis
from tests.oracle import assert_same, local_pipeline

API_KEY = "tls-acl-test-key-0123456789"
GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory, model_dir):
    directory = tmp_path_factory.mktemp("tls")
    server = TlsAclRedis(directory).start()
    tc, gen = str(model_dir("text-classification")), str(model_dir("text-generation"))
    config = write_config(
        directory / "fleet.toml", broker_url=server.url(0), result_backend=server.url(1),
        redis_ssl_ca_certs=str(server.certs.ca_file), redis_ssl_certfile=str(server.certs.client_cert),
        redis_ssl_keyfile=str(server.certs.client_key), gateway={"api_keys": [API_KEY]},
        deployments=[{"name": "tls-tc", "task": "text-classification", "model": tc, "max_batch_size": 8,
                      "pipeline_kwargs": {"pipeline_class": "tests.fault_pipelines.SlowTextClassification"}},
                     {"name": "tls-gen", "task": "text-generation", "model": gen, "max_batch_size": 4}])
    worker = start_worker(config, directory, redis_client=server.admin(0), env={"PIPEFLEET_TEST_SLOW_S": "3"})
    client = FleetClient(server.url(0), server.url(1), redis_options=RedisOptions(**server.ssl_kwargs()))
    yield {"server": server, "config": config, "client": client, "tc": tc, "gen": gen, "dir": directory}
    client.close()
    worker.kill()
    server.stop()


def test_submit_result_stream_and_cancel_over_tls_as_the_acl_user(tls_fleet):
    client = tls_fleet["client"]
    texts = ["encrypted and fine", "least privilege, great"]
    assert_same(client.submit(deployment="tls-tc", inputs=texts).result(timeout=120),
                local_pipeline("text-classification", tls_fleet["tc"])(texts))

    params = {"max_new_tokens": 12, "return_full_text": False, **GREEDY}
    job = client.submit(deployment="tls-gen", inputs="The fleet", params=params)
    pieces = list(job.stream(timeout_s=120))
    expected = local_pipeline("text-generation", tls_fleet["gen"])("The fleet", **params)
    assert_same(job.result(timeout=60), expected)
    assert "".join(pieces) == expected[0]["generated_text"]

    slow = client.submit(deployment="tls-tc", inputs="SLOW blocker")
    cancelled = client.submit(deployment="tls-tc", inputs="SLOW never runs")
    cancelled.cancel()
    with pytest.raises(JobCancelled):
        cancelled.result(timeout=60)
    slow.result(timeout=120)


def test_the_gateway_over_tls_as_the_acl_user(tls_fleet):
    gateway = start_gateway(tls_fleet["config"], tls_fleet["dir"])
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        submitted = httpx.post(f"{gateway.url}/v1/jobs", headers=headers, timeout=30,
                               json={"deployment": "tls-tc", "inputs": "through the gateway"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        result = httpx.get(f"{gateway.url}/v1/jobs/{job_id}/result", params={"wait": 60}, headers=headers,
                           timeout=90)
        assert result.status_code == 200, result.text
        assert_same(result.json()["result"], local_pipeline("text-classification", tls_fleet["tc"])(
            "through the gateway"))
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=30).text
        assert 'pipefleet_backlog{deployment="tls-tc"}' in metrics
    finally:
        gateway.stop()


def test_nothing_was_refused_and_the_user_cannot_administer(tls_fleet):
    server = tls_fleet["server"]
    user = redis.Redis.from_url(server.url(0), **server.ssl_kwargs())
    for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.execute_command(*command)
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.set("not-a-pipefleet-key", "1")
    refused = [entry for entry in server.admin().acl_log(count=100)
               if entry.get("username") == server.user
               and entry.get("object") not in ("flushall", "config|get", "keys", "acl|list", "not-a-pipefleet-key")]
    assert refused == [], refused
    user.close()
