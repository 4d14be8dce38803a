"""The SSRF rules every outbound URL obeys, media fetches and webhook deliveries alike.

- the scheme is ``http`` or ``https``;
- the host is on the allowlist (an exact name, or ``*.example.com`` for any subdomain);
- every address the host resolves to is public (no loopback, private, link-local, multicast,
  reserved or unspecified address, so no cloud metadata endpoint) unless the host is listed in
  ``allow_private_hosts``;
- the connection goes to the address that was checked (DNS cannot change between check and use);
- a redirect is a new URL and passes the same checks before it is followed.

Each failure raises the error class the caller names (``MediaError`` for media,
``UnsafeURL`` for webhooks), with a message naming the URL without its query or credentials.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from producers.errors import PipefleetError, UnsafeURL

URL_SCHEMES = ("http", "https")
"""URL schemes that are ever fetched or posted to."""

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
"""HTTP statuses that carry a ``Location`` to follow (after checking it)."""


def normalise_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """Host patterns as the checks compare them: lower case, no trailing dot."""
    return frozenset(host.strip().lower().rstrip(".") for host in hosts)


def redact(url: str) -> str:
    """``url`` without credentials, query or fragment: fit for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def host_allowed(host: str, allowed_hosts: frozenset[str]) -> bool:
    """Exact match, or ``*.example.com`` matching any subdomain (not the apex)."""
    host = host.lower().rstrip(".")
    for pattern in allowed_hosts:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for loopback, private, link-local (metadata), multicast, reserved and unspecified addresses."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (address.is_private or address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_reserved or address.is_unspecified)


def vetted_address(host: str, port: int, allow_private_hosts: frozenset[str], shown: str,
                   error: type[PipefleetError] = UnsafeURL) -> str:
    """Resolve ``host`` and return one address to connect to, refusing non-public ones."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise error(f"cannot resolve host {host!r} of {shown}: {e}") from e
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise error(f"cannot resolve host {host!r} of {shown}")
    if host.lower().rstrip(".") not in allow_private_hosts:
        # Every address must be public: the resolver could hand a later connection any of them.
        for address in addresses:
            if not is_public_address(address):
                raise error(f"host {host!r} of {shown} resolves to a private address ({address}); "
                            "add it to allow_private_hosts to allow it")
    return str(addresses[0])


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the rules: where to connect, and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    target: str
    shown: str


def check_url(url: str, allowed_hosts: frozenset[str], allow_private_hosts: frozenset[str],
              error: type[PipefleetError] = UnsafeURL) -> CheckedURL:
    """Apply every rule to ``url`` (DNS included); raises ``error`` naming the first one it breaks."""
    shown = redact(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise error(f"unsupported URL scheme {scheme!r} in {shown}")
    host = parts.hostname
    if not host:
        raise error(f"URL has no host: {shown}")
    if not host_allowed(host, allowed_hosts):
        raise error(f"host {host!r} of {shown} is not on the allowlist")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise error(f"invalid port in {shown}") from e
    address = vetted_address(host, port, allow_private_hosts, shown, error)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return CheckedURL(scheme, host, port, address, target, shown)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the vetted address, so DNS cannot change between check and use."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = self.pinned_sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to the vetted address, with SNI and certificate checks against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.pinned_sock = self._context.wrap_socket(sock, server_hostname=self.host)


def pinned_connection(checked: CheckedURL, timeout_s: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to ``checked``'s vetted address (``.pinned_sock`` once connected)."""
    cls = _PinnedHTTPSConnection if checked.scheme == "https" else _PinnedHTTPConnection
    return cls(checked.host, checked.port, checked.address, timeout=timeout_s)
