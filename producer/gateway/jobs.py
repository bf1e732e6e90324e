"""The jobs API: submit, status, resumable SSE events, cancel."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.models import DELTA
from shared.store import Entry, format_id, parse_id
from shared.store import parse_cursor as check_cursor

from ..fanout import Direct, ReadFailed, SlowSubscriber, StreamGone
from . import metrics
from .bodies import StrictJSONRoute
from .sse import CONNECTION, HEADERS, PING, Link, frame, sse_response
from .state import Gateway, gateway_of

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJSONRoute)

RECONNECT_MS = 2000
"""The ``retry:`` every events stream opens with: a browser's wait before it reconnects."""


class JobSubmission(BaseModel):
    request: dict[str, Any] = Field(description="The OpenAI request body, as the upstream should get it.")
    endpoint: Literal["chat.completions", "responses"] = "chat.completions"
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    events_url: str


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "error", "cancelled"]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def event_frame(entry: Entry) -> bytes:
    """The SSE frame of an event, from its stored bytes: nothing is parsed or serialized again."""
    if entry.type == DELTA:
        data = b'{"attempt":%d,"chunk":%b}' % (entry.attempt, entry.body)
    else:
        data = entry.body
    return frame(data, event=entry.type, id=entry.id)


class _FrameCache:
    """Every subscriber of a job gets the same bytes for an event: frame it once (and, for the
    subscribers the fan-out writes to directly, frame it once as a chunk of a chunked body)."""

    def __init__(self, size: int = 20_000) -> None:
        self._frames: OrderedDict[tuple[str, str], tuple[bytes, bytes]] = OrderedDict()
        self._size = size
        self._last: tuple[Entry | None, tuple[bytes, bytes]] = (None, (b"", b""))
        """The last entry framed and its frames: the fan-out hands one entry to every subscriber in a row."""

    def _both(self, job_id: str, entry: Entry) -> tuple[bytes, bytes]:
        last, frames = self._last
        if entry is last:
            return frames
        key = (job_id, entry.id)
        cached = self._frames.get(key)
        if cached is None:
            data = event_frame(entry)
            cached = self._frames[key] = (data, b"%x\r\n%b\r\n" % (len(data), data))
            if len(self._frames) > self._size:
                self._frames.popitem(last=False)
        self._last = (entry, cached)
        return cached

    def get(self, job_id: str, entry: Entry) -> bytes:
        return self._both(job_id, entry)[0]

    def chunk(self, job_id: str, entry: Entry) -> bytes:
        last, frames = self._last
        return frames[1] if entry is last else self._both(job_id, entry)[1]  # once per subscriber: no call


PING_CHUNK = b"%x\r\n%b\r\n" % (len(PING), PING)


FRAMES = _FrameCache()


def parse_cursor(value: str | None) -> str:
    """The cursor of ``Last-Event-ID`` / ``?after=``: from the start when absent; a malformed one is
    ``InvalidRequest`` (a 400), never a silent full replay."""
    if value is None or value == "":
        return "0"
    return format_id(check_cursor(value))


async def status_of(gateway: Gateway, job_id: str) -> JobStatus:
    status = await gateway.fleet.status(job_id)
    return JobStatus(id=job_id, status=status["status"], result=status.get("result"), error=status.get("error"))


@router.post("", status_code=202, response_model=JobAccepted)
async def submit(
    body: JobSubmission,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)] = None,
) -> JobAccepted:
    """Queue a generation; its events are at ``events_url``."""
    gateway = gateway_of(request)
    tenant = gateway.auth.tenant(request)
    job_id = await gateway.fleet.submit(
        body.request,
        endpoint=body.endpoint,
        idempotency_key=body.idempotency_key or idempotency_key,
        tenant=tenant,
    )
    return JobAccepted(id=job_id, events_url=f"/v1/jobs/{job_id}/events")


@router.get("/{job_id}", response_model=JobStatus, response_model_exclude_none=True)
async def get_job(job_id: str, request: Request) -> JobStatus:
    """The job's status, with its result or error once it has ended."""
    gateway = gateway_of(request)
    await gateway.job_for(request, job_id)
    return await status_of(gateway, job_id)


