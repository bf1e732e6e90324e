"""What the producer and the worker agree on about arq: the job function's name and its payload.

arq's default serializer is pickle, and a queue should not execute what it reads: jobs are JSON.
The job carries the request body and nothing secret; upstream keys live in the workers' settings.
"""

from __future__ import annotations

from typing import Any, Final

from arq.jobs import serialize_job

from . import jsonutil

FUNCTION: Final = "generate"
"""The arq function name every job is queued under."""
QUEUE_TTL_SECONDS: Final = 86_400
"""A job that waits in the queue longer than this expires (arq's default)."""


def serialize(value: dict[str, Any]) -> bytes:
    return jsonutil.dumps(value)


def deserialize(raw: bytes) -> dict[str, Any]:
    value: dict[str, Any] = jsonutil.loads(raw)
    return value


def payload(*, endpoint: str, request: dict[str, Any], enqueue_time_ms: int) -> bytes:
    """The arq job entry for one generation."""
    data: bytes = serialize_job(
        FUNCTION,
        (),
        {"endpoint": endpoint, "request": request},
        None,
        enqueue_time_ms,
        serializer=serialize,
    )
    return data
