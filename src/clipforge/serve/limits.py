"""Request limits enforced before a body reaches a route: the size of a request body (uploads), and the Host
header of a loopback-only service (so that a web page cannot reach it through DNS rebinding)."""
from __future__ import annotations

import json

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


class BodyTooLarge(Exception):
    """A request body longer than the service accepts."""

    def __init__(self, limit: int):
        super().__init__(f"request body is larger than the limit of {limit:,} bytes; send a smaller image "
                         f"(or start the service with a larger --max-upload-mb)")


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class LimitsMiddleware:
    """Refuses a body over ``max_body`` bytes with 413 (by Content-Length, or while it streams in), and,
    when ``loopback_only``, a Host header that is not a loopback name with 421."""

    def __init__(self, app, max_body: int, loopback_only: bool):
        self.app, self.max_body, self.loopback_only = app, max_body, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.loopback_only and not _is_loopback_host(_header(scope, b"host")):
            return await _refuse(send, 421, "this service answers only requests addressed to 127.0.0.1 or "
                                            "localhost; start it with --host to serve other names")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _refuse(send, 413, str(BodyTooLarge(self.max_body)))
        received = [0]

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        await self.app(scope, counted_receive, send)


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOOPBACK_NAMES
