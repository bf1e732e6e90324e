"""The data model against real servers (one for both roles, and split): the scripts of each role,
the entry format, compact deltas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis

from shared.models import DELTA, DONE, ERROR
from shared.settings import Settings
from shared.store import DeltaEncoder, Stores, keys, open_stores, queue
from shared.store.codec import D
from shared.store.streams import Start
from tests.conftest import FIXTURES
from tests.test_fixtures import oracle_events

pytestmark = pytest.mark.split_roles

LEASE_MS = 5000


@pytest.fixture
async def stores(redis_url: str, stream_redis_url: str) -> AsyncIterator[Stores]:
    opened = await open_stores(
        Settings(redis_url=redis_url, stream_redis_url=stream_redis_url, stream_ttl_seconds=60), name="test"
    )
    yield opened
    await opened.aclose()


async def submit(stores: Stores, job_id: str) -> None:
    """Both steps of a submit, as ``FleetClient.submit`` takes them."""
    payload = queue.payload(endpoint="chat.completions", request={}, tenant=None, enqueue_time_ms=0)
    assert await stores.queue.enqueue(job_id, payload, score_ms=0, idempotency_key=None) == (job_id, True)
    assert await stores.streams.create(job_id, {"job_id": job_id}, tenant=None, ttl_seconds=600)


async def claim(stores: Stores, *job_ids: str) -> None:
    taken = await stores.queue.claim(len(job_ids), lease_ms=LEASE_MS, in_progress_ms=60_000)
    assert sorted(claim.job_id for claim in taken) == sorted(job_ids)


async def start(stores: Stores, job_id: str, max_attempts: int = 5) -> Start:
    return await stores.streams.start(
        job_id, {"job_id": job_id}, tenant=None, ttl_seconds=600, max_attempts=max_attempts
    )


async def types(stores: Stores, job_id: str) -> list[str]:
    streams = stores.streams
    return [entry.type for entry in await streams.reader(job_id).decode(await streams.range(job_id))]


async def test_exactly_one_terminal_event(stores: Stores, stream_redis: redis.Redis) -> None:
    await submit(stores, "j1")
    await claim(stores, "j1")
    started = await start(stores, "j1")
    assert started.status == "started" and started.attempt == 1
    assert await stores.streams.end("j1", DONE, {"result": None}, started_id=started.started_id) is not None
    assert await stores.streams.end("j1", ERROR, {"error": None}) is None
    assert (await start(stores, "j1")).status == "ended"
    assert await stores.streams.cancel("j1") == "ended"
    assert await types(stores, "j1") == ["queued", "started", "done"]
    for key in keys.job_keys("j1"):
        assert stream_redis.ttl(key) in (-2, *range(1, 61)), key  # gone, or living as long as the stream


async def test_a_claim_takes_due_jobs_off_the_queue_and_leases_them(stores: Stores, sync_redis: redis.Redis) -> None:
    for job_id in ("a", "b", "c"):
        await submit(stores, job_id)
    first = await stores.queue.claim(2, lease_ms=LEASE_MS, in_progress_ms=60_000)
    second = await stores.queue.claim(2, lease_ms=LEASE_MS, in_progress_ms=60_000)
    assert [claim.job_id for claim in first] == ["a", "b"] and [claim.job_id for claim in second] == ["c"]
    assert sync_redis.zcard(keys.QUEUE) == 0 and sync_redis.zcard(keys.RUNNING) == 3
    assert all(sync_redis.exists(keys.arq_in_progress(job_id)) for job_id in "abc")
    # Finished: arq's keys and the lease go together. Handed back: due again at once, lease gone.
    await stores.queue.finish("a", again_at_ms=None)
    await stores.queue.finish("b", again_at_ms="now")
    assert not sync_redis.exists(keys.arq_job("a")) and sync_redis.zscore(keys.QUEUE, "a") is None
    assert sync_redis.zscore(keys.QUEUE, "b") is not None and sync_redis.exists(keys.arq_job("b"))
    assert sync_redis.zrange(keys.RUNNING, 0, -1) == [b"c"]


async def test_submits_wake_the_workers_once_per_claim(stores: Stores, sync_redis: redis.Redis) -> None:
    """Every worker receives every wake: a burst of submits publishes one until a claim looks at the
    queue, and the first submit after a claim publishes again (or, with no claim, after the TTL)."""

    def wakes() -> list[bytes]:
        received = []
        while (message := subscriber.get_message(timeout=0.2)) is not None:
            received.append(message["data"])
        return received

    subscriber = sync_redis.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(keys.QUEUED_CHANNEL)
    subscriber.get_message(timeout=1)  # the subscription's confirmation
    for job_id in ("a", "b", "c"):
        await submit(stores, job_id)
    assert wakes() == [b"a"]
    await claim(stores, "a", "b", "c")
    assert not sync_redis.exists(keys.WAKE_PENDING)
    await submit(stores, "d")
    await submit(stores, "e")
    assert wakes() == [b"d"]
    sync_redis.pexpire(keys.WAKE_PENDING, 1)  # as if the wake were lost and no worker claimed
    await asyncio.sleep(0.01)
    await submit(stores, "f")
    assert wakes() == [b"f"]
    subscriber.close()


async def test_only_the_attempt_that_owns_the_job_can_end_it(stores: Stores) -> None:
    await submit(stores, "j3")
    first = (await start(stores, "j3")).started_id
    second = await start(stores, "j3")  # the first worker was presumed lost
    assert second.attempt == 2
    assert await stores.streams.end("j3", DONE, {"result": None}, started_id=first) is None
    # ...and its late deltas are refused: their ids are below the newer attempt's.
    late = DeltaEncoder("j3", 1, first)
    entry_id, fields = late.delta(b'{"late":true}')
    assert (await stores.streams.append([(late, entry_id, fields)]))[:2] == ([1], [])
    assert await stores.streams.end("j3", DONE, {"result": None}, started_id=second.started_id) is not None
    assert await types(stores, "j3") == ["queued", "started", "retry", "started", "done"]


async def test_no_write_recreates_an_expired_stream(stores: Stores, stream_redis: redis.Redis) -> None:
    assert await stores.streams.end("gone", DONE, {}) is None
    assert await stores.streams.cancel("gone") == "unknown"
    attempt = DeltaEncoder("gone", 1, "1000-0")
    assert (await stores.streams.append([(attempt, *attempt.delta(b"{}"))]))[:2] == ([1], [])
    assert stream_redis.dbsize() == 0


async def test_a_worker_that_starts_a_job_before_its_stream_exists_opens_it(stores: Stores) -> None:
    """The submitter's second step has not run (yet, or ever): the worker's start writes `queued`."""
    payload = queue.payload(endpoint="chat.completions", request={}, tenant="t1", enqueue_time_ms=0)
    await stores.queue.enqueue("early", payload, score_ms=0, idempotency_key=None)
    started = await stores.streams.start("early", {"job_id": "early"}, tenant="t1", ttl_seconds=600, max_attempts=3)
    assert started.status == "started"
    assert not await stores.streams.create("early", {"job_id": "early"}, tenant="t1", ttl_seconds=600)
    assert await types(stores, "early") == ["queued", "started"]
    assert await stores.streams.tenant("early") == "t1"


async def test_cancel_reaches_a_job_claimed_but_not_started(stores: Stores, sync_redis: redis.Redis) -> None:
    await submit(stores, "held")
    await claim(stores, "held")
    assert await stores.streams.cancel("held") == "cancelled"  # no attempt has started: it ends now
    assert await stores.queue.dequeue("held") == "held"  # its worker lets go of it, as arq finishes it
    assert (await start(stores, "held")).status == "ended"
    assert await types(stores, "held") == ["queued", "cancelled"]
    await submit(stores, "waiting")
    assert await stores.streams.cancel("waiting") == "cancelled"
    assert await stores.queue.dequeue("waiting") == "removed"
    assert sync_redis.zscore(keys.QUEUE, "waiting") is None and not sync_redis.exists(keys.arq_job("waiting"))


async def test_cancel_flag_stops_an_attempt_that_starts_late(stores: Stores) -> None:
    await submit(stores, "j2")
    first = await start(stores, "j2")
    assert await stores.streams.cancel("j2") == "signal"  # running: its worker is told
    # Its worker was lost before it heard; the job's next start sees the flag.
    assert (await start(stores, "j2")).status == "cancel"
    assert await stores.streams.end("j2", "cancelled", {"partial": None}) is not None
    assert await stores.streams.end("j2", DONE, {}, started_id=first.started_id) is None


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.sse")), ids=lambda p: p.name)
async def test_compact_deltas_rebuild_every_byte(path, stores: Stores) -> None:  # type: ignore[no-untyped-def]
    """Every recording's chunks through the encoder and back, read whole and from every cursor."""
    await submit(stores, "jc")
    started = await start(stores, "jc")
    encoder = DeltaEncoder("jc", 1, started.started_id)
    raws = [event.data.encode() for event in oracle_events(path.read_bytes()) if event.data != "[DONE]"]
    assert (await stores.streams.append([(encoder, *encoder.delta(raw)) for raw in raws]))[:2] == ([], [])
    streams = stores.streams
    entries = await streams.range("jc")
    deltas = [e for e in await streams.reader("jc").decode(entries) if e.type == DELTA]
    assert [d.body for d in deltas] == raws
    assert [d.data["chunk"] for d in deltas] == [json.loads(raw) for raw in raws]
    for cut in range(2, len(entries)):  # a reader that joins after the references it needs
        late = await streams.reader("jc").decode(entries[cut:])
        assert [e.body for e in late] == raws[cut - 2 :]


