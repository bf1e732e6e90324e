"""The stream store's keys on a real local Redis Cluster (tests/cluster.py): what the data model
promises a cluster today. Every key of one job is in one slot (the job id is the hash tag), so each
script of a job's life runs on one node; job ids spread evenly over the primaries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from producer import FleetClient
from shared.models import CANCELLED, DONE, TERMINAL_TYPES, Event
from shared.settings import Settings
from shared.store import Unavailable, keys
from simulator import expected_text
from tests.cluster import LocalCluster, local_cluster
from tests.conftest import Simulator, stop_process
from tests.test_failures import chat, history

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
        async with fleet_on(cluster, simulator, redis_url, state_dir) as (fleet, workers):
            requests = [chat(f"on the cluster {i}", tokens=40, tps=40) for i in range(30)]
            ids = [await fleet.submit(request) for request in requests]
            assert {cluster.owner(keys.events(job_id)) for job_id in ids} == set(cluster.primaries)
            cancelled = ids[-1]
            assert await fleet.cancel(cancelled) in ("cancelled", "signalled")

            async def tail(job_id: str) -> list[str]:
                return [event.id async for event in fleet.tail(job_id)]

            seen = await asyncio.wait_for(asyncio.gather(*(tail(job_id) for job_id in ids[:10])), timeout=60)
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


def test_the_gateway_refuses_a_cluster_it_cannot_follow_yet(fleet_env: dict[str, str]) -> None:
    env = {**os.environ, **fleet_env, "STREAMFLEET_STREAM_REDIS_URL": "redis+cluster://127.0.0.1:7000"}
    done = subprocess.run(
        [sys.executable, "-m", "producer.gateway", "--port", "0"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "Redis Cluster" in done.stderr.strip().splitlines()[-1], done.stderr


async def test_job_streams_on_a_cluster_survive_the_death_of_a_primary(
    tmp_path: Path, simulator: Simulator, redis_url: str, state_dir: Path
) -> None:
    """A primary that owns running jobs is SIGKILLed mid-stream: its replica takes over (node timeout 2 s),
    the writers and the tailers wait it out, and every job ends once with its whole text, every tail with
    its job's end."""
    with local_cluster(tmp_path) as cluster:
        async with fleet_on(cluster, simulator, redis_url, state_dir) as (fleet, _):
            requests = [chat(f"through a failover {i}", tokens=80, tps=20) for i in range(20)]
            ids = [await fleet.submit(request) for request in requests]

            async def tail(job_id: str) -> list[str]:
                return [event.id async for event in fleet.tail(job_id)]

            tails = [asyncio.create_task(tail(job_id)) for job_id in ids[:8]]
            async for event in fleet.tail(ids[0]):
                if event.type == "delta":
                    break
            victim = cluster.owner(keys.events(ids[0]))
            cluster.processes[victim].send_signal(signal.SIGKILL)
            cluster.processes[victim].wait()
            ends = [await _wait(fleet, job_id) for job_id in ids]
            seen = await asyncio.wait_for(asyncio.gather(*tails), timeout=60)
            on_victim = sum(cluster.owner(keys.events(job_id)) == victim for job_id in ids)
            print(f"{on_victim} of {len(ids)} jobs lived on the killed primary")
            for job_id, request, end in zip(ids, requests, ends, strict=True):
                events = await history(fleet, job_id)
                assert [event.type in TERMINAL_TYPES for event in events].count(True) == 1, job_id
                assert end.type == DONE, (job_id, end)
                assert (await fleet.result(job_id))["text"] == expected_text(request)
            for job_id, ids_seen in zip(ids[:8], seen, strict=True):
                assert ids_seen[-1] == (await history(fleet, job_id))[-1].id


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
    cluster: LocalCluster, simulator: Simulator, redis_url: str, state_dir: Path
) -> AsyncIterator[tuple[FleetClient, list[subprocess.Popen[bytes]]]]:
    """Two workers and a client with the job streams on ``cluster`` (named by two seeds) and the queue on
    ``redis_url``; the workers are stopped (SIGTERM) when the block ends."""
    streams_url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in cluster.primaries[:2])
    env = {
        **os.environ,
        "STREAMFLEET_REDIS_URL": redis_url,
        "STREAMFLEET_STREAM_REDIS_URL": streams_url,
        "STREAMFLEET_UPSTREAM_BASE_URL": simulator.base_url,
        "STREAMFLEET_STATE_DIR": str(state_dir),
        "STREAMFLEET_WORKER_PROCESSES": "1",
    }
    workers = [subprocess.Popen([sys.executable, "-m", "worker"], env=env) for _ in range(2)]
    settings = Settings(redis_url=redis_url, stream_redis_url=streams_url, state_dir=state_dir)
    try:
        async with FleetClient(settings) as fleet:
            yield fleet, workers
    finally:
        for worker in workers:
            stop_process(worker)
