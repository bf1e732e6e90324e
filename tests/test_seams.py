"""The seams of the core, each with the defect that was found in it: the claim, the lease of a claimed
job, the gateway's shared readers, the two steps of a submit, the orphan sweep."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from producer import FleetClient
from producer.fanout import FanOut, ReadFailed, StreamGone, Subscriber
from shared.models import CANCELLED, DONE, ERROR, STARTED
from shared.store import Entry, RawEntry, StreamReader, StreamStore, keys
from shared.store.connect import BLOCK_MS
from shared.tasks import RESTART_AFTER_S, Supervised
from simulator import expected_text
from tests.conftest import (
    ROOT,
    GatewayFactory,
    Simulator,
    WorkerFactory,
    free_port,
    port_open,
    stop_process,
    wait_until,
)
from tests.test_failures import chat, history
from tests.test_fixtures import oracle_events

pytestmark = pytest.mark.slow


def in_flight(simulator: Simulator) -> int:
    stats = simulator.stats()
    return stats["started"] - stats["completed"] - stats["disconnected"]


async def test_a_worker_keeps_its_slots_full_while_jobs_wait(
    fleet: FleetClient, start_worker: WorkerFactory, simulator: Simulator, sync_redis: redis.Redis
) -> None:
    """arq lists running jobs first; a claim that sliced its read before skipping them ran 102-164 of
    200 at once. Claimed jobs now leave the queue: every due id in it can be taken."""
    start_worker("--concurrency", "200")
    rng = random.Random(12)
    requests = [chat(f"mixed {i}", tokens=rng.randint(15, 60), tps=20) for i in range(400)]
    ids = await asyncio.gather(*(fleet.submit(request) for request in requests))
    samples = []
    while sync_redis.zcard(keys.QUEUE) > 0:
        running, waiting = in_flight(simulator), sync_redis.zcard(keys.QUEUE)
        if waiting > 0 and running > 0:
            samples.append(running)
        await asyncio.sleep(0.05)
    for job_id in ids:
        assert (await fleet.wait(job_id, timeout=60)).type == DONE
    print(f"upstream streams in flight while jobs waited: {sorted(samples)}")
    assert len(samples) > 20
    assert statistics.median(samples) >= 195 and min(samples[3:]) >= 180, sorted(samples)


@pytest.mark.split_roles
async def test_jobs_claimed_by_a_killed_worker_are_leased_cancellable_and_recovered(
    fleet: FleetClient, start_worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    """A claim used to leave its jobs unleased until they started: a SIGKILL right after a burst left
    them held by arq's in-progress key for 670 s, and a cancel printed 'signalled' and did nothing."""
    doomed = start_worker("--concurrency", "200", env={"STREAMFLEET_CLAIM_PAUSE_SECONDS": "60"})
    requests = [chat(f"claimed {i}", tokens=5) for i in range(100)]
    ids = await asyncio.gather(*(fleet.submit(request) for request in requests))
    wait_until(lambda: sync_redis.zcard(keys.RUNNING) == 100, what="the burst to be claimed")
    assert sync_redis.zcard(keys.QUEUE) == 0
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.time()
    doomed.wait()
    assert await fleet.cancel(ids[0]) == "cancelled"  # no attempt had started: it ends at once
    assert (await fleet.wait(ids[0], timeout=1)).type == CANCELLED
    start_worker()
    for job_id, request in zip(ids[1:], requests[1:], strict=True):
        assert (await fleet.result(job_id, timeout=30))["text"] == expected_text(request)
    first_starts = []
    for job_id in ids[1:]:
        events = await history(fleet, job_id)
        started = [event for event in events if event.type == STARTED]
        assert len(started) == 1 and events[-1].type == DONE, [event.type for event in events]
        first_starts.append(int(started[0].id.split("-")[0]) / 1000)
    assert [event.type for event in await history(fleet, ids[0])] == ["queued", CANCELLED]
    recovered_in = max(first_starts) - killed_at
    print(f"the last of 99 claimed jobs started {recovered_in:.2f} s after its worker was killed")
    assert recovered_in <= 15
    wait_until(lambda: sync_redis.zcard(keys.RUNNING) == 0, what="every lease to go")


