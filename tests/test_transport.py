"""The lean upstream transport against real sockets: HTTP servers that send exact bytes, TLS included."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trustme

from shared.settings import Settings
from worker.transport import PAUSE_BYTES, RELEASE_AFTER_BODY, StreamingTransport
from worker.upstream import Upstream, UpstreamUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]


@asynccontextmanager
async def server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback server; yields its port and a list that counts accepted connections."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    try:
        yield listener.sockets[0].getsockname()[1], accepted
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await reader.readexactly(length)


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


async def body_of(client: httpx.AsyncClient, url: str) -> tuple[int, bytes]:
    async with client.stream("POST", url, content=b'{"q": 1}') as response:
        return response.status_code, b"".join([data async for data in response.aiter_bytes()])


async def test_chunked_stream_arrives_piece_by_piece_and_the_connection_is_reused() -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in (b"data: 1\n\n", b"data: 2\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with server(handler) as (port, accepted), httpx.AsyncClient(transport=StreamingTransport()) as client:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with client.stream("POST", url, content=b'{"q": 1}') as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            pieces = [data async for data in response.aiter_bytes()]
        assert pieces == [b"data: 1\n\n", b"data: 2\n\n"]  # each write is its own read: no waiting to batch
        assert await body_of(client, url) == (200, b"data: 1\n\ndata: 2\n\n")
        assert len(accepted) == 1
    assert requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:%d\r\n" % port in requests[0].lower()
    assert requests[0].endswith(b'\r\n\r\n{"q": 1}')


async def test_content_length_and_close_delimited_bodies() -> None:
    async def with_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 429 Too Many Requests\r\ncontent-length: 13\r\nretry-after: 2\r\n\r\n{"error": {}}')
        await writer.drain()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\ndata: a\n\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"data: b\n\n")

    async with httpx.AsyncClient(transport=StreamingTransport()) as client:
        async with server(with_length) as (port, _):
            assert await body_of(client, f"http://127.0.0.1:{port}/") == (429, b'{"error": {}}')
        async with server(until_close) as (port, _):
            assert await body_of(client, f"http://127.0.0.1:{port}/") == (200, b"data: a\n\ndata: b\n\n")


async def test_gzip_bodies_are_decoded_by_httpx() -> None:
    import gzip

    payload = gzip.compress(b"data: zipped\n\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunked(payload[:10], payload[10:]))
        await writer.drain()

    async with server(handler) as (port, _), httpx.AsyncClient(transport=StreamingTransport()) as client:
        assert await body_of(client, f"http://127.0.0.1:{port}/") == (200, b"data: zipped\n\n")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\ndata:", "closed the connection mid-response"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nshort", "closed the connection mid-response"),
        (b"NOT HTTP AT ALL\r\n\r\n", "invalid HTTP"),
        (b"", "closed the connection mid-response"),
    ],
)
async def test_broken_answers_raise_httpx_protocol_errors(reply: bytes, message: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with server(handler) as (port, _), httpx.AsyncClient(transport=StreamingTransport()) as client:
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await body_of(client, f"http://127.0.0.1:{port}/")


async def test_connect_errors_are_httpx_connect_errors() -> None:
    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    async with server(nothing) as (port, _):
        pass  # closed: nothing listens on the port any more
    async with httpx.AsyncClient(transport=StreamingTransport()) as client:
        with pytest.raises(httpx.ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
            await body_of(client, f"http://127.0.0.1:{port}/")
        with pytest.raises(httpx.UnsupportedProtocol):
            await body_of(client, "ftp://127.0.0.1/")


async def test_an_idle_connection_the_server_closed_is_replaced_without_an_error() -> None:
    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # then the server drops the kept-alive connection

    async with server(one_answer_then_close) as (port, accepted):
        async with httpx.AsyncClient(transport=StreamingTransport()) as client:
            url = f"http://127.0.0.1:{port}/"
            assert await body_of(client, url) == (200, b"ok")
            await asyncio.sleep(0.2)
            assert await body_of(client, url) == (200, b"ok")
        assert len(accepted) == 2


async def test_tls_checks_the_certificate_and_streams() -> None:
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_tls)
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(b"data: secret\n\n"))
        await writer.drain()

    async with server(handler, server_tls) as (port, _):
        async with httpx.AsyncClient(transport=StreamingTransport(ssl_context=trusted)) as client:
            assert await body_of(client, f"https://localhost:{port}/") == (200, b"data: secret\n\n")
        async with httpx.AsyncClient(transport=StreamingTransport()) as client:  # default trust: not our CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await body_of(client, f"https://localhost:{port}/")


async def test_interim_answers_are_skipped_and_upgrades_refused() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async with httpx.AsyncClient(transport=StreamingTransport()) as client:
        async with server(interim) as (port, _):
            assert await body_of(client, f"http://127.0.0.1:{port}/") == (200, b"ok")
        async with server(upgrade) as (port, _):
            with pytest.raises(httpx.RemoteProtocolError, match="switched protocols"):
                await body_of(client, f"http://127.0.0.1:{port}/")


async def test_a_reset_ends_a_body_read_to_the_close_in_an_error_not_a_short_result() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\ndata: a\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with server(reset) as (port, _), httpx.AsyncClient(transport=StreamingTransport()) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="closed the connection mid-response"):
            await body_of(client, f"http://127.0.0.1:{port}/")


async def test_a_connection_paused_for_back_pressure_is_never_pooled() -> None:
    body = b"x" * (PAUSE_BYTES + 64 * 1024)

    async def big_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async with server(big_answers) as (port, accepted), httpx.AsyncClient(transport=StreamingTransport()) as client:
        url = f"http://127.0.0.1:{port}/"
        async with client.stream("POST", url, content=b"{}") as response:
            await asyncio.sleep(0.2)  # the whole body arrives unread: reading pauses
        async with asyncio.timeout(5):
            assert await body_of(client, url) == (200, body)
        assert len(accepted) == 2
    assert response.status_code == 200


async def test_a_reader_done_at_its_last_event_lets_the_connection_be_reused() -> None:
    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n"))
            await writer.drain()
            await asyncio.sleep(0.05)  # the body's last marker comes a little later
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def done_then_leave(client: httpx.AsyncClient, url: str, *, release: bool) -> None:
        async with client.stream("POST", url, content=b"{}") as response:
            async for data in response.aiter_bytes():
                assert b"[DONE]" in data
                if release:
                    response.extensions[RELEASE_AFTER_BODY]()
                break

    for release, connections in ((True, 1), (False, 3)):
        async with server(sse) as (port, accepted), httpx.AsyncClient(transport=StreamingTransport()) as client:
            for _ in range(3):
                await done_then_leave(client, f"http://127.0.0.1:{port}/", release=release)
                await asyncio.sleep(0.15)
            assert len(accepted) == connections


async def test_a_streamed_request_body_goes_out_framed_by_its_length() -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        yield b'{"a": '
        yield b"1}"

    async with server(handler) as (port, _), httpx.AsyncClient(transport=StreamingTransport()) as client:
        response = await client.post(f"http://127.0.0.1:{port}/", content=parts())
    assert response.status_code == 200
    assert b"transfer-encoding" not in received[0].lower() and received[0].endswith(b'\r\n\r\n{"a": 1}')


async def test_a_connection_idle_past_its_expiry_is_not_reused() -> None:
    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    transport = StreamingTransport(keepalive_expiry=0.2)
    async with server(answers) as (port, accepted), httpx.AsyncClient(transport=transport) as client:
        url = f"http://127.0.0.1:{port}/"
        assert await body_of(client, url) == (200, b"ok")
        assert await body_of(client, url) == (200, b"ok")  # at once: the same connection
        assert len(accepted) == 1
        await asyncio.sleep(0.3)  # past the expiry: a load balancer may have dropped it silently
        assert await body_of(client, url) == (200, b"ok")
        assert len(accepted) == 2


class _Addresses(StreamingTransport):
    """Resolves every host to the addresses given: which of them answers is up to the test."""

    def __init__(self, addresses: list[str], **options: Any) -> None:
        super().__init__(**options)
        self._given = addresses

    async def _addresses(self, host: str, port: int) -> list[str]:
        return self._given


async def test_an_address_that_swallows_packets_costs_a_quarter_second_not_the_connect_timeout() -> None:
    """Happy eyeballs: the first address is a listener whose accept queue is full (the kernel drops
    further SYNs, as a broken route does); the second answers."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async with server(answer) as (port, _):
        full = socket.socket()
        full.bind(("127.0.0.2", port))
        full.listen(0)
        queued = []
        for _ in range(3):  # fill the accept queue; then SYNs go unanswered
            waiting = socket.socket()
            waiting.setblocking(False)
            waiting.connect_ex(("127.0.0.2", port))
            queued.append(waiting)
        await asyncio.sleep(0.1)
        try:
            transport = _Addresses(["127.0.0.2", "127.0.0.1"])
            async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5)) as client:
                started = time.monotonic()
                assert await body_of(client, f"http://example.invalid:{port}/") == (200, b"ok")
                assert time.monotonic() - started < 2  # not the 5 s connect timeout
            with pytest.raises(httpx.ConnectTimeout):
                only_blackhole = _Addresses(["127.0.0.2"])
                async with httpx.AsyncClient(transport=only_blackhole, timeout=httpx.Timeout(0.5)) as client:
                    await body_of(client, f"http://example.invalid:{port}/")
        finally:
            for waiting in queued:
                waiting.close()
            full.close()