def test_compact_deltas_are_small_for_plain_text() -> None:
    envelope = '{"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o",'
    tail = '"system_fingerprint":"fp_abc","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
    encoder = DeltaEncoder("j", 1, "1000-0")
    sizes = []
    for word in ["Hello", " world", " and", " everyone", " else"]:
        entry_id, fields = encoder.delta((envelope + tail % word).encode())
        sizes.append(len(fields[D]))
    assert sizes[0] > 150 and max(sizes[1:]) <= 16
    assert entry_id == b"1000-5"


async def test_attempts_are_numbered_and_bounded(stores: Stores) -> None:
    await submit(stores, "j4")
    assert [(await start(stores, "j4", max_attempts=2)).attempt for _ in range(2)] == [1, 2]
    exhausted = await start(stores, "j4", max_attempts=2)
    assert (exhausted.status, exhausted.attempt) == ("exhausted", 3)


async def lapse(stores: Stores, job_id: str) -> None:
    await stores.queue.claim(1, lease_ms=1, in_progress_ms=60_000)
    while job_id not in await stores.queue.lapsed():
        pass


async def test_a_lapsed_lease_sends_the_job_back_to_the_queue(stores: Stores, sync_redis: redis.Redis) -> None:
    await submit(stores, "j5")
    await lapse(stores, "j5")
    lost = await start(stores, "j5")  # its worker died right after starting it
    owner = await stores.streams.owner("j5")
    assert owner == lost.started_id
    assert await stores.queue.requeue_lapsed("j5") == "requeued"
    assert await stores.streams.void("j5", owner) == "voided"
    assert await types(stores, "j5") == ["queued", "started", "retry"]
    assert sync_redis.zscore(keys.QUEUE, "j5") is not None and sync_redis.zscore(keys.RUNNING, "j5") is None
    assert not sync_redis.exists(keys.arq_in_progress("j5"))
    # The lost attempt can no longer end the job; a second reaper finds nothing left to do.
    assert await stores.streams.end("j5", DONE, {"result": None}, started_id=lost.started_id) is None
    assert await stores.queue.requeue_lapsed("j5") == "alive"
    assert await stores.streams.void("j5", owner) == "moved"


