"""Fault injection: what a request asks the simulator to get wrong, under ``"simulator"`` in its body.

fault         429 | 408 | 500 | 503 | 400: answer with that status (an OpenAI error body; a
              ``Retry-After`` header with 429 and ``retry_after``)
              drop: cut the connection after ``fault_after`` events (no end of body)
              stall: send ``fault_after`` events, then nothing, until the client gives up
              error_event: send an error event after ``fault_after`` events, then end
              invalid_json: send a data line that is not JSON after ``fault_after`` events
              malformed: insert lines that break the SSE grammar (no colon, stray fields); the
              stream is otherwise whole
fault_after   events before a stream fault (default 3)
fault_times   only the first N requests with this same body fail; later ones succeed, so a
              retried job completes (default: every request fails)
retry_after   seconds, for the Retry-After header of a 429
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import JSONResponse, Response

from . import text

STATUS_FAULTS = {"400": 400, "408": 408, "429": 429, "500": 500, "503": 503}
STREAM_FAULTS = {"drop", "stall", "error_event", "invalid_json", "malformed"}


class InjectedDrop(ConnectionAbortedError):
    """Raised inside a response body: the server closes the connection mid-body."""


@dataclass(frozen=True)
class Fault:
    kind: str
    after: int
    retry_after: float | None


def pick(body: dict[str, Any], seen: Counter[str]) -> Fault | None:
    """The fault this request asks for, if it still applies (``fault_times``)."""
    options = text.options(body)
    kind = options.get("fault")
    if kind is None:
        return None
    identity = text.request_id(body)
    seen[identity] += 1
    times = options.get("fault_times")
    if isinstance(times, int) and seen[identity] > times:
        return None
    retry_after = options.get("retry_after")
    return Fault(str(kind), int(options.get("fault_after", 3)), float(retry_after) if retry_after else None)


def status_response(fault: Fault) -> Response | None:
    """An error answer for a status fault; ``None`` for a stream fault."""
    status = STATUS_FAULTS.get(fault.kind)
    if status is None:
        return None
    kinds = {400: "invalid_request_error", 408: "timeout", 429: "rate_limit_error"}
    body = {
        "error": {
            "message": f"simulated {status}",
            "type": kinds.get(status, "server_error"),
            "param": None,
            "code": "simulated",
        }
    }
    headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
    return JSONResponse(body, status, headers=headers)


async def inject(events: AsyncIterator[bytes], fault: Fault, *, responses: bool) -> AsyncIterator[bytes]:
    """``events`` with the stream fault applied after ``fault.after`` events."""
    sent = 0
    async for piece in events:
        if sent == fault.after:
            if fault.kind == "drop":
                raise InjectedDrop("simulated drop")
            if fault.kind == "stall":
                await asyncio.sleep(3600)
            if fault.kind == "error_event":
                yield _error_event(responses, sent)
                return
            if fault.kind == "invalid_json":
                yield b'data: {"choices": [{"delta": \n\n'
                return
            if fault.kind == "malformed":
                yield b"this line has no colon\nid\nretry: soon\n:comment\n\n"
        yield piece
        sent += 1


def _error_event(responses: bool, sequence: int) -> bytes:
    data: dict[str, Any]
    if responses:
        data = {
            "type": "error",
            "code": "server_error",
            "message": "simulated error event",
            "param": None,
            "sequence_number": sequence,
        }
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
    data = {"error": {"message": "simulated error event", "type": "server_error", "param": None, "code": None}}
    return b"data: " + orjson.dumps(data) + b"\n\n"
