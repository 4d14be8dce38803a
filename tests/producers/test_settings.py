"""The client's environment (``ClientSettings``, read by ``FleetClient.from_env``)."""

from __future__ import annotations

from producers.constants import DEFAULT_BROKER_URL
from producers.settings import ClientSettings


def test_variables_set_the_urls_the_sweep_and_the_redis_options(monkeypatch):
    monkeypatch.setenv("PIPEFLEET_BROKER_URL", "sentinel://h1:26379/0;sentinel://h2:26379/0")
    monkeypatch.setenv("PIPEFLEET_RESULT_BACKEND", "redis://r:6379/1")
    monkeypatch.setenv("PIPEFLEET_VISIBILITY_TIMEOUT_S", "42")
    monkeypatch.setenv("PIPEFLEET_SENTINEL_MASTER_NAME", "pf")
    monkeypatch.setenv("PIPEFLEET_SENTINEL_PASSWORD", "007")
    monkeypatch.setenv("PIPEFLEET_REDIS_SSL_CA_CERTS", "/ca.pem")
    monkeypatch.setenv("PIPEFLEET_REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("PIPEFLEET_LIMITS__MAX_INPUTS_PER_JOB", "7")  # the fleet config's, not the client's
    kwargs = ClientSettings().client_kwargs()
    options = kwargs.pop("redis_options")
    assert kwargs == {"broker_url": "sentinel://h1:26379/0;sentinel://h2:26379/0",
                      "result_backend": "redis://r:6379/1", "visibility_timeout_s": 42}
    assert (options.sentinel_master_name, options.sentinel_password, options.ssl_ca_certs) == ("pf", "007", "/ca.pem")
    assert options.replicas_to_wait_for("redis://x") == 2


def test_unset_or_empty_variables_keep_the_defaults(monkeypatch):
    monkeypatch.setenv("PIPEFLEET_BROKER_URL", "")
    monkeypatch.delenv("PIPEFLEET_SENTINEL_MASTER_NAME", raising=False)
    settings = ClientSettings()
    assert settings.broker_url == DEFAULT_BROKER_URL and settings.redis_options().sentinel_master_name is None
