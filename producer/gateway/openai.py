"""OpenAI-compatible routes: Chat Completions and the Responses API with background mode, each request
run as a fleet job, so the official SDK works unchanged against ``base_url=<gateway>/v1``.

**Retries inside a job.** A retry before the client got anything is invisible. Once a client has
been sent events of an attempt that then fails, it cannot be made to unsee them, and the next attempt
would not repeat them word for word: its response ends with an error event instead (the job goes on
in the fleet, and ``X-Streamfleet-Job-Id`` names it). A client that joins or resumes later is only
ever shown the current attempt.

**Background responses.** ``POST /v1/responses`` with ``background: true`` answers at once with the
queued Response, whose id is the job id; ``GET /v1/responses/{id}?stream=true&starting_after=N``
resumes its events after sequence number N for as long as the job is retained (no 5-minute window).
Events keep the upstream's ``sequence_number``; where it sends none, the fleet numbers the current
attempt's events from 0, the same way on every replay. Response ids inside events are the job id.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from shared import jsonutil
from shared.models import CANCELLED, DELTA, DONE, ERROR, RETRY, fleet_asks_usage
from shared.store import Entry

from ..fanout import ReadFailed, SlowSubscriber, StreamGone
from . import metrics
from .bodies import json_object
from .sse import PING, frame, sse_response
from .state import Gateway, gateway_of

router = APIRouter(prefix="/v1", tags=["openai"])

JOB_HEADER = "X-Streamfleet-Job-Id"


_OPENAI_TYPES = {
    "invalid_request": "invalid_request_error",
    "upstream_unreachable": "api_connection_error",
    "timeout": "timeout",
    "storage_full": "server_error",
    "worker_lost": "server_error",
    "internal": "server_error",
}
_STATUS_OF = {"invalid_request": 400, "timeout": 504, "storage_full": 503, "internal": 500}


def error_payload(error: dict[str, Any]) -> dict[str, Any]:
    """An Error as OpenAI shapes one: the upstream's own ``error`` object when it sent one (its type,
    code and param are what SDKs and UIs look at), else the fleet's."""
    upstream = error.get("upstream")
    given = upstream.get("error") if isinstance(upstream, dict) else None
    if isinstance(given, dict):
        return {
            "error": {
                "message": given.get("message") or error.get("message"),
                "type": given.get("type") or "upstream_error",
                "param": given.get("param"),
                "code": given.get("code"),
            }
        }
    kind = str(error.get("type"))
    return {
        "error": {"message": error.get("message"), "type": _OPENAI_TYPES.get(kind, kind), "param": None, "code": kind}
    }


def error_status(error: dict[str, Any]) -> int:
    """The HTTP status of a job's error: the upstream's own, else the fleet's for its kind."""
    status = error.get("status")
    if isinstance(status, int) and 400 <= status < 600:
        return status
    return _STATUS_OF.get(str(error.get("type")), 502)


def _error_response(entry: Entry, headers: dict[str, str]) -> JSONResponse:
    """A job that ended before its first token, answered as OpenAI would: with a status."""
    if entry.type == CANCELLED:
        return JSONResponse(
            {"error": {"message": "the job was cancelled", "type": "cancelled", "param": None, "code": "cancelled"}},
            409,
            headers=headers,
        )
    error = entry.data["error"]
    return JSONResponse(error_payload(error), error_status(error), headers=headers)


async def _opening(events: AsyncIterator[Entry | None]) -> list[Entry]:
    """The job's events up to its first delta or its end: a stream's status line waits for them, so
    that an error before the first token is an HTTP error (what every SDK's retry logic keys on)."""
    head: list[Entry] = []
    async for entry in events:
        if entry is None:
            continue  # nothing is sent yet: no ping to send either
        head.append(entry)
        if entry.type == DELTA or entry.terminal:
            break
    return head


async def _then(head: list[Entry], events: AsyncIterator[Entry | None]) -> AsyncIterator[Entry | None]:
    for first in head:
        yield first
    if not (head and head[-1].terminal):
        async for entry in events:
            yield entry


def _error_entry(entry_id: str, error: dict[str, Any]) -> Entry:
    return Entry(entry_id, ERROR, 0, jsonutil.dumps({"error": error, "partial": None}))


