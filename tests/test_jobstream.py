"""The job stream against a real server: its atomic steps, its entry format, compact deltas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from shared import connection, jobstream, keys, queue
from shared.models import DELTA, DONE, ERROR
from shared.transitions import JobStream
from tests.conftest import FIXTURES
from tests.test_fixtures import oracle_events


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis_client = connection.connect(redis_url)
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def jobs(client: Redis) -> JobStream:
    return JobStream(client, ttl_seconds=60)


async def submit(jobs: JobStream, job_id: str) -> None:
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


async def types(client: Redis, job_id: str) -> list[str]:
    entries = await client.xrange(keys.events(job_id))
    return [
        event.type for event in await jobstream.StreamDecoder(client, keys.events(job_id)).decode(entries)
    ]


async def test_exactly_one_terminal_event(jobs: JobStream, client: Redis, sync_redis: redis.Redis) -> None:
    await submit(jobs, "j1")
    started = await jobs.start("j1", 1)
    assert started not in ("gone", "ended", "cancel")
    assert await jobs.end("j1", DONE, {"result": None}, started_id=started) is not None
    assert await jobs.end("j1", ERROR, {"error": None}) is None
    assert await jobs.start("j1", 2) == "ended"
    assert await jobs.cancel("j1") == "ended"
    assert await types(client, "j1") == ["queued", "started", "done"]
    assert 0 < sync_redis.ttl(keys.events("j1")) <= 60


async def test_only_the_attempt_that_owns_the_job_can_end_it(jobs: JobStream, client: Redis) -> None:
    await submit(jobs, "j3")
    first = await jobs.start("j3", 1)
    second = await jobs.start("j3", 2)  # the first worker was presumed lost
    assert await jobs.end("j3", DONE, {"result": None}, started_id=first) is None
    # ...and its late deltas are refused: their ids are below the newer attempt's.
    encoder = jobstream.DeltaEncoder(1, first)
    entry_id, fields = encoder.delta(b'{"late":true}')
    with pytest.raises(redis.exceptions.ResponseError):
        await client.xadd(keys.events("j3"), fields, id=entry_id, nomkstream=True)  # type: ignore[arg-type]
    assert await jobs.end("j3", DONE, {"result": None}, started_id=second) is not None
    assert await types(client, "j3") == ["queued", "started", "started", "done"]


async def test_no_write_recreates_an_expired_stream(jobs: JobStream, sync_redis: redis.Redis) -> None:
    assert await jobs.start("gone", 1) == "gone"
    assert await jobs.end("gone", DONE, {}) is None
    assert await jobs.cancel("gone") == "unknown"
    assert sync_redis.dbsize() == 0


async def test_cancel_flag_stops_an_attempt_that_starts_late(jobs: JobStream) -> None:
    await submit(jobs, "j2")
    await jobs.redis.set(keys.arq_in_progress("j2"), b"1")  # a worker has claimed it...
    assert await jobs.cancel("j2") == "signalled"
    assert await jobs.start("j2", 1) == "cancel"  # ...and sees the flag when it starts


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.sse")), ids=lambda p: p.name)
async def test_compact_deltas_rebuild_every_byte(path, jobs: JobStream, client: Redis) -> None:  # type: ignore[no-untyped-def]
    """Every recording's chunks through the encoder and back, read whole and from every cursor."""
    await submit(jobs, "jc")
    started = await jobs.start("jc", 1)
    encoder = jobstream.DeltaEncoder(1, started)
    raws = [event.data.encode() for event in oracle_events(path.read_bytes()) if event.data != "[DONE]"]
    stream = keys.events("jc")
    for raw in raws:
        entry_id, fields = encoder.delta(raw)
        await client.xadd(stream, fields, id=entry_id, nomkstream=True)  # type: ignore[arg-type]
    entries = await client.xrange(stream)
    deltas = [e for e in await jobstream.StreamDecoder(client, stream).decode(entries) if e.type == DELTA]
    assert [d.data["chunk"] for d in deltas] == [json.loads(raw) for raw in raws]
    for cut in range(2, len(entries)):  # a reader that joins after the references it needs
        late = await jobstream.StreamDecoder(client, stream).decode(entries[cut:])
        assert [e.data["chunk"] for e in late] == [json.loads(raw) for raw in raws[cut - 2 :]]


def test_compact_deltas_are_small_for_plain_text() -> None:
    envelope = (
        '{"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o",'
    )
    tail = (
        '"system_fingerprint":"fp_abc","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
    )
    encoder = jobstream.DeltaEncoder(1, "1000-0")
    sizes = []
    for word in ["Hello", " world", " and", " everyone", " else"]:
        entry_id, fields = encoder.delta((envelope + tail % word).encode())
        sizes.append(len(fields[jobstream.D]))
    assert sizes[0] > 150 and max(sizes[1:]) <= 16
    assert entry_id == b"1000-5"