@pytest.mark.split_roles
async def test_cancel_reaches_a_running_job_whose_worker_died(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    doomed = start_worker(env={"STREAMFLEET_LEASE_SECONDS": "2"})
    job_id = await fleet.submit(chat("running, then orphaned", tokens=200, tps=20))
    async for event in fleet.tail(job_id):
        if event.type == "delta":
            break
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert await fleet.cancel(job_id) == "signalled"  # nobody hears it...
    start_worker(env={"STREAMFLEET_LEASE_SECONDS": "2"})
    final = await fleet.wait(job_id, timeout=20)  # ...but the reaper finds the flag when the lease lapses
    assert final.type == CANCELLED
    assert [event.type for event in await history(fleet, job_id)].count(STARTED) == 1


class SlowReader(StreamReader):
    """Decodes as the real one does, after a random pause: the await in which subscribers come and go."""

    async def decode(self, entries: list[RawEntry]) -> list[Entry]:
        await asyncio.sleep(random.uniform(0, 0.03))
        return await super().decode(entries)


class SlowStreams(StreamStore):
    def reader(self, job_id: str) -> StreamReader:
        return SlowReader(self, job_id)


async def test_fanout_readers_survive_subscribers_that_come_and_go(
    fleet: FleetClient, start_worker: WorkerFactory
) -> None:
    """A subscriber that left while the reader awaited its decoder ended the reader (KeyError) and
    stalled every job on it; one that joined then lost events to a cursor written back."""
    start_worker()
    requests = [chat(f"fan-out {i}", tokens=120, tps=60) for i in range(4)]
    ids = [await fleet.submit(request) for request in requests]
    streams = SlowStreams(fleet.stores.streams.redis, ttl_seconds=60)
    fanout = FanOut(streams, readers=1, ping_interval=60)  # every job on one reader
    fanout.start()

    async def read(job_id: str, after: str = "0", into: list[str] | None = None) -> list[str]:
        seen = [] if into is None else into
        async for entry in fanout.events(job_id, after=after):
            if entry is not None:
                seen.append(entry.id)
        return seen

    async def churn(job_id: str, rng: random.Random) -> list[tuple[str, list[str]]]:
        """Join at a random point of what exists, leave at a random moment; again until the job ends."""
        visits = []
        while True:
            existing = [event.id for event in await history(fleet, job_id)]
            after, got = rng.choice(["0", *existing]), []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read(job_id, after, got), timeout=rng.uniform(0, 0.06))
            visits.append((after, got))
            if (await fleet.last_event(job_id)).terminal:
                return visits

    try:
        # Two jobs have a subscriber from start to end and others that come and go; the other two one
        # subscriber that comes and goes, so their follows are dropped and made again as the reader decodes.
        steady = [asyncio.create_task(read(job_id)) for job_id in ids[:2]]
        churned_jobs = ids[:2] * 3 + ids[2:]
        churned = await asyncio.gather(*(churn(job_id, random.Random(i)) for i, job_id in enumerate(churned_jobs)))
        whole = await asyncio.wait_for(asyncio.gather(*steady), timeout=30)
        for job_id, seen in zip(ids[:2], whole, strict=True):
            assert seen == [event.id for event in await history(fleet, job_id)]  # nothing missed, in order
        for job_id, visits in zip(churned_jobs, churned, strict=True):
            everything = [event.id for event in await history(fleet, job_id)]
            for after, got in visits:  # each late joiner got exactly what followed its cursor
                start = 0 if after == "0" else everything.index(after) + 1
                assert got == everything[start : start + len(got)], (after, got)
        assert fanout.followed == 0 and fanout.subscribers == 0 and fanout.tasks.restarts == 0
    finally:
        await fanout.aclose()


SUBMIT_THEN_DIE = """
import asyncio, sys
from producer import FleetClient
from shared.store.streams import StreamStore

async def stall(self, job_id, *args, **kwargs):
    print(job_id, flush=True)  # the job is queued; its stream is not opened yet
    await asyncio.sleep(3600)

StreamStore.create = stall

async def main():
    async with FleetClient() as fleet:
        request = {"model": "sim", "messages": [{"role": "user", "content": sys.argv[1]}]}
        await fleet.submit(request, idempotency_key=sys.argv[2] or None)

asyncio.run(main())
"""


