"""Every Redis client pipefleet opens comes from here: plain, TLS (``rediss://``) or Sentinel URLs.

Workers, producers and the gateway call :func:`redis_client` (or
:func:`async_redis_client`) with a URL and the fleet's :class:`RedisOptions`,
so a Sentinel or TLS setting reaches every connection: the claim script, the
advertisements, event streams, claim-check payloads, cancel flags, the
publisher and the result reads.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from producers.constants import REPLICATION_BARRIER_KEY

logger = logging.getLogger(__name__)

SENTINEL_SCHEME = "sentinel"
"""``sentinel://host:port/db``, several joined by ``;`` (Celery's and kombu's Sentinel URL form)."""

DEFAULT_WAIT_TIMEOUT_MS = 500
"""How long a write waits for a replica's acknowledgement (``WAIT``) before going on unprotected."""


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
    sentinel_tls: bool = False
    """The Sentinels and the masters they name speak TLS, with the ``ssl_*`` files above.

    A ``sentinel://`` URL has no TLS form of its own (``rediss://`` names one server), so this says it.
    """
    wait_replicas: int | None = None
    """Replicas that must acknowledge a submission or a result before it counts (``WAIT``).

    None: 1 with ``sentinel://`` URLs (a failover loses no acknowledged job), 0 otherwise.
    """
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS
    """The longest one ``WAIT`` blocks; past it the write stands, unprotected, and a warning is logged."""

    def replicas_to_wait_for(self, url: str) -> int:
        """How many replica acknowledgements writes to ``url`` wait for."""
        if self.wait_replicas is not None:
            return self.wait_replicas
        return 1 if is_sentinel(url) else 0

    def ssl_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS keyword arguments (empty when no TLS file is set)."""
        found = {"ssl_ca_certs": self.ssl_ca_certs, "ssl_certfile": self.ssl_certfile,
                 "ssl_keyfile": self.ssl_keyfile}
        return {key: value for key, value in found.items() if value}

    def sentinel_tls_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments for a TLS connection to a Sentinel or its master (empty without TLS)."""
        return {"ssl": True, **self.ssl_kwargs()} if self.sentinel_tls else {}


class RedisConnectionKeys(BaseModel):
    """The Sentinel and TLS keys of the fleet config and of the client's environment, as both spell them.

    :class:`~config.models.FleetConfig` and :class:`~producers.settings.ClientSettings` inherit them, so a
    ``PIPEFLEET_SENTINEL_*`` or ``PIPEFLEET_REDIS_SSL_*`` variable means the same to workers and clients;
    :meth:`redis_options` turns them into :class:`RedisOptions`.
    """

    sentinel_master_name: str | None = None
    """The Sentinel-monitored master's name, for ``sentinel://`` URLs (env ``PIPEFLEET_SENTINEL_MASTER_NAME``)."""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    """Credentials of the Sentinels (the master's own come from the URLs)."""
    redis_ssl_ca_certs: str | None = None
    """CA file for ``rediss://`` servers (broker, result backend and every other Redis client)."""
    redis_ssl_certfile: str | None = None
    redis_ssl_keyfile: str | None = None
    """Client certificate and key, when Redis asks for one."""
    sentinel_tls: bool = False
    """The Sentinels and their masters speak TLS, with the ``redis_ssl_*`` files (env ``PIPEFLEET_SENTINEL_TLS``)."""

    def replica_wait(self) -> dict[str, Any]:
        """The ``wait_*`` options of :class:`RedisOptions` these keys set: none here (its defaults)."""
        return {}

    def redis_options(self) -> RedisOptions:
        """The settings every Redis client needs beyond its URL."""
        return RedisOptions(
            sentinel_master_name=self.sentinel_master_name, sentinel_username=self.sentinel_username,
            sentinel_password=self.sentinel_password, ssl_ca_certs=self.redis_ssl_ca_certs,
            ssl_certfile=self.redis_ssl_certfile, ssl_keyfile=self.redis_ssl_keyfile, sentinel_tls=self.sentinel_tls,
            **self.replica_wait())


def is_sentinel(url: str) -> bool:
    """True for a ``sentinel://`` URL (one or several)."""
    return url.split("://", 1)[0] == SENTINEL_SCHEME


class SentinelTarget(BaseModel):
    """A parsed ``sentinel://`` URL list: the Sentinels, and the database and credentials of the master."""

    model_config = ConfigDict(frozen=True)

    sentinels: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``sentinel://[user:pass@]h1:p1/0;sentinel://h2:p2/0`` -> its Sentinels, db and master credentials."""
    sentinels, db, username, password = [], 0, None, None
    for part in filter(None, (piece.strip() for piece in url.split(";"))):
        parsed = urlsplit(part)
        if parsed.scheme != SENTINEL_SCHEME or not parsed.hostname:
            raise ValueError(f"not a sentinel:// URL: {part!r}")
        sentinels.append((parsed.hostname, parsed.port or 26379))
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
        username = username or (unquote(parsed.username) if parsed.username else None)
        password = password or (unquote(parsed.password) if parsed.password else None)
    return SentinelTarget(sentinels=sentinels, db=db, username=username, password=password)


def _sentinel_kwargs(options: RedisOptions) -> dict[str, Any]:
    found = {"username": options.sentinel_username, "password": options.sentinel_password}
    return {**{key: value for key, value in found.items() if value}, **options.sentinel_tls_kwargs()}