async def _events(gateway: Gateway, job_id: str, after: str = "0") -> AsyncGenerator[Entry | None, None]:
    """The job's events for an OpenAI-shaped client: deltas of the current attempt only; a retry
    after this client got deltas of the failing attempt ends the stream with an ``error`` event."""
    current = max(1, await gateway.fleet.stores.streams.attempts(job_id))
    sent_from: int | None = None
    metrics.OPEN_STREAMS.inc()
    try:
        async for entry in gateway.fanout.events(job_id, after=after):
            if entry is None:
                yield None  # a ping
            elif entry.type == DELTA:
                if entry.attempt < current:
                    continue
                current = sent_from = entry.attempt
                metrics.EVENTS_SENT.inc()
                yield entry
            elif entry.type == RETRY:
                if sent_from == entry.data["attempt"]:
                    message = "the upstream failed mid-stream and the job is being retried; follow it in the jobs API"
                    yield _error_entry(entry.id, {"type": "upstream_error", "message": message, "status": None})
                    return
                current = entry.data["attempt"] + 1
            elif entry.terminal:
                yield entry
                return
    except (SlowSubscriber, StreamGone, ReadFailed):
        yield _error_entry(
            "0-0", {"type": "internal", "message": "the stream was interrupted; resume it", "status": None}
        )
    finally:
        metrics.OPEN_STREAMS.dec()


# Models --------------------------------------------------------------------------------------------


@router.get("/models")
async def list_models(request: Request) -> Response:
    """The upstream's models, as OpenAI lists them (a worker reads the list every few minutes; the
    gateway holds no upstream key)."""
    gateway = gateway_of(request)
    gateway.auth.tenant(request)
    models = await gateway.fleet.stores.queue.models()
    return JSONResponse({"object": "list", "data": models or []})


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> Response:
    """One of the upstream's models."""
    gateway = gateway_of(request)
    gateway.auth.tenant(request)
    for entry in await gateway.fleet.stores.queue.models() or []:
        if entry.get("id") == model:
            return JSONResponse(entry)
    raise HTTPException(404, f"the model {model!r} does not exist (GET /v1/models lists them)")


# Chat Completions ----------------------------------------------------------------------------------


@router.post("/chat/completions")
async def chat_completions(
    request: Request, idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None
) -> Response:
    """Run a Chat Completions request as a fleet job; ``stream: true`` answers as OpenAI does."""
    gateway = gateway_of(request)
    tenant = gateway.auth.tenant(request)
    body = await json_object(request)
    job_id = await gateway.fleet.submit(
        body, endpoint="chat.completions", idempotency_key=idempotency_key, tenant=tenant
    )
    headers = {JOB_HEADER: job_id}
    if body.get("stream"):
        events = _events(gateway, job_id)
        head = await _opening(events)
        if head and head[-1].type in (ERROR, CANCELLED) and not any(entry.type == DELTA for entry in head):
            await events.aclose()
            return _error_response(head[-1], headers)
        frames = _chat_frames(_then(head, events), hide_usage=fleet_asks_usage(body))
        return sse_response(request, frames, headers=headers)
    event = await gateway.fleet.wait(job_id, timeout=gateway.settings.job_deadline_seconds + 60)
    if event.type == DONE:
        return JSONResponse(event.data["result"]["completion"], headers=headers)
    return _error_response(Entry(event.id, event.type, 0, jsonutil.dumps(event.data)), headers)


