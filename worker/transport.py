"""An httpx transport for long streaming responses: HTTP/1.1 on an asyncio protocol, parsed by httptools.

Every upstream token is one small socket read, thousands a second per worker process, which makes the
read path the fleet's hottest loop. httpx's default transport (httpcore + h11, pure Python, a stack of
async layers per read) spent 40-50 µs on each; here a read is one ``data_received`` call, llhttp's C
parser and a wake-up of the job's task. The client API stays httpx's (``Upstream`` builds an
``httpx.AsyncClient`` on this), and httpx still applies base URL, headers and content decoding. An
upstream reached through a proxy from the environment gets httpx's own transport instead
(``Upstream._transport_for``): httpx ignores environment proxies when given a transport.

What it does: http and https (TLS with httpx's default context), happy eyeballs across the host's
addresses, keep-alive pooling per origin (idle connections expire after 5 s), bodies by
Content-Length, chunked, or up to the close (a reset there is an error, not an end), interim 1xx
answers skipped, back-pressure (reading pauses while the job lags; a paused connection is never
pooled), and a connection whose reader is done at its last SSE event returns to the pool once the
body's final marker arrives. What it leaves out, since an OpenAI-compatible upstream needs none of
it: HTTP/2, protocol upgrades (refused), HEAD requests, request bodies streamed in parts (they are
sent whole).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
import ssl
import time
from asyncio.staggered import staggered_race
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

PAUSE_BYTES = 256 * 1024  # stop reading the socket while this much is buffered and unread
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of a response, together
HAPPY_EYEBALLS_S = 0.25  # RFC 8305's connection attempt delay
LINGER_S = 2.0  # how long a finished reader's connection may take to end its body before it is closed
RELEASE_AFTER_BODY = "streamfleet.release_after_body"
"""The response extension a caller that has all it wants (an SSE ``[DONE]``) calls, so the connection
is kept for the next request once the rest of the body (the last chunk marker) has arrived."""
Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; the parser's callbacks fill the state one response is read from."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        # Made by the loop's create_connection. Kept: asyncio.get_running_loop() is a getpid()
        # system call on Python 3.11, and a read would make one.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.max_head_bytes = max_head_bytes
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.received = False
        self.error: Exception | None = None
        self._until_close = False
        self._keep_alive = False
        self._interim = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._head_bytes = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.received = True
        if not self.headers_done:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the upstream switched protocols, which this transport does not do"))
            self.close()
            return
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the upstream sent invalid HTTP: {exc}"))
            self.close()
            return
        if not self.headers_done and self._head_bytes > self.max_head_bytes:
            # httptools buffers an unfinished head without end: bounded here, a read at a time.
            self._fail(httpx.RemoteProtocolError(f"the upstream sent over {self.max_head_bytes} bytes of headers"))
            self.close()
            return
        if self._buffered > PAUSE_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_close and not self.complete and exc is None:
            self.complete = True  # a body without length or chunks ends with the connection (not a reset)
        elif not self.complete:
            reason = f": {exc}" if exc else ""
            self._fail(httpx.RemoteProtocolError(f"the upstream closed the connection mid-response{reason}"))
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:  # interim (100 Continue, 103 Early Hints): the answer follows
            self._interim = True
            self.headers = []
            return
        self.headers_done = True
        framed = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.headers)
        self._until_close = not framed and self.parser.get_status_code() not in (204, 304)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once this callback returns
        self._wake()

    # the reading side
    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def response_head(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self) -> bytes | None:
        """The body bytes received since the last read (waiting for some), or None at its end."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            await self._wait()
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return self.complete and not self.closed and not self._paused and not self._until_close and self._keep_alive

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    def __init__(self, pool: StreamingTransport, origin: Origin, connection: _Connection) -> None:
        self._pool = pool
        self._origin = origin
        self._connection = connection
        self._linger = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (data := await self._connection.read()) is not None:
            yield data

    def release_after_body(self) -> None:
        self._linger = True

    async def aclose(self) -> None:
        """Pool the connection if its response is over; if the reader said it has all it wants, let the
        body end in the background first; otherwise (a cancel, an error) close it at once."""
        connection = self._connection
        if self._linger and not connection.complete and not connection.closed and connection.error is None:
            self._pool._settle(self._origin, connection)
        else:
            self._pool._release(self._origin, connection)