async def test_an_upstream_behind_an_environment_proxy_is_reached_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx ignores HTTP(S)_PROXY when given a transport: the worker then uses httpx's own."""
    request_lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        request_lines.append(request.split(b"\r\n", 1)[0])
        event = b'data: {"choices":[{"index":0,"delta":{"content":"via proxy"}}]}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunked(event, b"data: [DONE]\n\n"))
        await writer.drain()

    settings = Settings(upstream_base_url="http://upstream.invalid:9/v1", redis_url="redis://127.0.0.1:1")
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with server(proxy) as (port, _):
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        upstream = Upstream(settings)
        async with upstream.open("chat.completions", request) as events:
            received = [event.data async for event in events]
        assert received[0].endswith(b'"via proxy"}}]}') and received[-1] == b"[DONE]"
        await upstream.aclose()
        assert request_lines == [b"POST http://upstream.invalid:9/v1/chat/completions HTTP/1.1"]

        monkeypatch.setenv("NO_PROXY", "upstream.invalid")  # bypassed: straight to a host that does not exist
        upstream = Upstream(settings)
        with pytest.raises(UpstreamUnreachable):
            async with upstream.open("chat.completions", request):
                pass
        await upstream.aclose()


async def test_the_upstream_request_carries_the_head_httpx_would_give_it() -> None:
    """The worker builds its request from a stream of the body (no header merging a job): its head
    still names the host, the body's length and the key, as a request httpx builds from content."""
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(chunked(b"data: [DONE]\n\n"))
        await writer.drain()

    async with server(upstream) as (port, _):
        settings = Settings(
            upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_api_key="sk-test", redis_url="redis://127.0.0.1:1"
        )
        worker_upstream = Upstream(settings)
        async with worker_upstream.open("chat.completions", {"model": "m", "messages": []}) as events:
            assert [event.data async for event in events] == [b"[DONE]"]
        await worker_upstream.aclose()
        # The request as httpx builds it from content=, through the same transport.
        transport = StreamingTransport()
        headers = {name: value for name, value in worker_upstream._headers.items() if name != "host"}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = heads[0].split(b"\r\n\r\n", 1)[1]
        response = await transport.handle_async_request(httpx.Request("POST", url, headers=headers, content=body))
        await response.aclose()
        await transport.aclose()

    def fields(request: bytes) -> dict[bytes, bytes]:
        lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        return {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}

    ours, httpx_own = fields(heads[0]), fields(heads[1])
    assert heads[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert ours == httpx_own
    assert ours[b"host"] == b"127.0.0.1:%d" % port and ours[b"authorization"] == b"Bearer sk-test"
    assert int(ours[b"content-length"]) == len(body)
