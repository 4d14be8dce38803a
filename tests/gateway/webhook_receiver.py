"""A real HTTP server that records webhook deliveries, and can refuse the first ones to a path."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from tests.fleet import wait_until


@dataclass
class Received:
    """One delivery attempt as the receiver saw it (refused or not)."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``receiver.url``; ``refuse[path] = n`` answers 503 to the first ``n`` attempts on ``path``."""

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    refuse: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def accepted(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path and r.status == 200]

    def attempts(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """``predicate()``'s first truthy value; fails listing what the receiver saw."""
        return wait_until(predicate, timeout_s, lambda: f"a delivery; the receiver saw {self.seen()}")

    def seen(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(r.path, r.status) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_receiver(host: str = "127.0.0.1") -> Receiver:
    """Serve on a free port in a daemon thread."""
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with receiver.lock:
                left = receiver.refuse.get(self.path, 0)
                if left:
                    receiver.refuse[self.path] = left - 1
                status = 503 if left else 200
                receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                  body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = Receiver(ThreadingHTTPServer((host, 0), Handler))
    threading.Thread(target=receiver.server.serve_forever, daemon=True).start()
    return receiver
