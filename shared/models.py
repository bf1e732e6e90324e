"""The job and event models both sides agree on (the README's "Events").

Requests are validated once, at submit, and then forwarded as the caller wrote them: unknown OpenAI
fields pass through untouched. Events and results are plain dicts on the hot path; the types here
describe them.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal, NamedTuple, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidRequest

ENDPOINTS: Final[tuple[str, ...]] = ("chat.completions", "responses")
UPSTREAM_PATHS: Final[dict[str, str]] = {"chat.completions": "/chat/completions", "responses": "/responses"}

QUEUED: Final = "queued"
STARTED: Final = "started"
DELTA: Final = "delta"
RETRY: Final = "retry"
DONE: Final = "done"
ERROR: Final = "error"
CANCELLED: Final = "cancelled"
TERMINAL_TYPES: Final = frozenset({DONE, ERROR, CANCELLED})

ErrorType = Literal[
    "upstream_error", "upstream_unreachable", "timeout", "invalid_request", "worker_lost", "storage_full", "internal"
]


class Error(TypedDict):
    type: str
    message: str
    status: int | None
    upstream: Any


class ToolCall(TypedDict):
    id: str | None
    type: str
    function: dict[str, str]


class Result(TypedDict):
    text: str
    reasoning: str | None
    refusal: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    usage: dict[str, Any] | None
    completion: dict[str, Any] | None


class Event(NamedTuple):
    """One event of a job's stream. ``id`` is the Redis Stream entry id: the cursor to resume after.

    A named tuple: readers make one per entry, and it builds 3x faster than a frozen dataclass.
    """

    id: str
    type: str
    data: Any

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "data": self.data}


def fleet_asks_usage(request: dict[str, Any]) -> bool:
    """Whether the fleet adds ``stream_options.include_usage`` to a Chat Completions request on its own
    account (the result carries usage): when the request says nothing of ``stream_options``. What
    that adds is taken out again for the client (``producer.gateway.openai``)."""
    return "stream_options" not in request


def queued_data(job_id: str, endpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """The data of a job's ``queued`` event."""
    return {"job_id": job_id, "endpoint": endpoint, "model": request.get("model")}


def make_error(type: ErrorType, message: str, *, status: int | None = None, upstream: Any = None) -> Error:
    return {"type": type, "message": message, "status": status, "upstream": upstream}


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1)


class ChatCompletionsRequest(BaseModel):
    """The fields of a Chat Completions request that the fleet relies on; the rest pass through."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    n: int | None = Field(default=None, ge=1)


class ResponsesRequest(BaseModel):
    """The fields of a Responses API request that the fleet relies on; the rest pass through."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[Any] | None = None
    instructions: str | None = None


_REQUEST_MODELS: Final[dict[str, type[BaseModel]]] = {
    "chat.completions": ChatCompletionsRequest,
    "responses": ResponsesRequest,
}


def validate_request(request: Any, endpoint: str) -> dict[str, Any]:
    """Check a request body for ``endpoint``; return it unchanged, or raise ``InvalidRequest``.

    :param request: the OpenAI request body, as a dict.
    :param endpoint: ``"chat.completions"`` or ``"responses"``.
    """
    if endpoint not in _REQUEST_MODELS:
        raise InvalidRequest(f"unknown endpoint {endpoint!r}: use one of {', '.join(ENDPOINTS)}")
    if not isinstance(request, dict):
        raise InvalidRequest(f"the request must be a JSON object, not {type(request).__name__}")
    try:
        _REQUEST_MODELS[endpoint].model_validate(request)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "request"
        raise InvalidRequest(f"invalid {endpoint} request: {where}: {first['msg']}") from None
    _check_json(request)
    return request


def _check_json(value: Any) -> None:
    """What ``shared.jsonutil`` refuses when it reads, refused here for a request built in Python:
    ``NaN`` and ``Infinity`` (orjson would write them as ``null``), and nesting past ``MAX_DEPTH``."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"the request is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidRequest(f"the request holds {item!r}, which is not JSON")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)


MAX_DEPTH: Final = 512
"""Deepest nesting a request may have (what jsonutil reads is bounded near 1,000 levels)."""
