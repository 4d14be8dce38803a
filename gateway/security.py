"""Bearer API keys, compared in constant time, and the rule that keeps a keyless gateway on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from starlette.requests import Request

from gateway.errors import ApiError
from producers.errors import ConfigError

logger = logging.getLogger(__name__)


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison's time independent of the lengths too.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class KeyCheck:
    """Accepts a request whose ``Authorization: Bearer <key>`` matches a configured key.

    Every key is compared, each with :func:`hmac.compare_digest`, so the time
    taken says nothing about which key, or how much of one, matched. With no
    key configured every request passes (the CLI keeps such a gateway on loopback).
    """

    def __init__(self, api_keys: list[str]) -> None:
        self._digests = [_digest(key) for key in api_keys]

    @property
    def enabled(self) -> bool:
        """True when keys are configured."""
        return bool(self._digests)

    async def __call__(self, request: Request) -> None:
        if not self._digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        offered = _digest(token.strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(offered, digest)
        if scheme.lower() != "bearer" or not matched:
            raise ApiError(401, "AuthenticationError",
                           "missing or wrong API key: send 'Authorization: Bearer <key>'")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, has_keys: bool, insecure: bool) -> None:
    """Refuse to listen beyond loopback without API keys, unless ``--insecure``; raises ConfigError."""
    if has_keys or is_loopback(host):
        return
    if not insecure:
        raise ConfigError(f"refusing to listen on {host} without API keys: set [gateway].api_keys "
                          "(or PIPEFLEET_GATEWAY__API_KEYS), bind 127.0.0.1, or pass --insecure")
    logger.warning("gateway listening on %s with no API key (--insecure): anyone who reaches it can submit jobs",
                   host)
