"""Request body cap, applied before the body is read into memory or any work starts."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import error_response_parts
from producers.errors import PayloadTooLarge


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a body over ``max_bytes``.

    A declared ``Content-Length`` over the cap is refused before anything is
    read; a chunked body is counted as it arrives, and reading past the cap
    raises :class:`PayloadTooLarge` inside the route, which answers 413.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, int(declared))
            return
        received = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(f"the request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope: dict[str, Any], send: Any, size: int) -> None:
        status, body = error_response_parts(
            scope["path"], 413, "PayloadTooLarge",
            f"the request body is {size} bytes; this gateway accepts at most {self.max_bytes}")
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
