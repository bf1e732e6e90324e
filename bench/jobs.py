"""Short jobs per second end to end: many 10-token generations submitted at once, two worker
processes, until every job has its terminal event. Baselines in the same run: one worker process,
and the simulator alone (the same requests straight to it, 100 at a time, over keep-alive
connections): what the upstream side could carry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from producer import FleetClient
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from .common import processes, redis_server, spawn, wait_all_ended

JOBS = 3000
SHORT = {"tokens": 10, "tps": 10_000, "ttft_ms": 0}


async def _run(url: str) -> float:
    async with FleetClient(Settings(redis_url=url)) as fleet:
        started = time.time()
        ids = await asyncio.gather(
            *(
                fleet.submit(
                    {
                        "model": "bench",
                        "messages": [{"role": "user", "content": str(i)}],
                        "simulator": SHORT,
                    }
                )
                for i in range(JOBS)
            )
        )
        return JOBS / (await wait_all_ended(fleet.stores.streams, ids) - started)


def _measure(workers: int) -> float:
    with redis_server() as url, processes() as started:
        port = free_port()
        env = {"STREAMFLEET_REDIS_URL": url, "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        started.append(spawn(["-m", "simulator", "--port", str(port), "--ttft-ms", "0"]))
        # One worker, or a pool of them under one supervisor (`--processes`: worker/pool.py).
        started.append(spawn(["-m", "worker", "--concurrency", "500", "--processes", str(workers)], env))
        wait_for_port(port)
        time.sleep(2)
        return asyncio.run(_run(url))


async def _direct(port: int) -> float:
    from worker.transport import StreamingTransport

    body = {"model": "bench", "messages": [{"role": "user", "content": "x"}], "stream": True, "simulator": SHORT}
    gate = asyncio.Semaphore(100)

    async def one(client: httpx.AsyncClient) -> None:
        async with gate, client.stream("POST", "/chat/completions", json=body) as response:
            async for _ in response.aiter_bytes():
                pass

    async with httpx.AsyncClient(transport=StreamingTransport(), base_url=f"http://127.0.0.1:{port}/v1") as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(JOBS)))
        return JOBS / (time.perf_counter() - started)


def _simulator_alone() -> float:
    with processes() as started:
        port = free_port()
        started.append(spawn(["-m", "simulator", "--port", str(port), "--ttft-ms", "0"]))
        wait_for_port(port)
        return asyncio.run(_direct(port))


def run() -> list[dict[str, Any]]:
    two = _measure(2)
    one = _measure(1)
    alone = _simulator_alone()
    return [
        {
            "scenario": "short jobs per second, end to end (10-token generations)",
            "case": f"{JOBS} jobs submitted at once, 2 worker processes",
            "fleet_per_s": round(two),
            "baseline_per_s": round(one),
            "ratio": round(two / one, 2),
            "goal": ">= 1000 jobs/s",
            "simulator_alone_per_s": round(alone),
        }
    ]
