"""The job stream's atomic steps against a real server: one terminal event, last, and nothing after it."""

from __future__ import annotations

import pytest
import redis

from shared import connection, jobstream, keys, queue
from shared.jsonutil import dumps, loads
from shared.models import DELTA, DONE, ERROR


@pytest.fixture
async def jobs(redis_url: str):  # type: ignore[no-untyped-def]
    client = connection.connect(redis_url)
    yield jobstream.JobStream(client, ttl_seconds=60)
    await client.aclose()


async def submit(jobs: jobstream.JobStream, job_id: str) -> None:
    await jobs.submit(
        job_id,
        {"job_id": job_id},
        queue.payload(endpoint="chat.completions", request={}, enqueue_time_ms=0),
        arq_ttl_ms=60_000,
        score_ms=0,
        queue_ttl_seconds=600,
        idempotency_key=None,
        idempotency_ttl_seconds=60,
    )


async def test_exactly_one_terminal_event(jobs: jobstream.JobStream, sync_redis: redis.Redis) -> None:
    await submit(jobs, "j1")
    assert await jobs.start("j1", 1) not in ("gone", "ended", "cancel")
    assert await jobs.end("j1", DONE, {"result": None}) is not None
    assert await jobs.end("j1", ERROR, {"error": None}) is None
    assert await jobs.start("j1", 2) == "ended"
    assert await jobs.cancel("j1") == "ended"
    entries = sync_redis.xrange(keys.events("j1"))
    assert [jobstream.decode(i, f).type for i, f in entries] == ["queued", "started", "done"]
    assert 0 < sync_redis.ttl(keys.events("j1")) <= 60


async def test_no_write_recreates_an_expired_stream(
    jobs: jobstream.JobStream, sync_redis: redis.Redis
) -> None:
    assert await jobs.start("gone", 1) == "gone"
    assert await jobs.end("gone", DONE, {}) is None
    assert await jobs.cancel("gone") == "unknown"
    assert sync_redis.dbsize() == 0


async def test_cancel_flag_stops_an_attempt_that_starts_late(jobs: jobstream.JobStream) -> None:
    await submit(jobs, "j2")
    await jobs.redis.set(keys.arq_in_progress("j2"), b"1")  # a worker has claimed it...
    assert await jobs.cancel("j2") == "signalled"
    assert await jobs.start("j2", 1) == "cancel"  # ...and sees the flag when it starts


def test_delta_entries_keep_the_upstream_bytes() -> None:
    raw = b'{"b":1, "a":[12345678901234567890123], "x_unknown":{"k":null}}'
    fields = jobstream.encode_delta(3, raw)
    assert fields[jobstream.D] is raw
    event = jobstream.decode(b"1-0", fields)
    assert event.type == DELTA and event.data["attempt"] == 3
    assert event.data["chunk"] == {"b": 1, "a": [12345678901234567890123], "x_unknown": {"k": None}}
    assert loads(dumps(event.data["chunk"])) == event.data["chunk"]
