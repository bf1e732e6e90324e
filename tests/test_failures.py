"""What the fleet does when things break: a real upstream that fails, real signals, a real Redis.

Every test checks the stream's whole history with ``check_history``: exactly one terminal event,
last; attempts numbered 1, 2, ... each opened by ``started`` and, unless it is the last, closed by
``retry``; no delta of an attempt outside its started..retry span.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
import redis

from producer import FleetClient
from shared.accumulate import delta_text
from shared.models import CANCELLED, DELTA, DONE, ERROR, RETRY, STARTED, TERMINAL_TYPES, Event
from shared.store import keys
from simulator import expected_text
from tests.conftest import WorkerFactory, free_port, wait_until

pytestmark = pytest.mark.split_roles

FAST = {
    "STREAMFLEET_RETRY_BASE_SECONDS": "0.05",
    "STREAMFLEET_RETRY_MAX_SECONDS": "0.2",
    "STREAMFLEET_LEASE_SECONDS": "2",
}


_TEST = {"name": ""}


@pytest.fixture(autouse=True)
def _named_prompts(request: pytest.FixtureRequest) -> None:
    """The simulator counts faults per request for the whole session: each test's prompts are its own."""
    _TEST["name"] = request.node.name


def chat(prompt: str, **simulator: Any) -> dict[str, Any]:
    content = f"{prompt} ({_TEST['name']})"
    return {"model": "sim", "messages": [{"role": "user", "content": content}], "simulator": simulator}


async def history(fleet: FleetClient, job_id: str) -> list[Event]:
    """Every entry of the stream, void attempts included (read raw, not through ``tail``)."""
    streams = fleet.stores.streams
    return [entry.event() for entry in await streams.reader(job_id).decode(await streams.range(job_id))]


def check_history(events: list[Event]) -> None:
    assert sum(e.type in TERMINAL_TYPES for e in events) == 1 and events[-1].type in TERMINAL_TYPES
    current = 0
    open_attempt = False
    for event in events:
        if event.type == STARTED:
            assert not open_attempt and event.data["attempt"] == current + 1
            current, open_attempt = current + 1, True
        elif event.type == RETRY:
            assert open_attempt and event.data["attempt"] == current
            open_attempt = False
        elif event.type == DELTA:
            assert open_attempt and event.data["attempt"] == current


def visible_text(events: list[Event]) -> str:
    """The text a reader keeps: each retry drops its attempt's deltas."""
    pieces: list[tuple[int, str]] = []
    for event in events:
        if event.type == DELTA:
            pieces.append((event.data["attempt"], delta_text(event.data["chunk"])))
        elif event.type == RETRY:
            pieces = [piece for piece in pieces if piece[0] != event.data["attempt"]]
    return "".join(text for _, text in pieces)


async def run_job(fleet: FleetClient, request: dict[str, Any], timeout: float = 30) -> tuple[str, list[Event]]:
    job_id = await fleet.submit(request)
    live = [event async for event in fleet.tail(job_id)]
    await fleet.wait(job_id, timeout=timeout)
    everything = await history(fleet, job_id)
    check_history(everything)
    assert visible_text(live) == visible_text(everything)
    return job_id, everything


@pytest.mark.parametrize(("fault", "status"), [("429", 429), ("500", 500), ("503", 503), ("408", 408)])
async def test_retryable_statuses_are_retried(
    fault: str, status: int, fleet: FleetClient, start_worker: WorkerFactory
) -> None:
    start_worker(env=FAST)
    request = chat(f"status {fault}", fault=fault, fault_times=2, retry_after=0.1 if fault == "429" else None)
    _, events = await run_job(fleet, request)
    retries = [e for e in events if e.type == RETRY]
    assert [r.data["error"]["status"] for r in retries] == [status, status]
    if fault == "429":
        assert all(r.data["delay_s"] == 0.1 for r in retries)  # Retry-After, honoured
    assert events[-1].type == DONE and events[-1].data["result"]["text"] == expected_text(request)


