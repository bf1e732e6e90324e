"""Bounds on what a client sends before it is authenticated: the request line and headers.

uvicorn's httptools parser has no limit of its own: a client that keeps sending header lines is
buffered without end (four connections of 200,000 1-KB headers took a gateway to almost a gigabyte).
``BoundedHttpTools`` is uvicorn's httptools protocol with two bounds, checked as the bytes arrive:
the size of a request's head (request line and headers, ``STREAMFLEET_GATEWAY_MAX_HEADER_BYTES``) and
the number of its headers (``STREAMFLEET_GATEWAY_MAX_HEADERS``). Past either, the client gets a 431
with a JSON error and the connection is closed; nothing of it reaches the application.

Behind a proxy (nginx, an ingress, a load balancer), set the proxy's own header limits at or below
these, so that it answers first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _TooLarge(Exception):
    pass


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request head bounded. Subclassed per gateway by
    ``bounded`` with its limits."""

    max_head_bytes = 32 * 1024
    max_headers = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0  # bytes of the current request's head so far; None past it
        self._refused = False

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


def bounded(*, max_head_bytes: int, max_headers: int) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http=`` option, with these limits."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {"max_head_bytes": max_head_bytes, "max_headers": max_headers})
