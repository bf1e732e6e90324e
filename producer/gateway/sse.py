"""Server-Sent Events out of the gateway: framing and the streaming response (pings come from the
fan-out, as ``None`` events)."""

from __future__ import annotations

from collections.abc import AsyncIterator

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


def sse_response(frames: AsyncIterator[bytes], *, headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})
