"""The client's environment: the ``PIPEFLEET_*`` variables :meth:`FleetClient.from_env` reads (pydantic-settings).

The names are those of the fleet config's keys (``config/``), so one
environment serves workers, gateways and web backends alike; the client
reads only the variables below, never the fleet's TOML file.
"""

from __future__ import annotations

from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

from producers.constants import DEFAULT_BROKER_URL, DEFAULT_RESULT_BACKEND
from producers.redis_clients import DEFAULT_WAIT_TIMEOUT_MS, RedisConnectionKeys

ENV_PREFIX = "PIPEFLEET_"
"""Every variable's prefix (``PIPEFLEET_BROKER_URL`` sets ``broker_url``)."""


class ClientSettings(BaseSettings, RedisConnectionKeys):
    """``PIPEFLEET_BROKER_URL``, ``PIPEFLEET_RESULT_BACKEND``, ``PIPEFLEET_VISIBILITY_TIMEOUT_S`` and the
    Redis options (``PIPEFLEET_SENTINEL_*``, ``PIPEFLEET_REDIS_SSL_*``, ``PIPEFLEET_REDIS_WAIT_*``).

        settings = ClientSettings()                  # from os.environ; empty variables count as unset
        client = FleetClient(**settings.client_kwargs())
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_RESULT_BACKEND
    visibility_timeout_s: int = 3600
    redis_wait_replicas: int | None = None
    """Replica acknowledgements each submission waits for; None: 1 under Sentinel, else 0."""
    redis_wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS

    def replica_wait(self) -> dict[str, Any]:
        """The replica-wait options of :meth:`redis_options` (``PIPEFLEET_REDIS_WAIT_*``)."""
        return {"wait_replicas": self.redis_wait_replicas, "wait_timeout_ms": self.redis_wait_timeout_ms}

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~producers.client.FleetClient` for these settings."""
        return {"broker_url": self.broker_url, "result_backend": self.result_backend,
                "visibility_timeout_s": self.visibility_timeout_s, "redis_options": self.redis_options()}
