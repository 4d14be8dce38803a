"""Every Redis client pipefleet opens comes from here: plain, TLS (``rediss://``) or Sentinel URLs.

Workers, producers and the gateway call :func:`redis_client` (or
:func:`async_redis_client`) with a URL and the fleet's :class:`RedisOptions`,
so a Sentinel or TLS setting reaches every connection: the claim script, the
advertisements, event streams, claim-check payloads, cancel flags, the
publisher and the result reads.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict


class RedisOptions(BaseModel):
    """Connection settings a URL cannot carry: Sentinel's master name and credentials, TLS files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sentinel_master_name: str | None = None
    """The monitored master's name; needed by ``sentinel://`` URLs."""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    """Credentials of the Sentinels themselves (the master's come from the URL)."""
    ssl_ca_certs: str | None = None
    """CA bundle that signed the Redis servers' certificates (``rediss://``)."""
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    """Client certificate and key, when the servers ask for one (``tls-auth-clients``)."""

    @classmethod
    def from_env(cls, **overrides: Any) -> "RedisOptions":
        """Options from ``PIPEFLEET_SENTINEL_MASTER_NAME``, ``PIPEFLEET_SENTINEL_PASSWORD``, ``PIPEFLEET_REDIS_SSL_*``."""
        env = {
            "sentinel_master_name": "PIPEFLEET_SENTINEL_MASTER_NAME",
            "sentinel_username": "PIPEFLEET_SENTINEL_USERNAME",
            "sentinel_password": "PIPEFLEET_SENTINEL_PASSWORD",
            "ssl_ca_certs": "PIPEFLEET_REDIS_SSL_CA_CERTS",
            "ssl_certfile": "PIPEFLEET_REDIS_SSL_CERTFILE",
            "ssl_keyfile": "PIPEFLEET_REDIS_SSL_KEYFILE",
        }
        values = {field: os.environ[name] for field, name in env.items() if os.environ.get(name)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def redis_client(url: str, options: RedisOptions | None = None, **client_kwargs: Any) -> Any:
    """A ``redis.Redis`` for ``url`` with ``options``; extra keyword arguments go to the client."""
    import redis as redis_lib

    return redis_lib.Redis.from_url(url, **client_kwargs)