async def test_a_400_is_final_with_the_upstream_body(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(env=FAST)
    _, events = await run_job(fleet, chat("bad request", fault="400"))
    assert [e.type for e in events] == ["queued", "started", ERROR]
    error = events[-1].data["error"]
    assert (error["type"], error["status"]) == ("upstream_error", 400)
    assert error["upstream"]["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("fault", ["drop", "stall"])
async def test_a_stream_cut_or_stalled_mid_body_is_retried_without_doubled_text(
    fault: str, fleet: FleetClient, start_worker: WorkerFactory
) -> None:
    start_worker(env={**FAST, "STREAMFLEET_IDLE_TIMEOUT_SECONDS": "0.5"})
    request = chat(f"{fault} once", tokens=30, fault=fault, fault_after=8, fault_times=1)
    job_id, events = await run_job(fleet, request)
    assert [e.type for e in events].count(RETRY) == 1
    error = next(e for e in events if e.type == RETRY).data["error"]
    assert error["type"] == ("timeout" if fault == "stall" else "upstream_error")
    if fault == "stall":
        assert "idle timeout" in error["message"]
    assert visible_text(events) == expected_text(request) == events[-1].data["result"]["text"]
    # A reader that joins after the end never sees the void attempt's deltas.
    late = [event async for event in fleet.tail(job_id)]
    assert {e.data["attempt"] for e in late if e.type == DELTA} == {2}


async def test_an_unreachable_upstream_ends_in_error_after_the_last_attempt(
    settings: Any, start_worker: WorkerFactory
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    start_worker(env={**FAST, "STREAMFLEET_UPSTREAM_BASE_URL": closed, "STREAMFLEET_MAX_ATTEMPTS": "3"})
    async with FleetClient(settings) as fleet:
        _, events = await run_job(fleet, chat("nobody home"))
    assert [e.type for e in events].count(STARTED) == 3
    assert events[-1].type == ERROR and events[-1].data["error"]["type"] == "upstream_unreachable"


async def test_first_byte_timeout_and_job_deadline(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(
        env={
            **FAST,
            "STREAMFLEET_FIRST_BYTE_TIMEOUT_SECONDS": "0.5",
            "STREAMFLEET_MAX_ATTEMPTS": "2",
            "STREAMFLEET_JOB_DEADLINE_SECONDS": "3",
        }
    )
    _, events = await run_job(fleet, chat("slow to start", ttft_ms=5000))
    assert events[-1].type == ERROR
    assert events[-1].data["error"]["type"] == "timeout" and "first byte" in events[-1].data["error"]["message"]
    _, events = await run_job(fleet, chat("too long", tokens=100, tps=10))
    assert events[-1].type == ERROR and "deadline" in events[-1].data["error"]["message"]
    assert delta_text(events[-2].data["chunk"]) and events[-1].data["partial"]["text"]


@pytest.mark.parametrize("fault", ["error_event", "invalid_json"])
async def test_errors_inside_the_stream_are_final(fault: str, fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(env=FAST)
    request = chat(fault, tokens=20, fault=fault, fault_after=5)
    _, events = await run_job(fleet, request)
    assert RETRY not in [e.type for e in events] and events[-1].type == ERROR
    error, partial = events[-1].data["error"], events[-1].data["partial"]
    assert error["type"] == "upstream_error"
    assert partial["text"] == expected_text(request)[: len(partial["text"])] and partial["text"]
    if fault == "error_event":
        assert error["upstream"]["error"]["message"] == "simulated error event"


async def test_malformed_sse_lines_are_ignored(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(env=FAST)
    request = chat("malformed", tokens=12, fault="malformed", fault_after=4)
    _, events = await run_job(fleet, request)
    assert events[-1].type == DONE and events[-1].data["result"]["text"] == expected_text(request)


async def test_a_runaway_stream_is_capped(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(env={**FAST, "STREAMFLEET_MAX_STREAM_EVENTS": "10"})
    _, events = await run_job(fleet, chat("runaway", tokens=100))
    assert events[-1].type == ERROR and "over 10 events" in events[-1].data["error"]["message"]
    assert sum(e.type == DELTA for e in events) == 10


async def test_sigkill_mid_stream_is_recovered_by_another_worker(
    fleet: FleetClient, start_worker: WorkerFactory
) -> None:
    doomed = start_worker(env=FAST)
    request = chat("survive", tokens=60, tps=30)
    job_id = await fleet.submit(request)
    deltas = 0
    async for event in fleet.tail(job_id):
        deltas += event.type == DELTA
        if deltas == 5:
            break
    doomed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    start_worker(env=FAST)
    final = await fleet.wait(job_id, timeout=30)
    recovered = next(e for e in await history(fleet, job_id) if e.type == STARTED and e.data["attempt"] == 2)
    events = await history(fleet, job_id)
    check_history(events)
    assert final.type == DONE and visible_text(events) == expected_text(request)
    retry = next(e for e in events if e.type == RETRY)
    assert retry.data["error"]["type"] == "worker_lost"
    assert recovered.id > retry.id
    # Recovered through the lease, not arq's in-progress key (it expires after the job timeout + 10 s,
    # 670 s here): how fast is a benchmark figure (the soak prints it), not an assertion.
    assert time.monotonic() - killed_at < 120


async def test_sigterm_lets_a_short_job_finish_and_hands_a_long_one_back(
    fleet: FleetClient, start_worker: WorkerFactory
) -> None:
    stopping = start_worker(env={**FAST, "STREAMFLEET_SHUTDOWN_GRACE_SECONDS": "1"})
    short = await fleet.submit(chat("short", tokens=10, tps=20))  # 0.5 s: inside the grace
    long = await fleet.submit(chat("long", tokens=200, tps=20))  # 10 s: handed back
    for job_id in (short, long):
        async for event in fleet.tail(job_id):
            if event.type == DELTA:
                break
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(timeout=15) == 0
    assert (await fleet.wait(short, timeout=5)).type == DONE
    assert RETRY not in [e.type for e in await history(fleet, short)]
    start_worker(env=FAST)
    assert (await fleet.wait(long, timeout=30)).type == DONE
    events = await history(fleet, long)
    check_history(events)
    assert next(e for e in events if e.type == RETRY).data["error"]["type"] == "worker_lost"
    assert visible_text(events) == expected_text(chat("long", tokens=200, tps=20))


async def test_a_frozen_worker_is_fenced_when_it_wakes(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    frozen = start_worker(env=FAST)
    request = chat("zombie", tokens=40, tps=20)
    job_id = await fleet.submit(request)
    async for event in fleet.tail(job_id):
        if event.type == DELTA:
            break
    frozen.send_signal(signal.SIGSTOP)  # a long GC pause, a partition: its lease lapses
    try:
        start_worker(env=FAST)
        assert (await fleet.wait(job_id, timeout=30)).type == DONE
    finally:
        frozen.send_signal(signal.SIGCONT)
    await asyncio.sleep(1)  # let the zombie try to write; nothing may land after the end
    events = await history(fleet, job_id)
    check_history(events)
    assert visible_text(events) == expected_text(request)


async def test_cancel_of_a_job_waiting_to_retry(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(env={**FAST, "STREAMFLEET_RETRY_BASE_SECONDS": "30", "STREAMFLEET_RETRY_MAX_SECONDS": "30"})
    job_id = await fleet.submit(chat("waits to retry", fault="503"))
    async for event in fleet.tail(job_id):
        if event.type == RETRY:
            assert await fleet.cancel(job_id) == "signalled"
    events = await history(fleet, job_id)
    check_history(events)
    assert events[-1].type == CANCELLED and events[-1].data["partial"] is None


async def test_a_cancel_published_while_the_listener_was_away_still_stops_the_job(
    fleet: FleetClient, start_worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    """The flag is set and its message lost (the worker's pub/sub connection is down): the worker
    checks its jobs' flags when it subscribes again, long before its 30 s backstop sweep."""
    start_worker(env=FAST)
    job_id = await fleet.submit(chat("cancelled unheard", tokens=400, tps=20))
    deltas = 0
    async for event in fleet.tail(job_id):
        deltas += event.type == DELTA
        if deltas == 20:  # a second in: the worker's start-up checks are behind it
            break
    assert await fleet.stores.streams.cancel(job_id) == "signal"  # the flag, with no message
    assert sync_redis.client_kill_filter(_type="pubsub") >= 1
    began = time.monotonic()
    assert (await fleet.wait(job_id, timeout=15)).type == CANCELLED
    assert time.monotonic() - began < 10
    check_history(await history(fleet, job_id))


async def test_a_subscriber_that_leaves_cancels_nothing(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker(env=FAST)
    request = chat("leave early", tokens=20)
    job_id = await fleet.submit(request)
    async for event in fleet.tail(job_id):
        if event.type == DELTA:
            break  # the subscriber goes away
    assert (await fleet.result(job_id, timeout=20))["text"] == expected_text(request)


async def test_jobs_arq_gives_up_on_still_end(
    fleet: FleetClient, start_worker: WorkerFactory, sync_redis: redis.Redis
) -> None:
    expired = await fleet.submit(chat("expires in the queue"))
    sync_redis.pexpire(keys.arq_job(expired), 1)
    unreadable = await fleet.submit(chat("garbled"))
    sync_redis.set(keys.arq_job(unreadable), b"\x80not json")
    wait_until(lambda: not sync_redis.exists(keys.arq_job(expired)), what="the queue entry to expire")
    start_worker(env=FAST)
    first = await fleet.wait(expired, timeout=10)
    assert first.type == ERROR and first.data["error"]["type"] == "timeout"
    assert "expired in the queue" in first.data["error"]["message"]
    second = await fleet.wait(unreadable, timeout=10)
    assert second.type == ERROR and second.data["error"]["type"] == "internal"


async def test_the_stream_expires_after_the_retention_time(
    settings: Any, start_worker: WorkerFactory, sync_redis: redis.Redis, stream_redis: redis.Redis
) -> None:
    start_worker(env={**FAST, "STREAMFLEET_STREAM_TTL_SECONDS": "30"})
    async with FleetClient(settings) as fleet:
        job_id, _ = await run_job(fleet, chat("short-lived", tokens=3))
    for key in (keys.events(job_id), keys.owner(job_id), keys.attempts(job_id)):
        assert 0 < stream_redis.ttl(key) <= 30, key
    wait_until(lambda: sync_redis.zcard(keys.RUNNING) == 0, what="the lease to go with the job")
    assert not sync_redis.exists(keys.arq_job(job_id))
