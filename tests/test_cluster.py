"""The stream store's keys on a real local Redis Cluster (tests/cluster.py): what the data model
promises a cluster today. Every key of one job is in one slot (the job id is the hash tag), so each
script of a job's life runs on one node; job ids spread evenly over the primaries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bench.common import cpu_s
from producer import FleetClient
from producer.fanout import FanOut, ReadFailed
from shared.accumulate import delta_text
from shared.models import CANCELLED, DONE, RETRY, TERMINAL_TYPES, Event
from shared.ports import free_port, port_open
from shared.settings import Settings
from shared.store import Unavailable, keys
from simulator import expected_text
from tests.cluster import LocalCluster, local_cluster
from tests.conftest import Simulator, stop_process, wait_until
from tests.test_failures import FAST, chat, check_history, history, visible_text
from tests.test_gateway import parse_sse, read_events

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_a_jobs_keys_share_a_slot_and_jobs_spread_over_the_primaries(tmp_path: Path) -> None:
    with local_cluster(tmp_path) as cluster:
        node = cluster.client(cluster.primaries[0])
        job_ids = ["job_" + uuid.uuid4().hex for _ in range(3000)]  # as FleetClient.submit makes them
        for job_id in job_ids[:50]:
            job_keys = [keys.events(job_id), keys.owner(job_id), keys.attempts(job_id), keys.tenant(job_id)]
            job_keys.append(keys.cancel_flag(job_id))
            assert len({node.execute_command("CLUSTER", "KEYSLOT", key) for key in job_keys}) == 1, job_id
        spread = Counter(cluster.owner(keys.events(job_id)) for job_id in job_ids)
        shares = sorted(count / len(job_ids) for count in spread.values())
        print(f"3,000 jobs over 3 primaries: {sorted(spread.values())}")
        assert len(spread) == 3 and shares[0] > 0.29 and shares[-1] < 0.38
        # A script over one job's keys runs on the node that owns them; across two jobs it is refused.
        owner = cluster.client(cluster.owner(keys.events(job_ids[0])))
        assert owner.eval(
            "return redis.call('XADD', KEYS[1], '*', 'k', 'v')", 2, keys.events(job_ids[0]), keys.owner(job_ids[0])
        )
        other = next(
            job_id
            for job_id in job_ids[1:]
            if cluster.owner(keys.events(job_id)) == cluster.owner(keys.events(job_ids[0]))
            and node.execute_command("CLUSTER", "KEYSLOT", keys.events(job_id))
            != node.execute_command("CLUSTER", "KEYSLOT", keys.events(job_ids[0]))
        )
        with pytest.raises(redis.ResponseError, match="CROSSSLOT"):  # same node, another slot
            owner.xread({keys.events(job_ids[0]): "0", keys.events(other): "0"})


async def test_workers_and_the_client_keep_job_streams_on_a_cluster(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """Workers write and the Python client tails job streams on a 3-primary cluster (the queue on its own
    server, the cluster named by two seeds): 30 jobs over every primary, 10 tailed live, one cancelled;
    every job ends once with its whole text, and each tail saw its job's every event."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir) as (fleet, workers, _):
            requests = [chat(f"on the cluster {i}", tokens=40, tps=40) for i in range(30)]
            ids = [await fleet.submit(request) for request in requests]
            assert {cluster.owner(keys.events(job_id)) for job_id in ids} == set(cluster.primaries)
            cancelled = ids[-1]
            assert await fleet.cancel(cancelled) in ("cancelled", "signalled")

            seen = await asyncio.wait_for(
                asyncio.gather(*(_tail_ids(fleet, job_id) for job_id in ids[:10])), timeout=60
            )
            ends = [await fleet.wait(job_id, timeout=60) for job_id in ids]
            for job_id, request, end in zip(ids, requests, ends, strict=True):
                events = await history(fleet, job_id)
                assert [event.type in TERMINAL_TYPES for event in events].count(True) == 1, job_id
                if job_id == cancelled:
                    assert end.type == CANCELLED
                else:
                    assert end.type == DONE, (job_id, end)
                    assert (await fleet.result(job_id))["text"] == expected_text(request)
            for job_id, ids_seen in zip(ids[:10], seen, strict=True):
                assert ids_seen == [event.id for event in await history(fleet, job_id)]
        assert [worker.returncode for worker in workers] == [0, 0]  # drained and stopped cleanly


