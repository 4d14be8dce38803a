"""Request body cap, applied before the body is read into memory or any work starts."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import error_response_parts


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a body over ``max_bytes``.

    A declared ``Content-Length`` over the cap is refused before anything is
    read. A body without one (chunked) is read here, never past the cap, and
    handed on whole, or refused as soon as it passes the cap.
    """

    def __init__(self, app: Any, max_bytes: int, overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        self.overrides = dict(overrides or {})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.overrides.get(scope["path"], self.default_max_bytes)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > max_bytes:
                await self._refuse(scope, send, f"the request body is {int(declared)} bytes", max_bytes)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await self._refuse(scope, send, f"the request body passed {max_bytes} bytes", max_bytes)
                return
            if not message.get("more_body", False):
                break
        buffered = iter(messages)

        async def replay() -> dict[str, Any]:
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], send: Any, what: str, max_bytes: int) -> None:
        status, body = error_response_parts(
            scope["path"], 413, "PayloadTooLarge", f"{what}; this gateway accepts at most {max_bytes}")
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
