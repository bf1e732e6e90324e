"""Redis really restarts under a running job: with AOF nothing is lost; without persistence, readers
get a clear error instead of a hang and the fleet goes on with new jobs."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import FleetClient, UnknownJob
from shared.embedded import server_command
from shared.models import DELTA, DONE
from shared.settings import Settings
from shared.store import keys
from simulator import expected_text
from tests.conftest import WorkerFactory, free_port, port_open, stop_process, wait_until
from tests.test_failures import FAST, chat, check_history, history, visible_text

pytestmark = pytest.mark.slow


class RestartableRedis:
    def __init__(self, directory: Path, *, aof: bool) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.aof = aof
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            server_command(self.port, self.directory, aof=self.aof),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), what="Redis to listen")
        wait_until(self._loaded, what="Redis to load its data")

    def _loaded(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url).ping())
        except redis.exceptions.BusyLoadingError:  # still reading its AOF: not yet
            return False

    def kill(self) -> None:
        assert self.process is not None
        stop_process(self.process, sig=9)


@pytest.fixture(params=[True, False], ids=["aof", "no-persistence"])
def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path, aof=request.param)
    server.start()
    yield server
    if server.process is not None:
        stop_process(server.process)


async def test_a_job_streams_through_a_redis_restart(
    restartable: RestartableRedis, fleet_env: dict[str, str], start_worker: WorkerFactory, settings: Settings
) -> None:
    env = {**fleet_env, **FAST, "STREAMFLEET_REDIS_URL": restartable.url}
    worker = start_worker(env=env, wait=False)
    settings = settings.model_copy(update={"redis_url": restartable.url})
    request = chat("through a restart", tokens=60, tps=20)
    async with FleetClient(settings) as fleet:
        wait_until(lambda: redis.Redis.from_url(restartable.url).keys(keys.WORKER_PREFIX + "*"), what="the worker")
        job_id = await fleet.submit(request)
        seen: list[Any] = []

        async def read() -> None:
            async for event in fleet.tail(job_id):
                seen.append(event)

        reader = asyncio.create_task(read())
        while sum(e.type == DELTA for e in seen) < 10:
            await asyncio.sleep(0.02)
        restartable.kill()
        await asyncio.sleep(1.0)
        restartable.start()

        if restartable.aof:
            await asyncio.wait_for(reader, 30)
            events = await history(fleet, job_id)
            check_history(events)
            assert events[-1].type == DONE
            assert visible_text(events) == visible_text(seen) == expected_text(request)
        else:
            with pytest.raises(UnknownJob):
                await asyncio.wait_for(reader, 30)  # the stream is gone, and the reader says so
        # Either way the same worker process goes on taking jobs.
        after = chat("after the restart", tokens=5)
        assert (await fleet.result(await fleet.submit(after), timeout=30))["text"] == expected_text(after)
    assert worker.poll() is None
