"""The whole path: submit -> worker process -> job stream -> tailers, against the real simulator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import uvloop

from producer import FleetClient, InvalidRequest, JobCancelled, UnknownJob
from shared.accumulate import delta_text
from shared.models import CANCELLED, DELTA, DONE, QUEUED, RETRY, STARTED, Event
from shared.settings import Settings
from shared.store import keys
from simulator import expected_text
from tests.conftest import Simulator, WorkerFactory, stop_process, wait_until

pytestmark = pytest.mark.split_roles


def chat(prompt: str, **simulator: object) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "simulator": simulator}


async def collect(fleet: FleetClient, job_id: str, after: str = "0") -> list[Event]:
    return [event async for event in fleet.tail(job_id, after=after)]


async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_subscribers_live_and_late_see_the_same_events(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker()
    request = chat("two subscribers", tokens=40, tps=200)
    job_id = await fleet.submit(request)
    live = await asyncio.gather(collect(fleet, job_id), collect(fleet, job_id))
    late = await collect(fleet, job_id)

    assert live[0] == live[1] == late
    types = [event.type for event in late]
    assert types[:2] == [QUEUED, STARTED]
    assert types[-1] == DONE
    assert set(types[2:-1]) == {DELTA}
    ids = [event.id for event in late]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)

    text = "".join(delta_text(event.data["chunk"]) for event in late if event.type == DELTA)
    result = await fleet.result(job_id, timeout=10)
    assert text == result["text"] == expected_text(request)
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == 40
    assert late[-1].data == {"result": result}


async def test_live_tails_share_the_clients_reader(
    settings: Settings, start_worker: WorkerFactory, stream_redis: redis.Redis
) -> None:
    """A client's live tails wait on its shared reader: 40 jobs followed at once hold one blocked
    connection between them, not one each, and every tail still gets its whole stream."""
    start_worker()
    name = "shared-tails"
    async with FleetClient(settings, name=name) as fleet:
        ids = [await fleet.submit(chat(f"shared tail {i}", tokens=5, ttft_ms=2500)) for i in range(40)]
        tails: list[asyncio.Task[list[Event]]] = []
        for job_id in ids:  # one at a time: what each tail holds, not what a burst of reads borrows
            first = asyncio.Event()

            async def follow(job_id: str = job_id, first: asyncio.Event = first) -> list[Event]:
                events = []
                async for event in fleet.tail(job_id):
                    events.append(event)
                    first.set()
                return events

            tails.append(asyncio.create_task(follow()))
            await asyncio.wait_for(first.wait(), timeout=10)
        connections = [client for client in stream_redis.client_list() if client.get("name") == name]
        assert not any(tail.done() for tail in tails)  # all of them live, waiting for tokens
        # The reader's one, and the few the client's commands and scripts use: a handful, not one a tail.
        assert len(connections) <= 8, [client["cmd"] for client in connections]
        for job_id, events in zip(ids, await asyncio.wait_for(asyncio.gather(*tails), timeout=30), strict=True):
            assert events == await collect(fleet, job_id) and events[-1].type == DONE


async def test_tail_resumes_after_any_event(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker()
    job_id = await fleet.submit(chat("resume", tokens=10))
    everything = await collect(fleet, job_id)
    for cut in range(len(everything)):
        assert await collect(fleet, job_id, after=everything[cut].id) == everything[cut + 1 :]


async def test_result_of_a_job_still_queued_waits_for_the_worker(
    fleet: FleetClient, start_worker: WorkerFactory
) -> None:
    request = chat("queued first", tokens=5)
    job_id = await fleet.submit(request)
    assert (await fleet.status(job_id))["status"] == "queued"
    waiting = asyncio.create_task(fleet.result(job_id, timeout=20))
    await asyncio.sleep(0)
    start_worker()
    assert (await waiting)["text"] == expected_text(request)
    status = await fleet.status(job_id)
    assert status["status"] == "done" and status["result"]["text"] == expected_text(request)


async def test_cancel_mid_stream_closes_the_upstream(
    fleet: FleetClient, start_worker: WorkerFactory, simulator: Simulator
) -> None:
    start_worker()
    disconnected_before = simulator.stats()["disconnected"]
    job_id = await fleet.submit(chat("cancel me", tokens=2000, tps=50))
    seen: list[Event] = []
    async for event in fleet.tail(job_id):
        seen.append(event)
        if event.type == DELTA and sum(e.type == DELTA for e in seen) == 3:
            assert await fleet.cancel(job_id) == "signalled"
    assert seen[-1].type == CANCELLED
    partial = seen[-1].data["partial"]
    streamed = "".join(delta_text(e.data["chunk"]) for e in seen if e.type == DELTA)
    assert partial["text"] == streamed and streamed
    assert sum(e.type == DELTA for e in seen) < 100
    wait_until(lambda: simulator.stats()["disconnected"] > disconnected_before, what="the upstream to close")
    assert await fleet.cancel(job_id) == "ended"  # idempotent
    with pytest.raises(JobCancelled) as raised:
        await fleet.result(job_id, timeout=5)
    assert raised.value.data["partial"]["text"] == streamed


async def test_cancel_of_a_queued_job_ends_it_and_it_never_runs(
    fleet: FleetClient, start_worker: WorkerFactory, simulator: Simulator, sync_redis: redis.Redis
) -> None:
    job_id = await fleet.submit(chat("never runs"))
    assert await fleet.cancel(job_id) == "cancelled"
    assert [e.type for e in await collect(fleet, job_id)] == [QUEUED, CANCELLED]
    assert sync_redis.zcard(keys.QUEUE) == 0
    requests_before = simulator.stats()["requests"]
    start_worker()
    follow_up = await fleet.submit(chat("runs"))
    await fleet.result(follow_up, timeout=10)
    assert simulator.stats()["requests"] == requests_before + 1
    assert [e.type for e in await collect(fleet, job_id)] == [QUEUED, CANCELLED]


async def test_unknown_job_ids_fail_at_once(fleet: FleetClient) -> None:
    for job_id in ("job_doesnotexist", "not a job id!", ""):
        with pytest.raises(UnknownJob):
            await collect(fleet, job_id)
        with pytest.raises(UnknownJob):
            await fleet.result(job_id, timeout=30)
        with pytest.raises(UnknownJob):
            await fleet.cancel(job_id)
        with pytest.raises(UnknownJob):
            await fleet.status(job_id)


@pytest.mark.parametrize(
    ("request_body", "endpoint", "message"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "chat.completions", "model"),
        ({"model": "m", "messages": []}, "chat.completions", "messages"),
        ({"model": "m", "messages": [{"content": "no role"}]}, "chat.completions", "role"),
        ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "chat.completions", "model"),
        (["not", "an", "object"], "chat.completions", "JSON object"),
        ({"model": "m", "input": "x"}, "completions", "unknown endpoint"),
        ({"model": "m", "input": 5}, "responses", "input"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x" * 2_000_000}]},
            "chat.completions",
            "limit",
        ),
    ],
)
async def test_invalid_requests_are_refused_before_anything_is_queued(
    fleet: FleetClient,
    sync_redis: redis.Redis,
    stream_redis: redis.Redis,
    request_body: object,
    endpoint: str,
    message: str,
) -> None:
    with pytest.raises(InvalidRequest, match=message) as raised:
        await fleet.submit(request_body, endpoint=endpoint)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)
    assert sync_redis.dbsize() == 0 and stream_redis.dbsize() == 0


async def test_unknown_fields_reach_the_upstream_untouched(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker()
    request = chat("passthrough", tokens=3)
    request["temperature"] = 0.25
    request["x_vendor_option"] = {"nested": [1, 2, 12345678901234567890123]}
    job_id = await fleet.submit(request)
    assert (await fleet.result(job_id, timeout=10))["text"] == expected_text(request)


async def test_responses_endpoint_streams_events_and_result(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    start_worker()
    request = {"model": "sim", "input": "responses please", "simulator": {"tokens": 12}}
    job_id = await fleet.submit(request, endpoint="responses")
    events = await collect(fleet, job_id)
    kinds = [e.data["chunk"]["type"] for e in events if e.type == DELTA]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    result = await fleet.result(job_id)
    assert result["text"] == expected_text(request)
    assert result["completion"]["status"] == "completed"
    assert result["finish_reason"] == "stop"


async def test_idempotency_key_returns_one_job_under_concurrent_submits(
    fleet: FleetClient, sync_redis: redis.Redis, stream_redis: redis.Redis
) -> None:
    ids = await asyncio.gather(*(fleet.submit(chat("once"), idempotency_key="order-42") for _ in range(50)))
    assert len(set(ids)) == 1
    assert sync_redis.zcard(keys.QUEUE) == 1
    assert stream_redis.xlen(keys.events(ids[0])) == 1


async def test_fleet_status_counts_workers_and_queue(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    await fleet.submit(chat("waits"))
    status = await fleet.status()
    assert status["queued"] == 1 and status["workers"] == []
    start_worker("--concurrency", "7")
    status = await fleet.status()
    assert len(status["workers"]) == 1 and status["workers"][0]["pid"] != os.getpid()


async def test_upstream_http_error_ends_the_job_with_error(settings, start_worker: WorkerFactory) -> None:  # type: ignore[no-untyped-def]
    start_worker(env={"STREAMFLEET_UPSTREAM_BASE_URL": settings.upstream_base_url + "/missing"})
    async with FleetClient(settings) as fleet:
        job_id = await fleet.submit(chat("404"))
        event = await fleet.wait(job_id, timeout=10)
    assert event.type == "error"
    assert event.data["error"]["type"] == "upstream_error" and event.data["error"]["status"] == 404
    assert event.data["partial"] is None


async def test_the_upstream_key_reaches_no_redis_value_and_no_log(
    fleet: FleetClient, fleet_env: dict[str, str], sync_redis: redis.Redis, stream_redis: redis.Redis, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"], env={**os.environ, **fleet_env}, stdout=output, stderr=output
        )
        try:
            job_id = await fleet.submit(chat("secret?", tokens=5))
            await fleet.result(job_id, timeout=20)
        finally:
            stop_process(worker)
    secret = fleet_env["STREAMFLEET_UPSTREAM_API_KEY"].encode()
    for client in (sync_redis, stream_redis):
        for key in client.scan_iter():
            dumped = client.dump(key) or b""
            assert secret not in dumped and secret not in key
    logged = log.read_bytes()
    assert job_id.encode() in logged and b"done" in logged
    assert secret not in logged and b"secret?" not in logged  # neither the key nor the request body


async def test_workers_claiming_one_burst_run_each_job_once(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    """Two workers take batches from the same queue at once: every job runs exactly one attempt."""
    start_worker("--concurrency", "40")
    start_worker("--concurrency", "40")
    ids = await asyncio.gather(*(fleet.submit(chat(f"burst {i}", tokens=5, tps=1000)) for i in range(150)))
    for job_id in ids:
        assert (await fleet.wait(job_id, timeout=60)).type == DONE
    for job_id in ids:
        types = [event.type for event in await collect(fleet, job_id)]
        assert types.count(STARTED) == 1, (job_id, types)
        assert RETRY not in types
