"""Time to first token overhead: submit to the first delta at a consumer, minus what the upstream
itself takes (a direct httpx request to the same simulator, in the same run). And a burst: 200 jobs
submitted at once through two worker processes, each tailed by the Python client, against 200 lean
readers (``bench.lean``) opening the same requests at once.

Baseline: the same fleet with arq's own pickup (no wake-up on submit, arq's default 0.5 s poll).
Jobs come one at a time with a pause of 10-90 ms after each one ends, as independent arrivals do: a
submit right on the heels of the previous job's end would be picked up by the poll that a finished
job triggers, and measure that instead of the pickup.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import uvloop

from producer import FleetClient
from shared import jsonutil
from shared.models import DELTA
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from . import lean
from .common import percentiles, processes, redis_server, spawn

JOBS = 40
BURST = 200


def _request(i: int) -> dict[str, Any]:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": f"ttft {i}"}],
        "simulator": {"tokens": 3, "ttft_ms": 0},
    }


async def _direct(base: str) -> list[float]:
    samples = []
    async with httpx.AsyncClient(base_url=base) as client:
        for i in range(JOBS):
            started = time.perf_counter()
            async with client.stream("POST", "/chat/completions", json={**_request(i), "stream": True}) as response:
                async for line in response.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        break
            samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _fleet(url: str) -> list[float]:
    samples = []
    async with FleetClient(Settings(redis_url=url)) as fleet:
        for i in range(JOBS + 3):
            started = time.perf_counter()
            job_id = await fleet.submit(_request(i))
            async for event in fleet.tail(job_id):
                if (
                    event.type == DELTA
                    and event.data["chunk"]["choices"]
                    and event.data["chunk"]["choices"][0]["delta"].get("content")
                ):
                    break
            if i >= 3:  # the first jobs open connections and load scripts
                samples.append((time.perf_counter() - started) * 1000)
            await fleet.wait(job_id, timeout=10)
            await asyncio.sleep(0.01 + 0.02 * (i % 5))
    return samples


def _measure(wake: bool) -> tuple[list[float], list[float]]:
    with redis_server() as url, processes() as started:
        port = free_port()
        env = {
            "STREAMFLEET_REDIS_URL": url,
            "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "STREAMFLEET_WAKE_ON_SUBMIT": "true" if wake else "false",
        }
        started.append(spawn(["-m", "simulator", "--port", str(port), "--ttft-ms", "0"]))
        started.append(spawn(["-m", "worker"], env))
        wait_for_port(port)
        time.sleep(1.5)  # the worker is up
        direct = asyncio.run(_direct(f"http://127.0.0.1:{port}/v1"))
        return direct, asyncio.run(_fleet(url))


def _first_content(data: bytes) -> bool:
    return b'"content":"' in data and b'"content":""' not in data


async def _burst_direct(port: int) -> list[float]:
    async def one(i: int) -> float:
        body = jsonutil.dumps({**_request(i), "stream": True})
        async for data in lean.sse_data("127.0.0.1", port, "/v1/chat/completions", body):
            if _first_content(data):
                return (time.perf_counter() - started) * 1000
        raise AssertionError("the stream ended without content")

    started = time.perf_counter()
    return list(await asyncio.gather(*(one(i) for i in range(BURST))))


async def _burst_fleet(url: str) -> list[float]:
    async def one(i: int) -> float:
        job_id = await fleet.submit(_request(i))
        async for event in fleet.tail(job_id):
            if event.type == DELTA and event.data["chunk"]["choices"][0]["delta"].get("content"):
                return (time.perf_counter() - started) * 1000
        raise AssertionError("the job ended without content")

    async with FleetClient(Settings(redis_url=url)) as fleet:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(BURST)))  # warm: connections, scripts, pools
        await asyncio.sleep(1)
        started = time.perf_counter()
        return list(await asyncio.gather(*(one(i) for i in range(BURST))))


def _burst() -> tuple[list[float], list[float]]:
    with redis_server() as url, processes() as started:
        port = free_port()
        env = {"STREAMFLEET_REDIS_URL": url, "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        started.append(spawn(["-m", "simulator", "--port", str(port), "--ttft-ms", "0"]))
        started.append(spawn(["-m", "worker", "--processes", "2"], env))
        wait_for_port(port)
        time.sleep(2)
        uvloop.run(_burst_direct(port))  # warm
        direct = uvloop.run(_burst_direct(port))
        return direct, uvloop.run(_burst_fleet(url))


def run() -> list[dict[str, Any]]:
    burst_direct, burst_fleet = _burst()
    direct_at, fleet_at = percentiles(burst_direct), percentiles(burst_fleet)
    direct, fleet = _measure(wake=True)
    _, arq_default = _measure(wake=False)
    floor = percentiles(direct)["p50"]
    ours = {k: round(v - floor, 2) for k, v in percentiles(fleet).items()}
    theirs = {k: round(v - floor, 2) for k, v in percentiles(arq_default).items()}
    return [
        {
            "scenario": "time to first token overhead (submit to first delta, minus the upstream's own)",
            "case": f"{JOBS} jobs one after another; upstream alone p50 {floor:.2f} ms",
            "fleet_ms": ours["p50"],
            "baseline_ms": theirs["p50"],
            "ratio": round(theirs["p50"] / ours["p50"], 1) if ours["p50"] > 0 else None,
            "goal": "p50 <= 5 ms, p99 <= 20 ms",
            "p99_ms": ours["p99"],
            "baseline_p99_ms": theirs["p99"],
        },
        {
            "scenario": "time to first token, a burst (submit to first delta at a tailing client)",
            "case": f"{BURST} jobs submitted at once, 2 worker processes; direct: {BURST} lean readers at once",
            "fleet_ms": round(fleet_at["p50"], 1),
            "baseline_ms": round(direct_at["p50"], 1),
            "ratio": round(fleet_at["p99"] / direct_at["p99"], 2),
            "goal": "p99 <= direct p99 + 20 ms",
            "p99_ms": round(fleet_at["p99"], 1),
            "baseline_p99_ms": round(direct_at["p99"], 1),
            "added_p99_ms": round(fleet_at["p99"] - direct_at["p99"], 1),
        },
    ]
