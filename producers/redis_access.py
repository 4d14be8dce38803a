"""Calls to Redis with pipefleet's error mapping: refused credentials and outages become FleetUnavailable.

Every producers module that talks to Redis goes through one :class:`RedisAccess`
(``client.access``), so a wrong password reads the same from ``submit()``,
``result()``, ``status()`` and ``client.map``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import redis as redis_lib
from kombu.exceptions import OperationalError

from producers.errors import FleetUnavailable

T = TypeVar("T")

OUTAGE_ERRORS = (redis_lib.ConnectionError, redis_lib.TimeoutError, OperationalError)
"""Errors that mean Redis is unreachable right now (a refused password is one too, in redis-py)."""


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages and logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def is_refusal(error: BaseException) -> bool:
    """True when Redis refused our credentials (as opposed to being unreachable)."""
    if isinstance(error, redis_lib.AuthenticationError):
        return True
    return isinstance(error, redis_lib.ResponseError) and ("NOAUTH" in str(error) or "WRONGPASS" in str(error))


def as_fleet_unavailable(error: BaseException, url: str) -> FleetUnavailable | None:
    """The FleetUnavailable a Redis error stands for, or None when it is some other error."""
    if isinstance(error, redis_lib.AuthenticationError):
        return FleetUnavailable(f"Redis at {safe_url(url)} refused the credentials: {error}")
    if is_refusal(error):
        return FleetUnavailable(f"Redis at {safe_url(url)} needs a password: {error}")
    if isinstance(error, OUTAGE_ERRORS):
        return FleetUnavailable(f"cannot reach Redis at {safe_url(url)}: {error}")
    return None


class RedisAccess:
    """Runs Redis calls for one client and maps their failures onto :class:`FleetUnavailable`."""

    def __init__(self, redis: Any, url: str) -> None:
        self.redis = redis
        self.url = url
        self._checked = False

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)``; a refused password or an outage raises FleetUnavailable."""
        try:
            return function(*args, **kwargs)
        except (redis_lib.RedisError, OperationalError) as error:
            mapped = as_fleet_unavailable(error, self.url)
            if mapped is None:
                raise
            raise mapped from error

    @property
    def checked(self) -> bool:
        """True once Redis has accepted this client's credentials."""
        return self._checked

    def check(self) -> None:
        """Raise FleetUnavailable if Redis refuses our credentials; an outage is left to the retries.

        Result waits retry through a Redis restart, and redis-py counts a refused
        password as a connection error, so without this check a wrong password
        would be retried for minutes instead of reported. Once Redis has accepted
        us, the check is skipped: it would cost a round trip per job.
        """
        if self._checked:
            return
        try:
            self.call(self.redis.ping)
        except FleetUnavailable as error:
            if error.__cause__ is not None and is_refusal(error.__cause__):
                raise
            return
        self._checked = True
