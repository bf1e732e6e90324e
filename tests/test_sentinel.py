"""The queue behind Sentinel: a primary, its replica and three Sentinels (the embedded binary), the
fleet given the Sentinels' URL. The primary is SIGKILLed while jobs run and more are submitted: the
replica is promoted, submits and claims resume, and every job ends once, with its text."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import FleetClient
from shared.embedded import sentinel_command, server_command
from shared.models import DONE, ERROR, TERMINAL_TYPES
from shared.settings import Settings
from shared.store import StoreError, Unavailable
from simulator import expected_text
from tests.conftest import Simulator, free_port, port_open, stop_process, wait_until
from tests.test_failures import chat, history

pytestmark = pytest.mark.slow

SERVICE = "sfqueue"


class Queue:
    """The queue's servers: ``primary`` and ``replica`` processes, ``sentinels`` ports, ``url``."""

    def __init__(self, tmp: Path) -> None:
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.primary = subprocess.Popen(server_command(self.primary_port, tmp), **quiet)  # type: ignore[call-overload]
        replica_dir = tmp / "replica"
        replica_dir.mkdir()
        self.replica = subprocess.Popen(  # type: ignore[call-overload]
            [*server_command(self.replica_port, replica_dir), "--replicaof", "127.0.0.1", str(self.primary_port)],
            **quiet,
        )
        self.processes += [self.primary, self.replica]
        for port in self.sentinel_ports:
            command = sentinel_command(port, tmp, service=SERVICE, primary_port=self.primary_port, quorum=2)
            self.processes.append(subprocess.Popen(command, **quiet))  # type: ignore[call-overload]
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url = f"redis+sentinel://{hosts}/{SERVICE}"

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def master_port(self) -> int:
        return int(self.sentinel(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(SERVICE)[1])

    def ready(self) -> bool:
        """Replicating, and every Sentinel knows the replica and the two other Sentinels."""
        with contextlib.suppress(redis.RedisError):
            if redis.Redis(port=self.primary_port).info("replication")["connected_slaves"] != 1:
                return False
            for port in self.sentinel_ports:
                sentinel = self.sentinel(port)
                if len(sentinel.sentinel_slaves(SERVICE)) != 1 or len(sentinel.sentinel_sentinels(SERVICE)) != 2:
                    return False
            return True
        return False


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    servers = Queue(tmp_path)
    try:
        wait_until(lambda: all(port_open(port) for port in servers.sentinel_ports), what="the Sentinels")
        wait_until(servers.ready, timeout=30, what="the replica and the Sentinels to know each other")
        yield servers
    finally:
        for process in servers.processes:
            stop_process(process)


async def _submit(fleet: FleetClient, request: dict[str, object], key: str) -> str:
    """Submit, retrying while the queue fails over: the idempotency key makes a retry the same job."""
    for _ in range(100):
        try:
            return await fleet.submit(request, idempotency_key=key)
        except (StoreError, *Unavailable):
            await asyncio.sleep(0.1)
    raise AssertionError(f"submit {key} never went through")


async def test_the_queue_follows_a_sentinel_failover_and_loses_no_job(
    queue: Queue, simulator: Simulator, redis_url: str, state_dir: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "STREAMFLEET_REDIS_URL": queue.url,
        "STREAMFLEET_STREAM_REDIS_URL": redis_url,
        "STREAMFLEET_UPSTREAM_BASE_URL": simulator.base_url,
        "STREAMFLEET_STATE_DIR": str(state_dir),
        "STREAMFLEET_POLL_DELAY_SECONDS": "0.05",
        "STREAMFLEET_WORKER_PROCESSES": "1",
        "STREAMFLEET_ORPHAN_SWEEP_SECONDS": "2",  # a submit the failover lost is ended, not left hanging
    }
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    outputs = [log.open("wb") for log in logs]
    workers = [subprocess.Popen([sys.executable, "-m", "worker"], env=env, stderr=output) for output in outputs]
    settings = Settings(redis_url=queue.url, stream_redis_url=redis_url, state_dir=state_dir)
    try:
        async with FleetClient(settings) as fleet:
            for _ in range(100):  # both workers are up before the primary goes
                if len(await fleet.stores.queue.workers()) == 2:
                    break
                await asyncio.sleep(0.1)
            before = [chat(f"before the failover {i}", tokens=30, tps=30) for i in range(20)]
            ids = [await _submit(fleet, request, f"before-{i}") for i, request in enumerate(before)]
            async for event in fleet.tail(ids[-1]):  # jobs are running
                if event.type == "delta":
                    break
            old_primary = queue.master_port()
            assert old_primary == queue.primary_port
            queue.primary.send_signal(signal.SIGKILL)
            queue.primary.wait()
            after = [chat(f"during and after the failover {i}", tokens=5) for i in range(20)]
            ids += [await _submit(fleet, request, f"after-{i}") for i, request in enumerate(after)]
            assert queue.master_port() == queue.replica_port  # promoted
            ends = [await fleet.wait(job_id, timeout=60) for job_id in ids]
            for job_id, request, end in zip(ids, before + after, ends, strict=True):
                events = await history(fleet, job_id)
                assert [event.type in TERMINAL_TYPES for event in events].count(True) == 1, job_id
                assert events[-1].type == end.type
                if end.type == DONE:
                    assert (await fleet.result(job_id))["text"] == expected_text(request)
                else:  # a submit the primary took but never passed on: ended by the orphan sweep
                    assert end.type == ERROR and "the queue lost this job" in end.data["error"]["message"], end
            done = sum(end.type == DONE for end in ends)
            print(f"{done} of {len(ids)} jobs done across the failover")
            assert done >= len(ids) - 2
    finally:
        for worker, output in zip(workers, outputs, strict=True):
            stop_process(worker)
            output.close()
        codes = [worker.returncode for worker in workers]
        assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]  # drained and stopped cleanly


def test_sentinel_urls_are_parsed_and_bad_ones_refused_in_one_line() -> None:
    from shared.urls import sentinel_url

    parsed = sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26380,[::1],sentinel-2/queue/3?sentinel_password=x")
    assert parsed.sentinels == [("10.0.0.1", 26380), ("::1", 26379), ("sentinel-2", 26379)]
    assert (parsed.service, parsed.db, parsed.password, parsed.sentinel_password) == ("queue", 3, "s3cret", "x")
    assert not parsed.tls and sentinel_url("rediss+sentinel://h/q").tls
    for bad in (
        "redis+sentinel://h:port/q",
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/q/db",
        "redis+sentinel://,/q",
    ):
        with pytest.raises(ValueError):
            Settings(redis_url=bad)
