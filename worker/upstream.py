"""The upstream client: one shared ``httpx.AsyncClient`` opening OpenAI-compatible streams.

Errors are sorted where behaviour splits:

    UpstreamError               ``.error`` is the contract's Error object; ``.retryable`` says what to do
    ├── UpstreamHTTPError       a non-2xx answer (408, 409, 429 and 5xx are retryable)
    ├── UpstreamUnreachable     connecting failed (retryable)
    ├── UpstreamTimeout         no byte within the read timeout, before or between chunks (retryable)
    ├── UpstreamCut             the body broke off mid-stream, or ended before any event (retryable)
    └── UpstreamStreamError     the upstream reported an error inside the stream, or sent what is not
                                an event stream: another content type, a line or event over the bound,
                                a body that inflates past its bound (final)

What an upstream says in an error is scrubbed of credentials (``scrub``) before it is kept anywhere:
the key the worker sent, bearer and basic tokens, key-shaped strings, and the values of
authorization headers echoed back. Everything read from an upstream is bounded (``bounded_body``,
the SSE parser, the transport's header bound).
"""

from __future__ import annotations

import logging
import re
import urllib.request
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from shared import jsonutil
from shared.models import UPSTREAM_PATHS, Error, fleet_asks_usage, make_error
from shared.settings import Settings
from shared.sse import SSEEvent, SSEParser, SSETooLarge

from .transport import RELEASE_AFTER_BODY, StreamingTransport

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
DONE_MARKER = b"[DONE]"
"""The data of the Chat Completions stream's last event (Responses streams end without one)."""
MAX_ERROR_BODY = 64 * 1024
"""The most of an error answer's body that is read (the rest is left unread)."""
DECODE_STEP = 64 * 1024
"""A compressed body is inflated this much at a time: a bomb never sits in memory whole."""
REDACTED = "[redacted]"
MAX_MODELS_BODY = 1024 * 1024


class UpstreamError(Exception):
    retryable = False

    def __init__(self, error: Error) -> None:
        super().__init__(error["message"])
        self.error = error


class UpstreamHTTPError(UpstreamError):
    def __init__(self, status: int, body: Any, retry_after: float | None, secrets: tuple[str, ...] = ()) -> None:
        message = scrub(_message_of(body) or f"HTTP {status}", secrets)
        super().__init__(
            make_error("upstream_error", f"upstream answered {status}: {message}", status=status, upstream=body)
        )
        self.status = status
        self.retry_after = retry_after
        self.retryable = status in RETRYABLE_STATUS or status >= 500


class UpstreamUnreachable(UpstreamError):
    retryable = True


class UpstreamTimeout(UpstreamError):
    retryable = True


class UpstreamCut(UpstreamError):
    retryable = True


class UpstreamStreamError(UpstreamError):
    """An error event inside the stream (the provider's final word on this request), or a body that
    is no event stream at all."""


# Scrubbing ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=:-]{8,}")
_KEY_SHAPED = re.compile(r"\b(?:sk|pk|rk|gsk|xai|api|key)[-_][A-Za-z0-9_-]{16,}")
_SECRET_FIELDS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "api_key", "apikey", "x-api-key", "x-goog-api-key", "key"}
)