def submit_and_die(fleet_env: dict[str, str], prompt: str, key: str) -> str:
    """A real submitter, SIGKILLed between the two steps of its submit; the id of its job."""
    process = subprocess.Popen(
        [sys.executable, "-c", SUBMIT_THEN_DIE, prompt, key],
        env={**fleet_env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    with process.stdout:
        job_id = process.stdout.readline().decode().strip()
        process.send_signal(signal.SIGKILL)
        process.wait()
    return job_id


@pytest.mark.split_roles
async def test_a_submitter_killed_between_its_two_steps_loses_nothing(
    fleet: FleetClient, fleet_env: dict[str, str], start_worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    """Submit queues the job, then opens its stream. Killed between the two: the worker that starts the
    job opens the stream; a retry with the idempotency key gets the same job and opens it itself."""
    lone = submit_and_die(fleet_env, "nobody retries me", "")
    retried = submit_and_die(fleet_env, "I am retried", "retry-me")
    assert sync_redis.zcard(keys.QUEUE) == 2
    assert not await fleet.stores.streams.exists(lone) and not await fleet.stores.streams.exists(retried)
    again = {"model": "sim", "messages": [{"role": "user", "content": "I am retried"}]}
    assert await fleet.submit(again, idempotency_key="retry-me") == retried
    assert (await fleet.last_event(retried)).type == "queued"
    start_worker()
    wait_until(lambda: sync_redis.zcard(keys.QUEUE) == 0, what="the jobs to be taken")
    for job_id, prompt in ((lone, "nobody retries me"), (retried, "I am retried")):
        for _ in range(200):  # the worker opens the lone job's stream as it starts it, just after its claim
            if await fleet.stores.streams.exists(job_id):
                break
            await asyncio.sleep(0.05)
        result = await fleet.result(job_id, timeout=20)
        request = {"model": "sim", "messages": [{"role": "user", "content": prompt}]}
        assert result["text"] == expected_text(request)
        assert [event.type for event in await history(fleet, job_id)].count(STARTED) == 1


@pytest.mark.split_roles
async def test_a_stream_whose_job_the_queue_lost_is_ended_by_the_sweep(
    fleet: FleetClient, start_worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    """A queue that restarts without its data (or fails over before replicating) forgets jobs whose
    streams live on: one worker's sweep ends them. Jobs the queue knows are left alone."""
    lost = await fleet.submit(chat("the queue forgets me"))
    sync_redis.zrem(keys.QUEUE, lost)
    sync_redis.delete(keys.arq_job(lost))
    slow = chat("running, and quiet for a while", tokens=3, tps=0.8)
    running = await fleet.submit(slow)
    start_worker(env={"STREAMFLEET_ORPHAN_SWEEP_SECONDS": "1"})
    start_worker(env={"STREAMFLEET_ORPHAN_SWEEP_SECONDS": "1"})
    ended = await fleet.wait(lost, timeout=10)
    assert ended.type == ERROR and "the queue lost this job" in ended.data["error"]["message"]
    assert [event.type for event in await history(fleet, lost)] == ["queued", ERROR]
    assert (await fleet.result(running, timeout=20))["text"] == expected_text(slow)


SPACED = (
    b'data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": '
    b'"caf\\u00e9"}, "finish_reason": null}], "p": 1e-06, "n": 123456789012345678901234}\n\n'
    b'data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {},\n'
    b'data:   "finish_reason": "stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
"""Chunks as some servers write them: spaced, an escaped character, an exponent, a 24-digit integer,
one chunk across two ``data:`` lines. Decoding and encoding again would change every one."""


async def test_the_gateway_forwards_the_stored_bytes_and_its_wake_streams_expire(
    start_gateway: GatewayFactory,
    start_worker: WorkerFactory,
    stream_redis: redis.Redis,
    tmp_path: Path,
    fleet_env: dict[str, str],
) -> None:
    """An event goes out as the upstream's bytes, with no decode and re-encode in between; the fan-out's
    wake-up streams do not outlive it."""
    (tmp_path / "spaced.sse").write_bytes(SPACED)
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "simulator", "--port", str(port), "--replay-dir", str(tmp_path)])
    try:
        wait_until(lambda: port_open(port), what="the upstream")
        start_worker(env={"STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"})
        gateway = start_gateway()
        request = {
            "model": "sim",
            "messages": [{"role": "user", "content": "x"}],
            "simulator": {"replay": "spaced.sse"},
        }
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
            job_id = (await client.post("/v1/jobs", json={"request": request})).json()["id"]
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                raw = await response.aread()
    finally:
        stop_process(upstream)
    frames = [block for block in raw.split(b"\n\n") if b"\nevent: delta\n" in block]
    data = [b"\n".join(line[6:] for line in frame.split(b"\n") if line.startswith(b"data: ")) for frame in frames]
    chunks = [event.data.encode() for event in oracle_events(SPACED) if event.data != "[DONE]"]
    assert data == [b'{"attempt":1,"chunk":' + chunk + b"}" for chunk in chunks]
    wakes = list(stream_redis.scan_iter(match="sf:gateway:*"))
    assert wakes and all(0 < stream_redis.ttl(key) <= 600 for key in wakes)


@pytest.mark.parametrize("direct", [False, True], ids=["queued", "written-directly"])
async def test_a_fanout_read_that_fails_ends_only_the_stream_that_caused_it(
    fleet: FleetClient, start_worker: WorkerFactory, direct: bool
) -> None:
    """Whatever makes the shared XREAD fail (here a cursor Redis refuses, slipped past the checks as a
    bug would), the reader finds the stream that caused it, ends that one's subscribers, and goes on;
    also for subscribers the reader writes to directly (the gateway's caught-up ones)."""
    start_worker()
    healthy = await fleet.submit(chat("shared reader, healthy", tokens=80, tps=40))
    poisoned = await fleet.submit(chat("shared reader, poisoned", tokens=10, ttft_ms=3000))  # quiet a while
    fanout = FanOut(fleet.stores.streams, readers=1, ping_interval=60)
    fanout.start()
    try:

        async def read(job_id: str) -> list[str]:
            written: list[str] = []

            def write(entry: Entry | None) -> bool:
                if entry is not None:
                    written.append(entry.id)
                return True

            async for entry in fanout.events(job_id, direct=write if direct else None):
                if entry is not None:
                    written.append(entry.id)
            return written

        reading = asyncio.create_task(read(healthy))
        failing = asyncio.create_task(read(poisoned))
        await asyncio.sleep(0.5)
        reader = fanout._readers[0]
        follow = reader.follows[poisoned]
        follow.cursor = reader.cursors[follow.handle] = "99999999999999999999999"
        with pytest.raises(ReadFailed):
            await asyncio.wait_for(failing, timeout=10)
        assert await asyncio.wait_for(reading, timeout=30) == [event.id for event in await history(fleet, healthy)]
        assert fanout.tasks.healthy and fanout.tasks.restarts == 0
    finally:
        await fanout.aclose()


async def test_a_stream_that_expires_under_a_caught_up_subscriber_ends_it(
    fleet: FleetClient, stream_redis: redis.Redis
) -> None:
    """A stream that vanishes while its subscriber waits, caught up (the reader writes to it directly),
    ends that subscriber with ``StreamGone`` at the reader's next idle check, instead of leaving it
    waiting for events that will never come."""
    job_id = await fleet.submit(chat("expires while followed"))  # no worker: only its queued event
    fanout = FanOut(fleet.stores.streams, readers=1, ping_interval=60)
    fanout.start()
    follows = fanout._readers[0].follows

    async def read() -> None:
        async for _ in fanout.events(job_id, direct=lambda entry: True):
            pass

    def caught_up() -> Subscriber | None:  # it has its queued event, and the reader writes to it
        subscribers = list(follows[job_id].subscribers) if job_id in follows else []
        return next((s for s in subscribers if s.direct is not None and s.last > (0, 0)), None)

    try:
        reading = asyncio.create_task(read())
        for _ in range(100):
            if caught_up() is not None:
                break
            await asyncio.sleep(0.05)
        assert caught_up() is not None
        stream_redis.delete(keys.events(job_id))
        with pytest.raises(StreamGone):
            await asyncio.wait_for(reading, timeout=BLOCK_MS / 1000 + 5)
    finally:
        await fanout.aclose()


async def test_a_shared_loop_that_dies_is_restarted_and_reported() -> None:
    tasks, runs = Supervised(), []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("a bug in a shared loop")
        await asyncio.sleep(3600)

    tasks.start("flaky loop", flaky)
    await asyncio.sleep(0.05)
    assert not tasks.healthy and tasks.down == ["flaky loop"]  # down while it waits to restart
    await asyncio.sleep(RESTART_AFTER_S + 0.2)
    assert tasks.healthy and tasks.restarts == 1 and len(runs) == 2
    await tasks.aclose()
