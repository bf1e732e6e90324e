"""Bounds on what a client can make the gateway hold: its request head, and what it leaves unread.

uvicorn's httptools parser has no limit of its own: a client that keeps sending header lines is
buffered without end (four connections of 200,000 1-KB headers took a gateway to almost a gigabyte).
``BoundedHttpTools`` is uvicorn's httptools protocol with two bounds, checked as the bytes arrive:
the size of a request's head (request line and headers, ``STREAMFLEET_GATEWAY_MAX_HEADER_BYTES``) and
the number of its headers (``STREAMFLEET_GATEWAY_MAX_HEADERS``). Past either, the client gets a 431
with a JSON error and the connection is closed; nothing of it reaches the application.

**Clients that stop reading.** A subscriber that reads nothing must not cost the others: each
connection's kernel send buffer and the gateway's own are capped (``SEND_BUFFER``,
``WRITE_HIGH_WATER``: no autotuning to megabytes per idle reader, no host-wide TCP memory pressure),
so the gateway stops writing to it after a couple of hundred events; a connection whose writes have
stayed paused for ``STREAMFLEET_GATEWAY_STALL_SECONDS`` is aborted (its client resumes with
``Last-Event-ID``), one timer per stall and none per event; and an SSE response stops the moment its
connection is lost (``sse.Link``).

Behind a proxy (nginx, an ingress, a load balancer), set the proxy's own header limits at or below
these, so that it answers first; the proxy then holds the slow readers' buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import Settings

from .sse import CONNECTION, Link

SEND_BUFFER = 32 * 1024
"""SO_SNDBUF of every gateway connection (the kernel doubles it for its bookkeeping)."""
WRITE_HIGH_WATER = 16 * 1024
"""Bytes a connection may hold unsent in the gateway before writing to it pauses."""


class _TooLarge(Exception):
    pass


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request head bounded. Subclassed per gateway by
    ``bounded`` with its limits."""

    max_head_bytes = 32 * 1024
    max_headers = 100
    stall_seconds = 15.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0  # bytes of the current request's head so far; None past it
        self._refused = False
        self._stall: asyncio.TimerHandle | None = None
        self._link = Link()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._link.transport = transport
        super().connection_made(transport)

    def pause_writing(self) -> None:
        self._link.paused = True
        super().pause_writing()
        if self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(self.stall_seconds, self._stalled)

    def resume_writing(self) -> None:
        self._link.paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.lost = True
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def _stalled(self) -> None:
        """The client has read nothing for ``stall_seconds``: let it go (it may resume). An abort, not a
        close: a close would wait for the unread buffer to drain first, which is never."""
        self._stall = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_bytes is not None and self._head_bytes > self.max_head_bytes and not self._refused:
            self._refuse(f"the request line and headers are over {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()
        self.scope.setdefault("extensions", {})[CONNECTION] = self._link  # type: ignore[assignment]

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.max_head_bytes:
            self._refuse(f"the request line is over {self.max_head_bytes} bytes")
            raise _TooLarge
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_headers:
            self._refuse(f"the request has over {self.max_headers} headers")
            raise _TooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a 431, the parser's complaint about the aborted request is moot
            super().send_400_response(msg)

    def _refuse(self, message: str) -> None:
        self._refused = True
        body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": 431}})
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        self.transport.close()


def bounded_by(settings: Settings) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http=`` option, with the settings' limits."""
    limits = {
        "max_head_bytes": settings.gateway_max_header_bytes,
        "max_headers": settings.gateway_max_headers,
        "stall_seconds": settings.gateway_stall_seconds,
    }
    return type("BoundedHttpTools", (BoundedHttpTools,), limits)
