"""Sentinel over TLS: the Sentinels and both Redis servers listen on TLS ports only, client certificates required.

Real processes only (``tests/ha_infra.py``): a master, a replica and three Sentinels, each started with
``port 0`` and a ``tls-port``; replication and the Sentinels' own links use TLS too. A ``pipefleet worker``
whose config sets ``sentinel_tls = true`` with the ``redis_ssl_*`` files, and a producer built by
``FleetClient.from_env()`` with ``PIPEFLEET_SENTINEL_TLS``, find the master through the Sentinels; jobs run and
stream with the in-process output, and keep running after the master is SIGKILLed and the replica promoted.
"""

from __future__ import annotations

import asyncio

import pytest
import redis

from producers import FleetClient
from tests.fleet import start_worker, write_config
from tests.ha_infra import SentinelCluster, TlsCertificates
from tests.oracle import assert_same, local_pipeline

TEXTS = ["good service", "awful food", "fine, I guess", "what a wonderful day", "never again"]
GREEDY = {"max_new_tokens": 10, "do_sample": False, "return_full_text": False}


@pytest.fixture
def tls_cluster(tmp_path):
    instance = SentinelCluster(tmp_path / "redis", tls=TlsCertificates(tmp_path / "tls")).start()
    yield instance
    instance.stop()


def test_a_fleet_on_tls_sentinels_runs_streams_and_follows_a_failover(tls_cluster, tmp_path, model_dir,
                                                                       monkeypatch):
    files = tls_cluster.tls.client_kwargs()
    tc, gen = str(model_dir("text-classification")), str(model_dir("text-generation"))
    config = write_config(
        tmp_path / "fleet.toml", broker_url=tls_cluster.url(0), result_backend=tls_cluster.url(1),
        sentinel_master_name=tls_cluster.master_name, sentinel_tls=True,
        redis_ssl_ca_certs=files["ssl_ca_certs"], redis_ssl_certfile=files["ssl_certfile"],
        redis_ssl_keyfile=files["ssl_keyfile"], visibility_timeout_s=20,
        deployments=[{"name": "tls-tc", "task": "text-classification", "model": tc, "max_batch_size": 8},
                     {"name": "tls-gen", "task": "text-generation", "model": gen, "max_batch_size": 4}])
    worker = start_worker(config, tmp_path, redis_client=tls_cluster.master().client(0))
    for name, value in {"BROKER_URL": tls_cluster.url(0), "RESULT_BACKEND": tls_cluster.url(1),
                        "SENTINEL_MASTER_NAME": tls_cluster.master_name, "SENTINEL_TLS": "true",
                        "REDIS_SSL_CA_CERTS": files["ssl_ca_certs"], "REDIS_SSL_CERTFILE": files["ssl_certfile"],
                        "REDIS_SSL_KEYFILE": files["ssl_keyfile"]}.items():
        monkeypatch.setenv(f"PIPEFLEET_{name}", value)
    classify = local_pipeline("text-classification", tc)
    try:
        # Nothing listens in plain text: every connection that worked below was TLS.
        for process in [*tls_cluster.servers, *tls_cluster.sentinels]:
            with pytest.raises(redis.ConnectionError):
                redis.Redis(port=process.port, socket_connect_timeout=2, socket_timeout=2).ping()

        with FleetClient.from_env() as client:
            assert_same(client.submit(deployment="tls-tc", inputs=TEXTS).result(timeout=120), classify(TEXTS))
            job = client.submit(deployment="tls-gen", inputs="The fleet", params=GREEDY, stream=True)
            pieces = list(job.stream(timeout_s=120))
            expected = local_pipeline("text-generation", gen)("The fleet", **GREEDY)
            assert_same(job.result(timeout=60), expected)
            assert "".join(pieces) == expected[0]["generated_text"]

            async def read_async_stream() -> list[str]:  # asyncio's Sentinel pool, over TLS too
                streamed = client.submit(deployment="tls-gen", inputs="The fleet", params=GREEDY, stream=True)
                return [piece async for piece in streamed.astream(timeout_s=120)]

            assert "".join(asyncio.run(read_async_stream())) == expected[0]["generated_text"]

            before = client.submit_many([{"deployment": "tls-tc", "inputs": TEXTS[i % 5]} for i in range(40)])
            victim = tls_cluster.kill_master()
            new_master = tls_cluster.wait_for_failover(victim)
            after = client.submit_many([{"deployment": "tls-tc", "inputs": TEXTS[i % 5]} for i in range(40)])
            outputs = client.results(before + after, timeout=180)
            assert victim.proc.returncode == -9 and new_master is not victim
            for index, output in enumerate(outputs):
                assert_same(output, classify(TEXTS[index % 5]))
        assert worker.alive(), worker.log()[-3000:]
    finally:
        worker.kill()