def _usage_removed(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """A chunk without what asking for usage added: its ``usage``, and the chunk itself if usage was
    all it carried (no choice with a delta, a finish reason or logprobs), whatever its shape."""
    rest = {key: value for key, value in chunk.items() if key != "usage"}
    choices = rest.get("choices")
    if isinstance(choices, list) and any(
        not isinstance(choice, dict) or choice.get("delta") or choice.get("finish_reason") or choice.get("logprobs")
        for choice in choices
    ):
        return rest
    return None


async def _chat_frames(events: AsyncIterator[Entry | None], *, hide_usage: bool) -> AsyncIterator[bytes]:
    """The job's chunks as OpenAI streams them. ``hide_usage``: the fleet asked the upstream for usage
    on its own account (the client's request did not say), so usage is taken out again."""
    async for event in events:
        if event is None:
            yield PING
        elif event.type == DELTA:
            chunk = event.data["chunk"] if hide_usage else None
            if isinstance(chunk, dict) and "usage" in chunk:
                kept = _usage_removed(chunk)
                if kept is not None:
                    yield frame(jsonutil.dumps(kept))
                continue
            yield frame(event.body)  # the upstream's bytes, as they came
        elif event.type == DONE:
            yield b"data: [DONE]\n\n"
        elif event.type == ERROR:
            yield frame(jsonutil.dumps(error_payload(event.data["error"])))
        elif event.type == CANCELLED:
            yield frame(jsonutil.dumps({"error": {"message": "the job was cancelled", "type": "cancelled"}}))


# Responses -----------------------------------------------------------------------------------------


def _with_job_id(value: Any, job_id: str) -> Any:
    if isinstance(value, dict) and value.get("object") == "response":
        return {**value, "id": job_id}
    return value


def _response_object(job_id: str, status: str, *, model: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": True,
        "model": model,
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        **extra,
    }


async def _response_of(gateway: Gateway, job_id: str) -> dict[str, Any]:
    """The Response object of a job, as OpenAI's retrieve returns it."""
    last = await gateway.fleet.last_event(job_id)
    if last.type == DONE:
        completion = last.data["result"].get("completion") or {}
        response: dict[str, Any] = _with_job_id({**completion, "object": "response"}, job_id)
        return response
    if last.type == ERROR:
        error = last.data["error"]
        return _response_object(job_id, "failed", error={"code": error.get("type"), "message": error.get("message")})
    if last.type == CANCELLED:
        return _response_object(job_id, "cancelled")
    return _response_object(job_id, "queued" if last.type == "queued" else "in_progress")


@router.post("/responses")
async def create_response(
    request: Request, idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None
) -> Response:
    """Run a Responses API request as a fleet job; ``background: true`` answers at once."""
    gateway = gateway_of(request)
    tenant = gateway.auth.tenant(request)
    body = await json_object(request)
    background = bool(body.get("background"))
    upstream = {key: value for key, value in body.items() if key != "background"}  # the fleet is the background
    job_id = await gateway.fleet.submit(upstream, endpoint="responses", idempotency_key=idempotency_key, tenant=tenant)
    headers = {JOB_HEADER: job_id}
    if body.get("stream"):
        events = _events(gateway, job_id)
        head = await _opening(events)
        if head and head[-1].type in (ERROR, CANCELLED) and not any(entry.type == DELTA for entry in head):
            await events.aclose()
            return _error_response(head[-1], headers)
        return sse_response(request, _response_frames(_then(head, events), job_id, -1), headers=headers)
    if background:
        return JSONResponse(_response_object(job_id, "queued", model=body.get("model")), headers=headers)
    event = await gateway.fleet.wait(job_id, timeout=gateway.settings.job_deadline_seconds + 60)
    if event.type == ERROR:
        return _error_response(Entry(event.id, event.type, 0, jsonutil.dumps(event.data)), headers)
    return JSONResponse(await _response_of(gateway, job_id), headers=headers)


@router.get("/responses/{job_id}")
async def retrieve_response(
    job_id: str,
    request: Request,
    stream: Annotated[bool, Query()] = False,
    starting_after: Annotated[int, Query(ge=-1)] = -1,
) -> Response:
    """The Response object; with ``stream=true``, its events after ``starting_after``, live."""
    gateway = gateway_of(request)
    await gateway.job_for(request, job_id)
    if stream:
        return sse_response(request, _response_frames(_events(gateway, job_id), job_id, starting_after))
    return JSONResponse(await _response_of(gateway, job_id))


@router.post("/responses/{job_id}/cancel")
async def cancel_response(job_id: str, request: Request) -> Response:
    """Cancel a background response (idempotent)."""
    gateway = gateway_of(request)
    await gateway.job_for(request, job_id)
    if await gateway.fleet.cancel(job_id) == "signalled":
        try:
            await gateway.fleet.wait(job_id, timeout=2)
        except TimeoutError:
            pass
    return JSONResponse(await _response_of(gateway, job_id))


async def _response_frames(
    events: AsyncIterator[Entry | None], job_id: str, starting_after: int
) -> AsyncIterator[bytes]:
    number = 0
    async for event in events:
        if event is None:
            yield PING
        elif event.type == DELTA:
            chunk = event.data["chunk"]
            if not isinstance(chunk, dict):
                continue
            sequence = chunk.get("sequence_number")
            number += 1
            if isinstance(sequence, int) and not isinstance(chunk.get("response"), dict):
                if sequence > starting_after:  # nothing to change: the upstream's bytes, as they came
                    yield frame(event.body, event=str(chunk.get("type") or "message"))
                continue
            if not isinstance(sequence, int):
                sequence = number - 1
                chunk = {**chunk, "sequence_number": sequence}
            if sequence <= starting_after:
                continue
            if isinstance(chunk.get("response"), dict):
                chunk = {**chunk, "response": _with_job_id(chunk["response"], job_id)}
            yield frame(jsonutil.dumps(chunk), event=str(chunk.get("type") or "message"))
        elif event.type == ERROR:
            error = event.data["error"]
            payload = {
                "type": "error",
                "code": error.get("type"),
                "message": error.get("message"),
                "param": None,
                "sequence_number": number,
            }
            yield frame(jsonutil.dumps(payload), event="error")