async def test_the_gateway_streams_resumes_and_fans_out_jobs_on_a_cluster(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """The gateway's fan-in on a cluster (shared.store.live): 12 jobs or more, over every primary, three SSE
    subscribers each (live, joining mid-stream, after the end), a resume from the middle, and the OpenAI
    streaming route; every stream holds its job's every event, and the gateway holds a connection per
    primary per reader, not one per job."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir, gateway=True) as (fleet, _, gateway):
            assert gateway is not None
            async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
                # At least 12 jobs, and as many more as it takes for every primary to own one (a primary
                # owns none of 12 random ids ~2 % of the time).
                requests: list[dict[str, Any]] = []
                jobs: list[str] = []
                while len(jobs) < 12 or {cluster.owner(keys.events(job_id)) for job_id in jobs} != set(
                    cluster.primaries
                ):
                    assert len(jobs) < 40, "40 random job ids and a primary owns none of them"
                    requests.append(chat(f"gateway on the cluster {len(jobs)}", tokens=30, tps=30))
                    jobs.append((await client.post("/v1/jobs", json={"request": requests[-1]})).json()["id"])

                async def late(job_id: str) -> list[dict[str, Any]]:
                    await asyncio.sleep(0.5)
                    return await read_events(client, f"/v1/jobs/{job_id}/events")

                live = [read_events(client, f"/v1/jobs/{job_id}/events") for job_id in jobs]
                joining = [late(job_id) for job_id in jobs]
                seen = await asyncio.wait_for(asyncio.gather(*live, *joining), timeout=60)
                for i, (job_id, request) in enumerate(zip(jobs, requests, strict=True)):
                    events = [event.id for event in await history(fleet, job_id)]
                    assert [e["id"] for e in seen[i]] == events, job_id
                    assert [e["id"] for e in seen[len(jobs) + i]] == events, job_id
                    after = await read_events(client, f"/v1/jobs/{job_id}/events")
                    assert after == seen[i]
                    middle = seen[i][len(seen[i]) // 2]["id"]
                    rest = await read_events(client, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": middle})
                    assert rest == seen[i][len(seen[i]) // 2 + 1 :]
                    text = "".join(delta_text(json.loads(e["data"])["chunk"]) for e in seen[i] if e["event"] == "delta")
                    assert text == expected_text(request) and seen[i][-1]["event"] == DONE

                request = chat("openai route on the cluster", tokens=20, tps=40)
                async with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as answer:
                    assert answer.status_code == 200
                    chunks = [e for e in parse_sse((await answer.aread()).decode()) if e["data"] != "[DONE]"]
                assert "".join(delta_text(json.loads(e["data"])) for e in chunks) == expected_text(request)

            # Per primary, one connection per fan-out reader (4): the live channels of 12 jobs share them.
            for port in cluster.primaries:
                clients = cluster.client(port).client_list(_type="pubsub")
                assert len(clients) <= 4, clients


async def test_retries_and_a_killed_worker_on_a_cluster(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """The recovery paths on a cluster: 12 streams cut mid-body once (retried, no doubled text) and a
    worker SIGKILLed under 12 more (their leases lapse, the other worker voids the lost attempts and runs
    them again): every job ends once, with its whole text as a reader keeps it, over every primary."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir, extra_env=FAST) as (fleet, workers, _):
            cut = [
                chat(f"cut once on the cluster {i}", tokens=30, fault="drop", fault_after=8, fault_times=1)
                for i in range(12)
            ]
            slow = [chat(f"outlives its worker {i}", tokens=60, tps=20) for i in range(12)]
            ids = [await fleet.submit(request) for request in cut + slow]
            assert {cluster.owner(keys.events(job_id)) for job_id in ids} == set(cluster.primaries)
            async for event in fleet.tail(ids[-1]):
                if event.type == "delta":
                    break
            victim = await _holder(fleet, workers, ids[len(cut) :])
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            ends = [await fleet.wait(job_id, timeout=60) for job_id in ids]
            lost = 0
            for i, (job_id, request, end) in enumerate(zip(ids, cut + slow, ends, strict=True)):
                events = await history(fleet, job_id)
                check_history(events)
                assert end.type == DONE, (job_id, end)
                assert visible_text(events) == expected_text(request) == end.data["result"]["text"]
                assert i >= len(cut) or RETRY in {e.type for e in events}, job_id  # each cut was retried
                lost += any(e.type == RETRY and e.data["error"]["type"] == "worker_lost" for e in events)
            print(f"{lost} jobs ran again after their worker was killed")
            assert lost >= 1


async def test_job_streams_on_a_cluster_survive_the_death_of_a_primary(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """A primary that owns running jobs is SIGKILLed mid-stream: its replica takes over (node timeout 2 s),
    the writers, the tailers and the gateway's fan-in wait it out, and every job ends once with its whole
    text, every tail and every SSE subscriber with its job's end."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir, gateway=True) as (fleet, _, gateway):
            assert gateway is not None
            requests = [chat(f"through a failover {i}", tokens=80, tps=20) for i in range(20)]
            ids = [await fleet.submit(request) for request in requests]

            streaming = [asyncio.Event() for _ in ids[8:16]]

            tails = [asyncio.create_task(_tail_ids(fleet, job_id)) for job_id in ids[:8]]
            subscribers = [
                asyncio.create_task(_sse_ids(gateway, job_id, started))
                for job_id, started in zip(ids[8:16], streaming, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(started.wait() for started in streaming)), timeout=30)
            async for event in fleet.tail(ids[0]):
                if event.type == "delta":
                    break
            # The primary of a tailed job and, when another is, of an SSE subscriber's job (a primary owns
            # none of 8 random jobs 4 % of the time).
            owners = [cluster.owner(keys.events(job_id)) for job_id in ids]
            victim = max(set(owners[:8]) & set(owners[8:16]) or {owners[0]}, key=owners[8:16].count)
            cluster.processes[victim].send_signal(signal.SIGKILL)
            cluster.processes[victim].wait()
            ends = [await _wait(fleet, job_id) for job_id in ids]
            seen = await asyncio.wait_for(asyncio.gather(*tails), timeout=60)
            heard = await asyncio.wait_for(asyncio.gather(*subscribers), timeout=60)
            on_victim = sum(cluster.owner(keys.events(job_id)) == victim for job_id in ids)
            heard_on_victim = sum(owner == victim for owner in owners[8:16])
            print(f"{on_victim} of {len(ids)} jobs lived on the killed primary, {heard_on_victim} of them heard by SSE")
            for job_id, request, end in zip(ids, requests, ends, strict=True):
                events = await history(fleet, job_id)
                assert [event.type in TERMINAL_TYPES for event in events].count(True) == 1, job_id
                assert end.type == DONE, (job_id, end)
                assert (await fleet.result(job_id))["text"] == expected_text(request)
            for job_id, ids_seen in zip(ids[:8], seen, strict=True):
                assert ids_seen[-1] == (await history(fleet, job_id))[-1].id
            for job_id, ids_heard in zip(ids[8:16], heard, strict=True):  # the gateway's subscribers too
                assert ids_heard[-1] == (await history(fleet, job_id))[-1].id


async def test_a_slot_moved_under_running_jobs_loses_nothing(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """Resharding: the slots of two running jobs are migrated to another primary (SETSLOT IMPORTING /
    MIGRATING, MIGRATE of every key, SETSLOT NODE) while workers write them and the Python client and the
    gateway's subscribers follow them. Writers and readers are redirected (ASK, MOVED), the gateway's
    subscriptions are moved by the server and made again on the new owner; nothing is lost: every
    follower sees exactly its job's history, and every job ends once with its whole text."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir, gateway=True) as (fleet, _, gateway):
            assert gateway is not None
            requests = [chat(f"resharded {i}", tokens=80, tps=20) for i in range(6)]
            ids = [await fleet.submit(request) for request in requests]
            streaming = [asyncio.Event() for _ in ids]

            subscribers = [
                asyncio.create_task(_sse_ids(gateway, job_id, started))
                for job_id, started in zip(ids, streaming, strict=True)
            ]
            tails = [asyncio.create_task(_tail_ids(fleet, job_id)) for job_id in ids]
            await asyncio.wait_for(asyncio.gather(*(started.wait() for started in streaming)), timeout=30)
            async for event in fleet.tail(ids[0]):
                if event.type == "delta":
                    break
            for job_id in ids[:2]:
                _migrate(cluster, keys.events(job_id))
            ends = [await _wait(fleet, job_id) for job_id in ids]
            heard = await asyncio.wait_for(asyncio.gather(*subscribers), timeout=60)
            seen = await asyncio.wait_for(asyncio.gather(*tails), timeout=60)
            for job_id, request, end, ids_heard, ids_seen in zip(ids, requests, ends, heard, seen, strict=True):
                events = await history(fleet, job_id)
                assert [event.type in TERMINAL_TYPES for event in events].count(True) == 1, job_id
                assert end.type == DONE and end.data["result"]["text"] == expected_text(request), job_id
                assert ids_heard == ids_seen == [event.id for event in events], job_id


async def test_a_cluster_read_that_fails_ends_only_the_stream_that_caused_it(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """As on one Redis (test_seams): a read that Redis refuses for one stream's own reason (a cursor it
    refuses, slipped past the checks as a bug would) ends that stream's subscribers, not the reader; only
    a slot that moved counts as Redis being away."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir) as (fleet, _, _):
            healthy = await fleet.submit(chat("cluster reader, healthy", tokens=80, tps=40))
            poisoned = await fleet.submit(chat("cluster reader, poisoned", tokens=10, ttft_ms=3000))
            fanout = FanOut(fleet.stores.streams, readers=1, ping_interval=60)
            fanout.start()
            try:

                async def read(job_id: str) -> list[str]:
                    return [entry.id async for entry in fanout.events(job_id) if entry is not None]

                reading = asyncio.create_task(read(healthy))
                failing = asyncio.create_task(read(poisoned))
                await asyncio.sleep(0.5)
                reader = fanout._readers[0]
                follow = reader.follows[poisoned]
                follow.cursor = reader.cursors[follow.handle] = "99999999999999999999999"
                reader.wake.due.add(follow.handle)  # as an announcement would
                with pytest.raises(ReadFailed):
                    await asyncio.wait_for(failing, timeout=10)
                assert await asyncio.wait_for(reading, timeout=30) == [e.id for e in await history(fleet, healthy)]
                assert fanout.tasks.healthy and fanout.tasks.restarts == 0
            finally:
                await fanout.aclose()


async def test_a_node_that_refuses_subscriptions_is_retried_with_backoff(
    tmp_path: Path, redis_url: str, state_dir: Path
) -> None:
    """A gateway whose Redis user may not SSUBSCRIBE (an ACL) cannot follow live channels: it tries again
    after a doubling delay, not in a loop (a handful of log lines and little CPU in 4 s), and still
    answers with what it can read (the job's catch-up)."""
    with local_cluster(tmp_path) as cluster:
        for port in cluster.primaries:
            cluster.client(port).execute_command(
                "ACL", "SETUSER", "gw", "on", ">pw", "~*", "&*", "+@all", "-ssubscribe"
            )
        seeds = ",".join(f"127.0.0.1:{port}" for port in cluster.primaries[:2])
        settings = Settings(redis_url=redis_url, stream_redis_url=f"redis+cluster://{seeds}", state_dir=state_dir)
        async with FleetClient(settings) as fleet:
            job_id = await fleet.submit(chat("no live channel"))  # no worker: it stays queued
        port = free_port()
        env = {
            **os.environ,
            "STREAMFLEET_REDIS_URL": redis_url,
            "STREAMFLEET_STREAM_REDIS_URL": f"redis+cluster://gw:pw@{seeds}",
            "STREAMFLEET_STATE_DIR": str(state_dir),
        }
        log = (tmp_path / "gateway.log").open("wb")
        gateway = subprocess.Popen([sys.executable, "-m", "producer.gateway", "--port", str(port)], env=env, stderr=log)
        try:
            wait_until(lambda: port_open(port), what="the gateway")
            cpu_before = cpu_s(gateway.pid)
            lines: list[str] = []

            async def listen() -> None:
                async with (
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
                    client.stream("GET", f"/v1/jobs/{job_id}/events") as response,
                ):
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        lines.append(line)

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listen(), timeout=4)
            assert "event: queued" in lines  # the catch-up, read without a live channel
            cpu = cpu_s(gateway.pid) - cpu_before
        finally:
            stop_process(gateway)
            log.close()
        lost = (tmp_path / "gateway.log").read_text().count("live channels on")
        print(f"{lost} resubscriptions logged in 4 s, gateway CPU {cpu:.2f} s")
        assert 2 <= lost <= 12 and cpu < 1.5  # without the backoff: thousands, and a core


def _migrate(cluster: LocalCluster, key: str) -> None:
    """Move ``key``'s slot, with every key in it, to the next primary, as redis-cli --cluster reshard does."""
    slot = int(cluster.client(cluster.primaries[0]).execute_command("CLUSTER", "KEYSLOT", key))
    source = cluster.owner(key)
    target = cluster.primaries[(cluster.primaries.index(source) + 1) % len(cluster.primaries)]
    source_id, target_id = (cluster.client(port).execute_command("CLUSTER", "MYID") for port in (source, target))
    cluster.client(target).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    cluster.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while moving := cluster.client(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        cluster.client(source).execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *moving)
    for port in cluster.primaries:
        cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def _tail_ids(fleet: FleetClient, job_id: str) -> list[str]:
    """The ids the Python client's tail of a job receives."""
    return [event.id async for event in fleet.tail(job_id)]


async def _sse_ids(gateway: str, job_id: str, started: asyncio.Event) -> list[str]:
    """The ids an SSE subscriber of the gateway receives; ``started`` is set at the first."""
    heard = []
    async with (
        httpx.AsyncClient(base_url=gateway, timeout=90) as client,
        client.stream("GET", f"/v1/jobs/{job_id}/events") as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                heard.append(line[4:])
                started.set()
    return heard


async def _holder(
    fleet: FleetClient, workers: list[subprocess.Popen[bytes]], job_ids: list[str]
) -> subprocess.Popen[bytes]:
    """The worker process that runs some of ``job_ids``, as its heartbeat says."""
    for _ in range(100):
        for worker in (await fleet.status())["workers"]:
            if set(worker.get("running", [])) & set(job_ids):
                return next(process for process in workers if process.pid == worker["pid"])
        await asyncio.sleep(0.1)
    raise AssertionError("no worker reports running these jobs")


async def _wait(fleet: FleetClient, job_id: str) -> Event:
    """``wait``, called again while the cluster fails over (``tail`` retries by itself; ``wait`` raises
    what Redis raised and leaves the retry to its caller)."""
    for _ in range(300):
        try:
            return await fleet.wait(job_id, timeout=90)
        except Unavailable:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{job_id} never ended")


@contextlib.asynccontextmanager
async def fleet_on(
    cluster: LocalCluster,
    simulator: Simulator,
    redis_url: str,
    state_dir: Path,
    *,
    gateway: bool = False,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[FleetClient, list[subprocess.Popen[bytes]], str | None]]:
    """Two workers, a client and, with ``gateway``, a gateway (its URL), with the job streams on ``cluster``
    (named by two seeds) and the queue on ``redis_url``; stopped (SIGTERM) when the block ends."""
    streams_url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in cluster.primaries[:2])
    env = {
        **os.environ,
        "STREAMFLEET_REDIS_URL": redis_url,
        "STREAMFLEET_STREAM_REDIS_URL": streams_url,
        "STREAMFLEET_UPSTREAM_BASE_URL": simulator.base_url,
        "STREAMFLEET_STATE_DIR": str(state_dir),
        "STREAMFLEET_WORKER_PROCESSES": "1",
        **(extra_env or {}),
    }
    workers = [subprocess.Popen([sys.executable, "-m", "worker"], env=env) for _ in range(2)]
    processes = list(workers)
    url = None
    if gateway:
        port = free_port()
        processes.append(subprocess.Popen([sys.executable, "-m", "producer.gateway", "--port", str(port)], env=env))
        wait_until(lambda: port_open(port), what="the gateway")
        url = f"http://127.0.0.1:{port}"
    settings = Settings(redis_url=redis_url, stream_redis_url=streams_url, state_dir=state_dir)
    try:
        async with FleetClient(settings) as fleet:
            yield fleet, workers, url
    finally:
        for process in processes:
            stop_process(process)