async def test_a_void_never_touches_the_attempt_that_started_after_the_requeue(stores: Stores) -> None:
    await submit(stores, "j7")
    await lapse(stores, "j7")  # claimed, never started: nothing to void
    owner = await stores.streams.owner("j7")
    assert await stores.queue.requeue_lapsed("j7") == "requeued"
    await claim(stores, "j7")
    assert (await start(stores, "j7")).status == "started"  # another worker, before the reaper's second step
    assert await stores.streams.void("j7", owner) == "moved"
    assert await types(stores, "j7") == ["queued", "started"]


async def test_a_lapsed_job_that_arq_no_longer_has_is_reported_lost(stores: Stores, sync_redis: redis.Redis) -> None:
    await submit(stores, "j6")
    await lapse(stores, "j6")
    sync_redis.delete(keys.arq_job("j6"))
    assert await stores.queue.requeue_lapsed("j6") == "lost"
    assert sync_redis.zscore(keys.RUNNING, "j6") is not None  # held until its stream has ended


async def test_an_idempotency_key_says_whether_arq_still_has_the_job(stores: Stores) -> None:
    payload = queue.payload(endpoint="chat.completions", request={}, tenant=None, enqueue_time_ms=0)
    assert await stores.queue.enqueue("first", payload, score_ms=0, idempotency_key="k") == ("first", True)
    assert await stores.queue.enqueue("second", payload, score_ms=0, idempotency_key="k") == ("first", True)
    await claim(stores, "first")
    await stores.queue.finish("first", again_at_ms=None)
    assert await stores.queue.enqueue("third", payload, score_ms=0, idempotency_key="k") == ("first", False)
