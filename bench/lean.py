"""The floor: the leanest reader of an SSE stream there is here, on raw asyncio streams.

It sends the request, reads the answer's chunks or its body to the close, and yields each event's
``data`` bytes. No HTTP library, no parsing beyond finding line ends: what any consumer must at
least spend per event. The benchmarks' "direct" baselines read the upstream with it, so that the
fleet is never compared to a client slower than itself (httpx's default client costs about 70 µs
an event, more than the whole fleet's path).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator


async def sse_data(host: str, port: int, path: str, body: bytes) -> AsyncIterator[bytes]:
    """POST ``body`` to ``path`` and yield the ``data`` of each SSE event of the answer."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(
        b"POST %b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\naccept: text/event-stream\r\n"
        b"content-length: %d\r\n\r\n%b" % (path.encode(), host.encode(), len(body), body)
    )
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        chunked = b"transfer-encoding: chunked" in head
        pending = b""
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    return
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
            pending += data
            while (end := pending.find(b"\n\n")) >= 0:
                event, pending = pending[:end], pending[end + 2 :]
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        yield line[6:]
    finally:
        writer.close()
