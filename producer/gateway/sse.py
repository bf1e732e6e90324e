"""Server-Sent Events out of the gateway: framing, keep-alive pings, and the streaming response."""

from __future__ import annotations

import asyncio
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


async def with_pings(frames: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """``frames``, with a ``: ping`` comment whenever nothing was sent for ``interval`` seconds."""
    iterator = aiter(frames)
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield PING
                continue
            try:
                piece = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield piece
    finally:
        if pending is not None:
            pending.cancel()


def sse_response(
    frames: AsyncIterator[bytes], *, ping_interval: float, headers: dict[str, str] | None = None
) -> StreamingResponse:
    return StreamingResponse(
        with_pings(frames, ping_interval), media_type="text/event-stream", headers={**HEADERS, **(headers or {})}
    )