def _master_name(options: RedisOptions, url: str) -> str:
    if not options.sentinel_master_name:
        from producers.errors import ConfigError

        raise ConfigError(f"{url.split(';')[0]}...: a sentinel:// URL needs sentinel_master_name "
                          "(or PIPEFLEET_SENTINEL_MASTER_NAME)")
    return options.sentinel_master_name


def redis_client(url: str, options: RedisOptions | None = None, **client_kwargs: Any) -> Any:
    """A ``redis.Redis`` for ``url`` with ``options``; extra keyword arguments go to the client.

    A ``sentinel://`` URL gives a client of the master that Sentinel names now;
    its connections ask the Sentinels again after a connection error, so the
    client follows a failover. ``rediss://`` gets the TLS files of ``options``, and so do
    the Sentinels and the master with ``options.sentinel_tls``.
    """
    import redis as redis_lib

    options = options or RedisOptions()
    if not is_sentinel(url):
        return redis_lib.Redis.from_url(url, **options.ssl_kwargs(), **client_kwargs)
    from redis.sentinel import Sentinel

    target = parse_sentinel_url(url)
    timeouts = {key: client_kwargs[key] for key in ("socket_timeout", "socket_connect_timeout") if key in client_kwargs}
    sentinel = Sentinel(target.sentinels, sentinel_kwargs={**_sentinel_kwargs(options), **timeouts}, **timeouts)
    return sentinel.master_for(_master_name(options, url), db=target.db, username=target.username,
                               password=target.password, **options.sentinel_tls_kwargs(), **client_kwargs)


def async_redis_pool(url: str, options: RedisOptions | None = None, *, max_connections: int,
                     **client_kwargs: Any) -> Any:
    """A blocking ``redis.asyncio`` connection pool for ``url``: waits for a free connection past its size."""
    import redis.asyncio as aredis_lib

    options = options or RedisOptions()
    if not is_sentinel(url):
        return aredis_lib.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None,
                                                          **options.ssl_kwargs(), **client_kwargs)
    from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

    target = parse_sentinel_url(url)

    class BlockingSentinelPool(SentinelConnectionPool, aredis_lib.BlockingConnectionPool):
        """Sentinel's master discovery with the blocking pool's wait for a free connection."""

    sentinel = Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(options))
    return BlockingSentinelPool(_master_name(options, url), sentinel, db=target.db, username=target.username,
                                password=target.password, max_connections=max_connections, timeout=None,
                                **options.sentinel_tls_kwargs(), **client_kwargs)


PROBE_TIMEOUT_MS = 10
"""While no replica keeps up, one write per :data:`PROBE_INTERVAL_S` waits this long to learn whether one is back."""

PROBE_INTERVAL_S = 1.0
"""How often a degraded :class:`ReplicaWait` checks for a replica again."""


class ReplicaWait:
    """When and how long writes wait for replica acknowledgements (``WAIT``), shared by one client's writes.

    Normally every protected write ends in ``WAIT replicas timeout_ms``. When a
    ``WAIT`` comes back short (the master has lost its replica, as right after
    a failover), the writes that follow stop waiting: one write per
    :data:`PROBE_INTERVAL_S` probes with a :data:`PROBE_TIMEOUT_MS` wait, and full
    waits resume once a replica acknowledges again. Writes made meanwhile are
    not protected: a second failover before a replica catches up could lose
    them (logged once per episode).
    """

    def __init__(self, replicas: int, timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self._degraded_since: float | None = None
        self._next_probe = 0.0

    @property
    def degraded(self) -> bool:
        """True while writes go on without a replica's acknowledgement."""
        return self._degraded_since is not None

    def add(self, pipe: Any) -> bool:
        """Queue ``WAIT`` on ``pipe`` when due (last in the pipeline); returns whether it was queued."""
        if self.replicas <= 0:
            return False
        if self._degraded_since is None:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_INTERVAL_S
        pipe.execute_command("WAIT", self.replicas, PROBE_TIMEOUT_MS)
        return True

    def check(self, acknowledged: Any, what: str) -> None:
        """Record the reply of a queued ``WAIT`` for ``what``."""
        if not isinstance(acknowledged, int):
            return
        if acknowledged >= self.replicas:
            if self._degraded_since is not None:
                logger.warning("a replica acknowledges writes again after %.1f s; writes are protected again",
                               time.monotonic() - self._degraded_since)
            self._degraded_since = None
        elif self._degraded_since is None:
            self._degraded_since = time.monotonic()
            self._next_probe = self._degraded_since + PROBE_INTERVAL_S
            logger.warning("%s reached %d of %d replica(s) within %d ms: writes go on unprotected (a failover "
                           "before a replica catches up could lose them) until a replica acknowledges again",
                           what, acknowledged, self.replicas, self.timeout_ms)

    def execute(self, pipe: Any, what: str) -> list[Any]:
        """Run ``pipe`` with ``WAIT`` added when due; returns the replies of the caller's own commands."""
        waited = self.add(pipe)
        replies = pipe.execute()
        if waited:
            self.check(replies[-1], what)
            return replies[:-1]
        return replies


NO_WAIT = ReplicaWait(0)
"""Writes that wait for no replica."""


def replication_barrier(redis: Any, wait: ReplicaWait) -> None:
    """Return once ``wait.replicas`` replicas hold every write the master took so far, from any connection.

    Replication is one ordered stream, so a replica that holds a write made now
    holds all earlier ones: used after writes made by connections pipefleet does
    not own (Celery's chord and split publishing).
    """
    if wait.replicas <= 0:
        return
    with redis.pipeline(transaction=False) as pipe:
        pipe.set(REPLICATION_BARRIER_KEY, "1", px=60_000)
        wait.execute(pipe, "earlier writes")
