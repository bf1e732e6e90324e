"""The job stream against a real server: its atomic steps, its entry format, compact deltas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from shared import connection, jobstream, keys, queue
from shared.models import DELTA, DONE, ERROR
from shared.transitions import JobStream, Start
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


async def start(jobs: JobStream, job_id: str, max_attempts: int = 5) -> Start:
    return await jobs.start(job_id, lease_ms=5000, max_attempts=max_attempts)


async def types(client: Redis, job_id: str) -> list[str]:
    entries = await client.xrange(keys.events(job_id))
    return [event.type for event in await jobstream.StreamDecoder(client, keys.events(job_id)).decode(entries)]


async def test_exactly_one_terminal_event(jobs: JobStream, client: Redis, sync_redis: redis.Redis) -> None:
    await submit(jobs, "j1")
    started = await start(jobs, "j1")
    assert started.status == "started" and started.attempt == 1
    assert await jobs.end("j1", DONE, {"result": None}, started_id=started.started_id) is not None
    assert await jobs.end("j1", ERROR, {"error": None}) is None
    assert (await start(jobs, "j1")).status == "ended"
    assert await jobs.cancel("j1") == "ended"
    assert await types(client, "j1") == ["queued", "started", "done"]
    assert await client.zcard(keys.RUNNING) == 0  # the lease went with the end
    assert 0 < sync_redis.ttl(keys.events("j1")) <= 60


async def test_only_the_attempt_that_owns_the_job_can_end_it(jobs: JobStream, client: Redis) -> None:
    await submit(jobs, "j3")
    first = (await start(jobs, "j3")).started_id
    second = await start(jobs, "j3")  # the first worker was presumed lost
    assert second.attempt == 2
    assert await jobs.end("j3", DONE, {"result": None}, started_id=first) is None
    # ...and its late deltas are refused: their ids are below the newer attempt's.
    encoder = jobstream.DeltaEncoder(1, first)
    entry_id, fields = encoder.delta(b'{"late":true}')
    with pytest.raises(redis.exceptions.ResponseError):
        await client.xadd(keys.events("j3"), fields, id=entry_id, nomkstream=True)  # type: ignore[arg-type]
    assert await jobs.end("j3", DONE, {"result": None}, started_id=second.started_id) is not None
    assert await types(client, "j3") == ["queued", "started", "retry", "started", "done"]


async def test_no_write_recreates_an_expired_stream(jobs: JobStream, sync_redis: redis.Redis) -> None:
    assert (await start(jobs, "gone")).status == "gone"
    assert await jobs.end("gone", DONE, {}) is None
    assert await jobs.cancel("gone") == "unknown"
    assert sync_redis.dbsize() == 0


async def test_cancel_flag_stops_an_attempt_that_starts_late(jobs: JobStream) -> None:
    await submit(jobs, "j2")
    await jobs.redis.set(keys.arq_in_progress("j2"), b"1")  # a worker has claimed it...
    assert await jobs.cancel("j2") == "signalled"
    assert (await start(jobs, "j2")).status == "cancel"  # ...and sees the flag when it starts


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.sse")), ids=lambda p: p.name)
async def test_compact_deltas_rebuild_every_byte(path, jobs: JobStream, client: Redis) -> None:  # type: ignore[no-untyped-def]
    """Every recording's chunks through the encoder and back, read whole and from every cursor."""
    await submit(jobs, "jc")
    started = await start(jobs, "jc")
    encoder = jobstream.DeltaEncoder(1, started.started_id)
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
    envelope = '{"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o",'
    tail = '"system_fingerprint":"fp_abc","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
    encoder = jobstream.DeltaEncoder(1, "1000-0")
    sizes = []
    for word in ["Hello", " world", " and", " everyone", " else"]:
        entry_id, fields = encoder.delta((envelope + tail % word).encode())
        sizes.append(len(fields[jobstream.D]))
    assert sizes[0] > 150 and max(sizes[1:]) <= 16
    assert entry_id == b"1000-5"


async def test_attempts_are_numbered_and_bounded(jobs: JobStream, client: Redis) -> None:
    await submit(jobs, "j4")
    assert [(await start(jobs, "j4", max_attempts=2)).attempt for _ in range(2)] == [1, 2]
    exhausted = await start(jobs, "j4", max_attempts=2)
    assert (exhausted.status, exhausted.attempt) == ("exhausted", 3)


async def test_a_lapsed_lease_sends_the_job_back_to_the_queue(jobs: JobStream, client: Redis) -> None:
    await submit(jobs, "j5")
    await client.zrem(keys.QUEUE, "j5")  # as if a worker had claimed it...
    await client.set(keys.arq_in_progress("j5"), b"1")
    lost = await jobs.start("j5", lease_ms=1, max_attempts=5)  # ...and died right after starting it
    while "j5" not in await jobs.lapsed():
        pass
    assert await jobs.reclaim("j5") == "requeued"
    assert await types(client, "j5") == ["queued", "started", "retry"]
    assert await client.zscore(keys.QUEUE, "j5") is not None
    assert not await client.exists(keys.arq_in_progress("j5"))
    # The lost attempt can no longer end the job, and its ids are fenced.
    assert await jobs.end("j5", DONE, {"result": None}, started_id=lost.started_id) is None
    assert await jobs.reclaim("j5") == "alive"  # nothing left to reclaim


async def test_a_lapsed_job_that_arq_no_longer_has_ends_in_error(jobs: JobStream, client: Redis) -> None:
    await submit(jobs, "j6")
    await jobs.start("j6", lease_ms=1, max_attempts=5)
    await client.delete(keys.arq_job("j6"))
    while "j6" not in await jobs.lapsed():
        pass
    assert await jobs.reclaim("j6") == "lost"
    assert await types(client, "j6") == ["queued", "started", "error"]