def scrub(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    """``value`` (text, or parsed JSON) with credentials replaced by ``[redacted]``: each of
    ``secrets`` wherever it appears, bearer/basic tokens, key-shaped strings (``sk-...``), and the
    value of any field named like an authorization header."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        value = _TOKEN.sub(lambda match: f"{match[1]}{match[2]}{REDACTED}", value)
        return _KEY_SHAPED.sub(REDACTED, value)
    if isinstance(value, dict):
        return {
            key: REDACTED if str(key).lower() in _SECRET_FIELDS and value[key] else scrub(item, secrets)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [scrub(item, secrets) for item in value]
    return value


# Reading bodies, bounded ----------------------------------------------------------------------------


class _Inflate:
    """Undoes a ``content-encoding`` a step at a time, never more than ``DECODE_STEP`` per piece."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            self._zlib = None
        elif encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj()
        else:
            raise UpstreamStreamError(
                make_error("upstream_error", f"the upstream sent content-encoding {encoding[:40]!r}, which is not read")
            )

    def pieces(self, data: bytes) -> Iterable[bytes]:
        """The decoded bytes of ``data``, a step at a time: each piece is used before the next is made."""
        return (data,) if self._zlib is None else self._inflated(data)  # no generator a read when identity

    def _inflated(self, data: bytes) -> Iterator[bytes]:
        assert self._zlib is not None
        try:
            yield self._zlib.decompress(data, DECODE_STEP)
            while self._zlib.unconsumed_tail:
                yield self._zlib.decompress(self._zlib.unconsumed_tail, DECODE_STEP)
        except zlib.error as exc:
            error = make_error("upstream_error", f"the upstream's compressed body is corrupt: {exc}")
            raise UpstreamStreamError(error) from None


def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, from the transport's stream itself: httpx's ``aiter_raw``
    adds a chunker and a context manager for every read, a per-token cost for nothing here."""
    assert isinstance(response.stream, httpx.AsyncByteStream)
    return response.stream.__aiter__()


async def bounded_body(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of a response's (decoded) body; the rest is never read."""
    inflate = _Inflate(response.headers.get("content-encoding", ""))
    kept: list[bytes] = []
    size = 0
    async for data in _raw(response):
        for piece in inflate.pieces(data):
            kept.append(piece[: limit - size])
            size += len(kept[-1])
            if size >= limit:
                return b"".join(kept)
    return b"".join(kept)


def _excerpt(raw: bytes, secrets: tuple[str, ...]) -> Any:
    """What an answer's body says, for an error: its JSON, or the start of its text, scrubbed."""
    try:
        body: Any = jsonutil.loads(raw)
    except ValueError:
        body = raw[:2048].decode("utf-8", "replace")
    return scrub(body, secrets)


def _message_of(body: Any) -> str | None:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def stream_error(event: SSEEvent, chunk: Any, secrets: tuple[str, ...] = ()) -> UpstreamStreamError | None:
    """The error an upstream reported inside its stream, if this event is one.

    Seen in practice: ``event: error`` (Groq), a chunk with a top-level ``error`` object, with or
    without ``choices`` (OpenRouter), and Responses' ``type: "error"`` and ``response.failed``.
    """
    if not isinstance(chunk, dict):
        return None
    body: Any = None
    if event.event == "error" or chunk.get("type") == "error":
        body = chunk
    elif isinstance(chunk.get("error"), dict):
        body = chunk
    elif chunk.get("type") == "response.failed":
        response = chunk.get("response") or {}
        body = {"error": response.get("error")} if isinstance(response, dict) else chunk
    if body is None:
        return None
    body = scrub(body, secrets)
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    status = next(
        (
            value
            for value in (error.get("status_code"), error.get("code"), error.get("status"))
            if isinstance(value, int) and 400 <= value < 600
        ),
        None,
    )
    message = _message_of(body) or str(error.get("message") or error.get("type") or "error in stream")
    return UpstreamStreamError(
        make_error("upstream_error", f"upstream error in stream: {message}", status=status, upstream=body)
    )


class Upstream:
    """Opens streaming requests against the configured OpenAI-compatible base URL.

    :param settings: base URL, key and timeouts come from here; the key never leaves this object.
    :param transport: the httpx transport; by default ``StreamingTransport``, the fleet's lean HTTP/1.1 read path.
    """

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        # Identity: an event stream gains nothing from compression but latency. One that comes
        # compressed anyway is inflated a step at a time (``_Inflate``).
        headers = {"accept": "text/event-stream", "content-type": "application/json", "accept-encoding": "identity"}
        self.secrets: tuple[str, ...] = ()
        """What must never be kept from an upstream's answer (the key this worker sends)."""
        if settings.upstream_api_key is not None:
            key = settings.upstream_api_key.get_secret_value()
            headers["authorization"] = "Bearer " + key
            self.secrets = (key,)
        self._connect_timeout = settings.connect_timeout_seconds
        self._max_event_bytes = settings.upstream_max_event_bytes
        self._max_body_bytes = settings.upstream_max_body_bytes
        transport = transport or self._transport_for(settings)
        self._direct = transport if isinstance(transport, StreamingTransport) else None
        base = httpx.URL(settings.upstream_base_url.rstrip("/") + "/")
        self._urls = {endpoint: base.join(path.lstrip("/")) for endpoint, path in UPSTREAM_PATHS.items()}
        # What httpx adds to a request made with content= (Host first; Content-Length the transport
        # adds), given once: building a request from a stream skips ~12 us of header merging a job.
        self._headers = httpx.Headers({"host": base.netloc.decode("ascii"), "user-agent": "streamfleet", **headers})
        self._extensions = {"timeout": {"connect": settings.connect_timeout_seconds}}
        self._client = httpx.AsyncClient(
            base_url=settings.upstream_base_url.rstrip("/"),
            headers=headers,
            # Read timeouts are the supervisor's (first byte, idle): one check per tick, not a timer per read.
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_seconds,
                read=None,
                write=settings.connect_timeout_seconds,
                pool=None,
            ),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=settings.concurrency),
            transport=transport,
        )

    @staticmethod
    def _transport_for(settings: Settings) -> httpx.AsyncBaseTransport | None:
        """The lean transport, unless the environment routes the upstream through a proxy
        (HTTP(S)_PROXY / ALL_PROXY, minus NO_PROXY): then httpx's own, which speaks to proxies (``None``
        keeps httpx's default, environment proxies included)."""
        url = httpx.URL(settings.upstream_base_url)
        proxies = urllib.request.getproxies_environment()
        bypass = urllib.request.proxy_bypass_environment(url.host)  # type: ignore[attr-defined]
        if (proxies.get(url.scheme) or proxies.get("all")) and not bypass:
            logger.info("upstream %s goes through a proxy: httpx's own transport", url.host)
            return None
        return StreamingTransport(
            max_idle_per_origin=settings.concurrency, max_head_bytes=settings.upstream_max_header_bytes
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def models(self) -> list[dict[str, Any]] | None:
        """The upstream's model list (``GET /models``), or ``None`` if it will not say."""
        try:
            async with self._client.stream("GET", "/models", headers={"accept": "application/json"}) as response:
                raw = await bounded_body(response, MAX_MODELS_BODY)
                if response.status_code != 200:
                    return None
        except (httpx.HTTPError, UpstreamError):
            return None
        try:
            listed = jsonutil.loads(raw)
        except ValueError:
            return None
        data = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(data, list):
            return None
        return [scrub(model, self.secrets) for model in data if isinstance(model, dict) and "id" in model]

    @asynccontextmanager
    async def _send(self, endpoint: str, content: bytes) -> AsyncIterator[httpx.Response]:
        """POST ``content``; the response, streaming. On the fleet's own transport the request goes to
        it directly: httpx's client would merge the URL, the headers and the cookies again for every
        job, and run its auth and redirect steps (about a sixth of a worker's CPU at 2,000 streams),
        none of which an upstream request needs. Through a proxy, httpx's client does it all."""
        if self._direct is None:
            async with self._client.stream("POST", UPSTREAM_PATHS[endpoint], content=content) as response:
                yield response
            return
        request = httpx.Request(
            "POST",
            self._urls[endpoint],
            headers=self._headers,
            stream=httpx.ByteStream(content),
            extensions=self._extensions,
        )
        request.read()  # the body in hand, as content= would have it
        response = await self._direct.handle_async_request(request)
        try:
            yield response
        finally:
            await response.aclose()

    @asynccontextmanager
    async def open(self, endpoint: str, request: dict[str, Any]) -> AsyncIterator[AsyncIterator[SSEEvent]]:
        """Open the stream for ``request``; yields its SSE events. Closing the context closes the
        connection, so a cancelled job stops the upstream at once."""
        body = {**request, "stream": True}
        if endpoint == "chat.completions" and fleet_asks_usage(request):
            # The fleet's result carries usage; OpenAI sends it only when asked.
            body["stream_options"] = {"include_usage": True}
        try:
            async with self._send(endpoint, jsonutil.dumps(body)) as response:
                if response.status_code >= 300:
                    raw = await bounded_body(response, MAX_ERROR_BODY)
                    raise UpstreamHTTPError(
                        response.status_code, _excerpt(raw, self.secrets), _retry_after(response), self.secrets
                    )
                kind = response.headers.get("content-type", "")
                if kind and "text/event-stream" not in kind.lower():
                    # A wrong base URL, a captive portal, a gateway that ignored `stream`: say what came back.
                    raw = await bounded_body(response, MAX_ERROR_BODY)
                    message = (
                        f"the upstream answered {response.status_code} with {kind.split(';')[0][:60]}, "
                        "not an event stream (is STREAMFLEET_UPSTREAM_BASE_URL right?)"
                    )
                    error = make_error(
                        "upstream_error", message, status=response.status_code, upstream=_excerpt(raw, self.secrets)
                    )
                    raise UpstreamStreamError(error)
                yield _events(response, self._max_event_bytes, self._max_body_bytes)
        except httpx.ConnectTimeout as exc:
            raise UpstreamTimeout(
                make_error(
                    "timeout", f"connecting to the upstream took over {self._connect_timeout:g} s (connect timeout)"
                )
            ) from exc
        except (httpx.ConnectError, httpx.WriteError) as exc:
            raise UpstreamUnreachable(
                make_error("upstream_unreachable", f"cannot connect to the upstream: {exc}")
            ) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(make_error("timeout", f"the upstream timed out: {exc}")) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise UpstreamCut(make_error("upstream_error", f"the upstream stream broke off: {exc}")) from exc


async def _events(response: httpx.Response, max_event_bytes: int, max_body_bytes: int) -> AsyncIterator[SSEEvent]:
    parser = SSEParser(max_event_bytes=max_event_bytes)
    inflate = _Inflate(response.headers.get("content-encoding", ""))
    seen = False
    size = 0
    try:
        async for data in _raw(response):
            for piece in inflate.pieces(data):
                size += len(piece)
                if size > max_body_bytes:
                    message = (
                        f"the upstream's answer passed {max_body_bytes} bytes (STREAMFLEET_UPSTREAM_MAX_BODY_BYTES)"
                    )
                    raise UpstreamStreamError(make_error("upstream_error", message))
                for event in parser.feed(piece):
                    seen = True
                    if event.data == DONE_MARKER:
                        # The reader stops here; the connection is reused once the body's last marker arrives.
                        release = response.extensions.get(RELEASE_AFTER_BODY)
                        if release is not None:
                            release()
                    yield event
        for event in parser.close():
            seen = True
            yield event
    except SSETooLarge as exc:
        raise UpstreamStreamError(make_error("upstream_error", str(exc))) from None
    if not seen:
        raise UpstreamCut(make_error("upstream_error", "the upstream's stream ended before its first event"))
