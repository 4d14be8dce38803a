"""The Redis client factory and the Celery settings it implies: Sentinel, TLS, replica acknowledgements."""

from __future__ import annotations

import ssl

import pytest

from config.loader import load_config
from producers.celery_app import celery_settings, producer_backend_url, worker_backend_url
from producers.errors import ConfigError
from producers.redis_clients import RedisOptions, ReplicaWait, parse_sentinel_url, redis_client
from producers.settings import ClientSettings

SENTINELS = "sentinel://:secret@h1:26379/2;sentinel://:secret@h2:26380/2;sentinel://h3/2"


def test_sentinel_urls_parse_into_sentinels_db_and_master_password():
    target = parse_sentinel_url(SENTINELS)
    assert target.sentinels == [("h1", 26379), ("h2", 26380), ("h3", 26379)]
    assert (target.db, target.password) == (2, "secret")


def test_a_sentinel_url_needs_the_master_name():
    with pytest.raises(ConfigError, match="sentinel_master_name"):
        redis_client(SENTINELS)
    client = redis_client(SENTINELS, RedisOptions(sentinel_master_name="pf"))
    assert client.connection_pool.service_name == "pf"


def test_celery_gets_sentinel_and_tls_options_for_broker_and_result_backend_alike():
    options = RedisOptions(sentinel_master_name="pf", sentinel_password="s", ssl_ca_certs="/ca.pem")
    settings = celery_settings(broker_url=SENTINELS, result_backend=producer_backend_url(SENTINELS),
                               redis_options=options)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert settings[key]["master_name"] == "pf"
        assert settings[key]["sentinel_kwargs"] == {"password": "s"}
    assert settings["pipefleet_wait_replicas"] == 1  # Sentinel: results wait for a replica by default
    assert settings["result_backend"].endswith(":ProducerSentinelBackend+" + SENTINELS)
    tls = celery_settings(broker_url="rediss://u:p@h:6380/0", result_backend=worker_backend_url("rediss://u:p@h:6380/1"),
                          redis_options=options)
    assert tls["broker_use_ssl"] == tls["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                                      "ssl_ca_certs": "/ca.pem"}
    assert tls["pipefleet_wait_replicas"] == 0


def test_sentinel_tls_reaches_the_sentinels_and_the_master_in_celery_and_in_pipefleets_clients():
    options = RedisOptions(sentinel_master_name="pf", sentinel_tls=True, ssl_ca_certs="/ca.pem")
    settings = celery_settings(broker_url=SENTINELS, result_backend=worker_backend_url(SENTINELS),
                               redis_options=options)
    assert settings["broker_use_ssl"] == settings["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                                               "ssl_ca_certs": "/ca.pem"}
    for key in ("broker_transport_options", "result_backend_transport_options"):
        assert settings[key]["sentinel_kwargs"] == {"ssl": True, "ssl_ca_certs": "/ca.pem"}
    client = redis_client(SENTINELS, options)
    assert client.connection_pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
    assert "broker_use_ssl" not in celery_settings(broker_url=SENTINELS, result_backend=SENTINELS,
                                                   redis_options=RedisOptions(sentinel_master_name="pf"))


def test_the_fleet_config_and_the_environment_carry_the_options(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(f'broker_url = "{SENTINELS}"\nresult_backend = "{SENTINELS}"\n')
    config = load_config(path, environ={"PIPEFLEET_SENTINEL_MASTER_NAME": "pf", "PIPEFLEET_SENTINEL_PASSWORD": "123"})
    assert config.redis_options().sentinel_master_name == "pf"
    assert config.redis_options().sentinel_password == "123"  # a password stays a string
    env = {"PIPEFLEET_SENTINEL_MASTER_NAME": "pf", "PIPEFLEET_REDIS_WAIT_REPLICAS": "2"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        options = ClientSettings().redis_options()
    assert (options.sentinel_master_name, options.replicas_to_wait_for("redis://x")) == ("pf", 2)


class _Pipe:
    def __init__(self, acknowledged: int) -> None:
        self.acknowledged = acknowledged
        self.commands: list[tuple] = []

    def execute_command(self, *args):
        self.commands.append(args)

    def execute(self):
        return [self.acknowledged] * len(self.commands)


def test_writes_stop_waiting_while_no_replica_keeps_up_and_resume_when_one_does(monkeypatch):
    import producers.redis_clients as module

    now = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    wait = ReplicaWait(1, 500)
    lagging = _Pipe(0)
    wait.execute(lagging, "a write")
    assert lagging.commands == [("WAIT", 1, 500)] and wait.degraded
    skipped = _Pipe(0)
    wait.execute(skipped, "a write")
    assert skipped.commands == []  # degraded: no 500 ms stall per write
    now[0] += module.PROBE_INTERVAL_S
    probe = _Pipe(1)
    wait.execute(probe, "a write")
    assert probe.commands == [("WAIT", 1, module.PROBE_TIMEOUT_MS)] and not wait.degraded