@router.get("/{job_id}/events", response_class=StreamingResponse)
async def job_events(
    job_id: str,
    request: Request,
    after: Annotated[str | None, Query(description="Start after this event id.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    token: Annotated[str | None, Query(description="A read token for this job (browsers).")] = None,
) -> Response:
    """The job's events as SSE, from the start or after ``Last-Event-ID`` / ``?after=``, live, until
    the terminal event; a 204 when the cursor is at or past the end. ``: ping`` comments keep an
    idle connection open. ``?token=`` (``POST /v1/jobs/{id}/tokens``) stands in for the key."""
    gateway = gateway_of(request)
    cursor = parse_cursor(last_event_id if last_event_id is not None else after)
    await gateway.job_for(request, job_id, scope=job_id)
    ended = await gateway.fleet.stores.streams.ended_at(job_id) if cursor != "0-0" else None
    if ended is not None and parse_id(ended) <= parse_id(cursor):
        # Resumed at or after the end (every EventSource does this after a normal end): nothing more
        # will come, and a 204 is what makes a browser stop reconnecting.
        return Response(status_code=204)
    link = request.scope.get("extensions", {}).get(CONNECTION)
    if isinstance(link, Link):
        return _Events(gateway, job_id, cursor, link)
    return sse_response(request, event_frames(gateway, job_id, cursor))  # served by another server


RETRY_FRAME = b"retry: %d\n\n" % RECONNECT_MS
_ENDINGS = {
    SlowSubscriber: b": too slow; reconnect with Last-Event-ID to resume\n\n",
    ReadFailed: b": the gateway could not read this job's events; reconnect with Last-Event-ID to resume\n\n",
    StreamGone: b": the job's stream expired\n\n",
}


async def event_frames(
    gateway: Gateway, job_id: str, cursor: str, direct: Direct | None = None
) -> AsyncIterator[bytes]:
    """The job's SSE frames; with ``direct``, those the fan-out does not write itself."""
    metrics.OPEN_STREAMS.inc()
    yield RETRY_FRAME  # how long a browser waits before it reconnects with Last-Event-ID
    try:
        async for entry in gateway.fanout.events(job_id, after=cursor, direct=direct):
            if entry is None:
                yield PING
                continue
            metrics.EVENTS_SENT.inc()
            yield FRAMES.get(job_id, entry)
    except (SlowSubscriber, ReadFailed, StreamGone) as ended:
        if isinstance(ended, SlowSubscriber):
            metrics.SLOW_SUBSCRIBERS.inc()
        yield _ENDINGS[type(ended)]
    finally:
        metrics.OPEN_STREAMS.dec()


class _Events(Response):
    """The events route's response, on the gateway's own protocol: while the subscriber is caught up,
    the fan-out's reader writes each event's frame (encoded once for every subscriber) straight to
    its connection, with no task woken and no ASGI message through the middleware for it: the cost
    of an event to a subscriber is one write. The rest (the catch-up, and whatever comes while the
    client reads slower than the gateway writes) goes out through ASGI as usual, with flow control."""

    def __init__(self, gateway: Gateway, job_id: str, cursor: str, link: Link) -> None:
        super().__init__()
        # Chunked (no content-length): the body is written as it comes.
        self.raw_headers = [
            (b"content-type", b"text/event-stream"),
            *((k.encode(), v.encode()) for k, v in HEADERS.items()),
        ]
        self.gateway, self.job_id, self.cursor, self.link = gateway, job_id, cursor, link

    def _direct(self, entry: Entry | None) -> bool:
        link = self.link
        if link.lost or link.paused:
            return False
        link.transport.write(PING_CHUNK if entry is None else FRAMES.chunk(self.job_id, entry))
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in event_frames(self.gateway, self.job_id, self.cursor, self._direct):
            if self.link.lost:
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class TokenRequest(BaseModel):
    ttl_seconds: int | None = Field(default=None, gt=0, le=3600, description="Seconds the token is good for.")


class ReadToken(BaseModel):
    token: str
    expires_at: int
    events_url: str


@router.post("/{job_id}/tokens", response_model=ReadToken)
async def read_token(job_id: str, request: Request, body: TokenRequest | None = None) -> ReadToken:
    """A short-lived token that reads this job's events and nothing else (``?token=`` on its events
    route), for a browser: mint it on your backend with your key and hand it to the page."""
    gateway = gateway_of(request)
    tenant = await gateway.job_for(request, job_id)
    ttl = (body.ttl_seconds if body is not None else None) or gateway.auth.token_ttl_s
    token, expires = gateway.auth.mint(job_id, tenant, ttl)
    return ReadToken(token=token, expires_at=expires, events_url=f"/v1/jobs/{job_id}/events?token={token}")


@router.post("/{job_id}/cancel", response_model=JobStatus, response_model_exclude_none=True)
async def cancel(job_id: str, request: Request) -> JobStatus:
    """Cancel the job (idempotent); ``cancelled`` follows on its stream within a second."""
    gateway = gateway_of(request)
    await gateway.job_for(request, job_id)
    await gateway.fleet.cancel(job_id)
    return await status_of(gateway, job_id)
