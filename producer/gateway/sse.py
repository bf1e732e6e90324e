"""Server-Sent Events out of the gateway: framing and the streaming response (pings come from the
fan-out, as ``None`` events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from shared import jsonutil

PING = b": ping\n\n"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def frame(data: bytes, *, event: str | None = None, id: str | None = None) -> bytes:
    """One SSE event; ``data`` is one line of JSON."""
    head = b""
    if id is not None:
        head += b"id: " + id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def frame_json(value: Any, *, event: str | None = None, id: str | None = None) -> bytes:
    return frame(jsonutil.dumps(value), event=event, id=id)


def sse_response(frames: AsyncIterator[bytes], *, headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream", headers={**HEADERS, **(headers or {})})
