"""Time to first token overhead: submit to the first delta at a consumer, minus what the upstream
itself takes (a direct httpx request to the same simulator, in the same run).

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

from producer import FleetClient
from shared.models import DELTA
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from .common import percentiles, processes, redis_server, spawn

JOBS = 40


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


def run() -> list[dict[str, Any]]:
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
        }
    ]
