"""The soak: hundreds of jobs through three worker processes while a chaos loop SIGKILLs a random worker
every few seconds and the simulator injects faults; then the whole history of every job is checked.

``make soak`` runs it at full size (``STREAMFLEET_SOAK_JOBS``, default 300) and prints its figures;
``make test`` runs a smaller one.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import time
from typing import Any

import pytest

from producer import FleetClient
from shared.models import DONE, ERROR, RETRY, STARTED
from shared.store import parse_id
from simulator import expected_text
from tests.conftest import WorkerFactory
from tests.test_failures import chat, check_history, history, visible_text

pytestmark = [pytest.mark.soak, pytest.mark.split_roles, pytest.mark.timeout(600)]

WORKERS = 3


def faulty_request(index: int, rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    options: dict[str, Any] = {"tokens": rng.randint(10, 60), "tps": rng.choice([40, 80, 150])}
    if roll < 0.08:
        options.update(fault="503", fault_times=1)
    elif roll < 0.14:
        options.update(fault="drop", fault_after=rng.randint(2, 8), fault_times=1)
    elif roll < 0.18:
        options.update(fault="429", retry_after=0.2, fault_times=1)
    elif roll < 0.21:
        options.update(fault="error_event", fault_after=3)  # final: this job must end in error
    return chat(f"soak job {index}", **options)


async def test_soak(fleet: FleetClient, start_worker: WorkerFactory) -> None:
    jobs = int(os.environ.get("STREAMFLEET_SOAK_JOBS", "80"))
    rng = random.Random(20261122)
    env = {"STREAMFLEET_RETRY_BASE_SECONDS": "0.1", "STREAMFLEET_RETRY_MAX_SECONDS": "1"}
    workers = [start_worker(env=env) for _ in range(WORKERS)]
    kills: list[float] = []
    killed_while_running: dict[str, float] = {}
    stop = asyncio.Event()

    async def running_on(pid: int) -> list[str]:
        """The jobs a worker process says it runs (its heartbeat is at most a second old)."""
        for record in await fleet.stores.queue.workers():
            if record.get("pid") == pid:
                return list(record.get("running", []))
        return []

    async def chaos() -> None:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(2.0, 4.0))
            if stop.is_set():
                return
            victim = rng.randrange(len(workers))
            running = await running_on(workers[victim].pid)
            workers[victim].send_signal(signal.SIGKILL)
            killed_at = time.time() * 1000
            kills.append(killed_at)
            for job_id in running:
                killed_while_running.setdefault(job_id, killed_at)
            workers[victim].wait()
            workers[victim] = await asyncio.to_thread(start_worker, env=env)

    requests: dict[str, dict[str, Any]] = {}
    live_text: dict[str, str] = {}

    async def follow(job_id: str) -> None:
        events = [event async for event in fleet.tail(job_id)]
        live_text[job_id] = visible_text(events)

    chaos_task = asyncio.create_task(chaos())
    followers = []
    started = time.monotonic()
    for index in range(jobs):
        request = faulty_request(index, rng)
        job_id = await fleet.submit(request)
        requests[job_id] = request
        if index % 4 == 0:
            followers.append(asyncio.create_task(follow(job_id)))
        await asyncio.sleep(0.12)  # spread over long enough for a kill every few seconds

    ends = await asyncio.gather(*(fleet.wait(job_id, timeout=240) for job_id in requests), return_exceptions=True)
    stop.set()
    await chaos_task
    await asyncio.gather(*followers)
    elapsed = time.monotonic() - started

    hung = [job_id for job_id, end in zip(requests, ends, strict=True) if isinstance(end, BaseException)]
    assert not hung, f"{len(hung)} jobs never ended"
    retries = worker_lost = 0
    recovery_ms: list[float] = []
    outcomes = {DONE: 0, ERROR: 0}
    for job_id, request in requests.items():
        events = await history(fleet, job_id)
        check_history(events)
        final = events[-1]
        outcomes[final.type] = outcomes.get(final.type, 0) + 1
        meant_to_fail = request["simulator"].get("fault") == "error_event"
        assert final.type == (ERROR if meant_to_fail else DONE), (job_id, final.data)
        if final.type == DONE:
            assert final.data["result"]["text"] == expected_text(request)
            assert visible_text(events) == expected_text(request)
        if job_id in live_text and final.type == DONE:
            assert live_text[job_id] == expected_text(request)  # no reader saw a void attempt's text
        for event in events:
            retries += event.type == RETRY
            worker_lost += event.type == RETRY and event.data["error"]["type"] == "worker_lost"
        killed_at = killed_while_running.get(job_id)
        if killed_at is not None:
            restarts = [parse_id(e.id)[0] for e in events if e.type == STARTED and parse_id(e.id)[0] > killed_at]
            if restarts:
                recovery_ms.append(restarts[0] - killed_at)

    recovery = sorted(recovery_ms)
    figures = {
        "jobs": jobs,
        "seconds": round(elapsed, 1),
        "kills": len(kills),
        "retries": retries,
        "worker_lost_retries": worker_lost,
        "jobs_on_killed_workers": len(killed_while_running),
        "recovery_p50_s": round(statistics.median(recovery) / 1000, 2) if recovery else None,
        "recovery_max_s": round(recovery[-1] / 1000, 2) if recovery else None,
        "done": outcomes[DONE],
        "error_as_injected": outcomes[ERROR],
        "lost": 0,
        "hung": len(hung),
    }
    print("\nsoak:", " ".join(f"{key}={value}" for key, value in figures.items()))
    assert kills, "the chaos loop killed nobody: the soak proved nothing"
    if recovery:  # through leases, not arq's in-progress expiry (minutes); the figure is printed above
        assert recovery[-1] < 120_000
