"""A hostile upstream, as a real HTTP server in its own process: every way an upstream can try to
exhaust or mislead a worker. The request body's ``"hostile"`` field picks the answer.

    python tests/hostile_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
import zlib

CHUNK = b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}'


def _gzip_of_zeros(size: int) -> bytes:
    """A gzip body that inflates to ``size`` zero bytes, with no line end anywhere. After a full flush
    the compressor forgets what came before, so each further MiB compresses to the same bytes: the
    body is made in milliseconds. (It has no trailer: nobody should read that far.)"""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * ((size >> 20) - 1)


BOMB = _gzip_of_zeros(2 << 30)  # 2 GiB inflated, about 2 MB on the wire


def _gzip_of_events(size: int) -> bytes:
    """A gzip body that inflates to ``size`` bytes of valid 1-KB events, endlessly many: only a bound
    on the decompressed answer stops it (made as ``_gzip_of_zeros`` is)."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"a" * 1000 + b'"}}]}\n\n'
    block = event * ((1 << 20) // len(event) + 1)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * ((size >> 20) - 1)


EVENT_BOMB = _gzip_of_events(64 << 20)


def _head(status: str, headers: list[tuple[str, str]], body_length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines.append(f"content-length: {body_length}" if body_length is not None else "connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def answer(mode: str, authorization: str, writer: asyncio.StreamWriter) -> None:
    sse = [("content-type", "text/event-stream")]
    if mode == "bomb":
        writer.write(_head("200 OK", [*sse, ("content-encoding", "gzip")], len(BOMB)) + BOMB)
    elif mode == "event_bomb":
        writer.write(_head("200 OK", [*sse, ("content-encoding", "gzip")], len(EVENT_BOMB)) + EVENT_BOMB)
    elif mode == "long_line":
        writer.write(_head("200 OK", sse, None) + b"data: ")
        for _ in range(50):
            writer.write(b"a" * (1 << 20))
            await writer.drain()
    elif mode == "huge_headers":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        for i in range(34 * 1024):
            writer.write(b"x-padding-%d: %s\r\n" % (i, b"p" * 1000))
            if i % 256 == 0:
                await writer.drain()
    elif mode == "huge_error_body":
        body_length = 100 << 20
        writer.write(_head("500 Internal Server Error", [("content-type", "text/plain")], body_length))
        for _ in range(100):
            writer.write(b"e" * (1 << 20))
            await writer.drain()
    elif mode == "html":
        body = b"<html><body><h1>Welcome to the hotel wifi</h1></body></html>"
        writer.write(_head("200 OK", [("content-type", "text/html")], len(body)) + body)
    elif mode == "empty":
        writer.write(_head("200 OK", sse, 0))
    elif mode == "echo_key":
        echoed = {
            "error": {"message": f"invalid key; you sent {authorization}", "headers": {"Authorization": authorization}}
        }
        body = json.dumps(echoed).encode()
        writer.write(_head("401 Unauthorized", [("content-type", "application/json")], len(body)) + body)
    elif mode == "echo_key_in_stream":
        key = authorization.removeprefix("Bearer ")
        error = json.dumps({"error": {"message": f"quota exceeded for key {key}", "type": "insufficient_quota"}})
        body = b"data: " + CHUNK + b"\n\ndata: " + error.encode() + b"\n\n"
        writer.write(_head("200 OK", sse, len(body)) + body)
    elif mode in ("deep", "nan"):
        if mode == "deep":
            chunk = b'{"x":' + b"[" * 100_000 + b"12345678901234567890123" + b"]" * 100_000 + b"}"
        else:
            chunk = b'{"x":[NaN,12345678901234567890123]}'
        body = b"data: " + CHUNK + b"\n\ndata: " + chunk + b"\n\ndata: [DONE]\n\n"
        writer.write(_head("200 OK", sse, len(body)) + body)
    else:
        body = b"data: " + CHUNK + b"\n\ndata: [DONE]\n\n"
        writer.write(_head("200 OK", sse, len(body)) + body)
    await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
        lowered = {name.lower(): value for name, value in headers.items()}
        body = await reader.readexactly(int(lowered.get("content-length", "0")))
        mode = json.loads(body).get("hostile", "")
        await answer(mode, lowered.get("authorization", ""), writer)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