class StreamingTransport(httpx.AsyncBaseTransport):
    """:param ssl_context: for https origins; httpx's default (certifi, hostname checks) when None.
    :param max_idle_per_origin: keep-alive connections kept per origin between requests.
    :param keepalive_expiry: seconds an idle connection may wait for reuse (httpx's default, 5):
        load balancers and NATs drop idle connections without a word, and a request sent on one of
        those would wait for the first-byte timeout.
    :param max_head_bytes: the most a response's status line and headers may take, together."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle_per_origin: int = 100,
        keepalive_expiry: float = 5.0,
        max_head_bytes: int = MAX_HEAD_BYTES,
    ) -> None:
        self._ssl_context = ssl_context
        self._max_head_bytes = max_head_bytes
        self._max_idle = max_idle_per_origin
        self._expiry = keepalive_expiry
        self._idle: dict[Origin, list[_Connection]] = {}
        self._settling: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"this transport speaks http and https, not {url.scheme!r}")
        host = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS want it
        origin: Origin = (url.scheme, host, url.port or (443 if url.scheme == "https" else 80))
        try:
            content = request.content  # a body given as bytes is already read
        except httpx.RequestNotRead:
            content = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        # The body goes out whole, so it is framed by its length, even if httpx planned chunks.
        headers = [(name, value) for name, value in request.headers.raw if name.lower() != b"transfer-encoding"]
        if content and not any(name.lower() == b"content-length" for name, _ in headers):
            headers.append((b"Content-Length", b"%d" % len(content)))
        message = b"".join(
            [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
            + [name + b": " + value + b"\r\n" for name, value in headers]
            + [b"\r\n", content]
        )
        connect_timeout = request.extensions.get("timeout", {}).get("connect")
        while True:
            connection, reused = self._idle_connection(origin), True
            if connection is None:
                connection, reused = await self._connect(origin, connect_timeout), False
            assert connection.transport is not None
            connection.transport.write(message)
            try:
                await connection.response_head()
            except httpx.RemoteProtocolError:
                connection.close()
                if reused and not connection.received:
                    continue  # the server had closed this idle connection: the request never reached it
                raise
            except BaseException:
                connection.close()
                raise
            body = _Body(self, origin, connection)
            return httpx.Response(
                connection.parser.get_status_code(),
                headers=connection.headers,
                stream=body,
                extensions={"http_version": b"HTTP/1.1", RELEASE_AFTER_BODY: body.release_after_body},
            )

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        fresh_since = time.monotonic() - self._expiry
        while idle:
            connection = idle.pop()  # the most recently used first
            if connection.closed:
                continue
            if connection.idle_since < fresh_since:
                connection.close()  # and every older one below it
                for stale in idle:
                    stale.close()
                idle.clear()
                return None
            connection.reset()
            return connection
        return None

    async def _addresses(self, host: str, port: int) -> list[str]:
        """The host's addresses, families interleaved (RFC 8305: IPv6, IPv4, IPv6, ...)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        by_family: dict[int, list[str]] = {}
        for family, _, _, _, address in infos:
            if address[0] not in by_family.setdefault(family, []):
                by_family[family].append(str(address[0]))
        columns = list(by_family.values())
        return [address for row in itertools.zip_longest(*columns) for address in row if address is not None]

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        """Connect, racing the host's addresses a little apart (happy eyeballs, as httpx's own
        transport does): an address that swallows packets (a broken IPv6 route) costs
        ``HAPPY_EYEBALLS_S``, not the whole connect timeout. uvloop has no such option of its own."""
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            tls = self._ssl_context = self._ssl_context or httpx.create_ssl_context()
        loop = asyncio.get_running_loop()
        made: list[_Connection] = []
        winner: _Connection | None = None

        async def attempt(address: str) -> _Connection:
            _, connection = await loop.create_connection(
                lambda: _Connection(self._max_head_bytes), address, port, ssl=tls, server_hostname=host if tls else None
            )
            made.append(connection)
            return connection

        try:
            async with asyncio.timeout(timeout):
                addresses = await self._addresses(host, port)
                if len(addresses) == 1:  # nothing to race (a refusal is an OSError: below)
                    winner, errors = await attempt(addresses[0]), list[Exception | None]()
                else:
                    attempts = [functools.partial(attempt, address) for address in addresses]
                    winner, _, errors = await staggered_race(attempts, HAPPY_EYEBALLS_S)
                assert winner is None or isinstance(winner, _Connection)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:  # DNS, or the one address refused us
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        finally:
            for connection in made:
                if connection is not winner:
                    connection.close()  # a loser that connected as the winner did
        if winner is None:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
            error = next((error for error in reversed(errors) if error is not None), None)
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}") from error
        return winner

    def _settle(self, origin: Origin, connection: _Connection) -> None:
        async def settle() -> None:
            try:
                async with asyncio.timeout(LINGER_S):
                    while await connection.read() is not None:
                        pass
            except Exception:
                connection.close()
            else:
                self._release(origin, connection)

        task = asyncio.get_running_loop().create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if connection.reusable and len(idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        for task in list(self._settling):
            task.cancel()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
