"""The upstream client: one shared ``httpx.AsyncClient`` opening OpenAI-compatible streams.

Errors are sorted where behaviour splits:

    UpstreamError               ``.error`` is the contract's Error object; ``.retryable`` says what to do
    ├── UpstreamHTTPError       a non-2xx answer (408, 409, 429 and 5xx are retryable)
    ├── UpstreamUnreachable     connecting failed (retryable)
    ├── UpstreamTimeout         no byte within the read timeout, before or between chunks (retryable)
    ├── UpstreamCut             the body broke off mid-stream (retryable)
    └── UpstreamStreamError     the upstream reported an error inside the stream (final)
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from shared import jsonutil
from shared.models import UPSTREAM_PATHS, Error, make_error
from shared.settings import Settings
from shared.sse import SSEEvent, SSEParser

from .transport import RELEASE_AFTER_BODY, StreamingTransport

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})
DONE_MARKER = b"[DONE]"
"""The data of the Chat Completions stream's last event (Responses streams end without one)."""
MAX_ERROR_BODY = 64 * 1024


class UpstreamError(Exception):
    retryable = False

    def __init__(self, error: Error) -> None:
        super().__init__(error["message"])
        self.error = error


class UpstreamHTTPError(UpstreamError):
    def __init__(self, status: int, body: Any, retry_after: float | None) -> None:
        message = _message_of(body) or f"HTTP {status}"
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
    """An error event inside the stream: the provider's final word on this request."""


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


def stream_error(event: SSEEvent, chunk: Any) -> UpstreamStreamError | None:
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
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
        if settings.upstream_api_key is not None:
            headers["authorization"] = "Bearer " + settings.upstream_api_key.get_secret_value()
        self._connect_timeout = settings.connect_timeout_seconds
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
            transport=transport or self._transport_for(settings),
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
        return StreamingTransport(max_idle_per_origin=settings.concurrency)

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def open(self, endpoint: str, request: dict[str, Any]) -> AsyncIterator[AsyncIterator[SSEEvent]]:
        """Open the stream for ``request``; yields its SSE events. Closing the context closes the
        connection, so a cancelled job stops the upstream at once."""
        body = {**request, "stream": True}
        if endpoint == "chat.completions" and "stream_options" not in body:
            # The fleet's result carries usage; OpenAI sends it only when asked.
            body["stream_options"] = {"include_usage": True}
        try:
            async with self._client.stream("POST", UPSTREAM_PATHS[endpoint], content=jsonutil.dumps(body)) as response:
                if response.status_code >= 300:
                    raw = await response.aread()
                    try:
                        error_body: Any = jsonutil.loads(raw[:MAX_ERROR_BODY])
                    except ValueError:
                        error_body = raw[:2048].decode("utf-8", "replace")
                    raise UpstreamHTTPError(response.status_code, error_body, _retry_after(response))
                yield _events(response)
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


async def _events(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    parser = SSEParser()
    async for data in response.aiter_bytes():
        for event in parser.feed(data):
            if event.data == DONE_MARKER:
                # The reader stops here; the connection is reused once the body's last marker arrives.
                release = response.extensions.get(RELEASE_AFTER_BODY)
                if release is not None:
                    release()
            yield event
    for event in parser.close():
        yield event
