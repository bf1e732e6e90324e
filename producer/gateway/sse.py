"""Server-Sent Events out of the gateway: framing and the streaming response (pings come from the
fan-out, as ``None`` events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

PING = b": ping\n\n"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def frame(data: bytes, *, event: str | None = None, id: str | None = None) -> bytes:
    """One SSE event. ``data`` is JSON, forwarded as it is: JSON with line breaks in its whitespace
    (an upstream's pretty-printed chunk) goes out as several ``data:`` lines, which a client joins
    back with line feeds."""
    head = b""
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return head + b"data: " + data + b"\n\n"


CONNECTION = "streamfleet.connection"
"""The ASGI scope extension under which ``limits.BoundedHttpTools`` puts its ``Link``."""


class Link:
    """A request's connection, as its protocol (``limits.BoundedHttpTools``) knows it: whether it is lost,
    whether writing to it is paused (the client reads slower than the gateway writes), and its
    transport, to write chunks of the response body to directly, with no task woken and no ASGI
    message through the middleware (what the fan-out does for caught-up subscribers)."""

    __slots__ = ("lost", "paused", "transport")

    def __init__(self) -> None:
        self.lost = False
        self.paused = False
        self.transport: Any = None


async def _while_connected(frames: AsyncIterator[bytes], link: Link) -> AsyncIterator[bytes]:
    """Stop at once when the client is gone. uvicorn's ``send`` returns without waiting once a client
    has disconnected, so a generator with events queued would otherwise frame them all in one go,
    never yielding to the loop (300 readers let go at once held every other reader up for seconds)."""
    async for frame in frames:
        if link.lost:
            return
        yield frame


def sse_response(
    request: Request, frames: AsyncIterator[bytes], *, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """A streaming SSE response of ``frames`` that ends when its client goes away."""
    link = request.scope.get("extensions", {}).get(CONNECTION)
    body = _while_connected(frames, link) if isinstance(link, Link) else frames
    return StreamingResponse(body, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})
