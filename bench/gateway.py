"""Gateway fan-out: SSE subscribers on one gateway process, the Redis connections it holds, and the
delivery latency of every delta (simulator send to subscriber receipt, CLOCK_MONOTONIC).

Baseline in the same run: one subscriber per job through the same gateway. Subscribers run in
separate client processes, as they would on other machines.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import orjson
import redis

from producer import FleetClient
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from .common import percentiles, processes, redis_server, spawn

SUBSCRIBERS = int(os.environ.get("STREAMFLEET_BENCH_SUBSCRIBERS", "5000"))
JOBS = 50
CLIENT_PROCESSES = 3
TOKENS = 30
TPS = 3
RAMP_MS = 9000


async def _submit(url: str, count: int, ttft_ms: int) -> list[str]:
    request = {"model": "bench", "messages": [{"role": "user", "content": "fan out"}]}
    async with FleetClient(Settings(redis_url=url)) as fleet:
        return [
            await fleet.submit(
                # Lengths vary, so the jobs do not all end in the same instant.
                {
                    **request,
                    "simulator": {
                        "tokens": TOKENS + i % 10 * 3,
                        "tps": TPS,
                        "ttft_ms": ttft_ms + i * 20,
                        "stamp": True,
                    },
                }
            )
            for i in range(count)
        ]


def _gateway_connections(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        clients: list[dict[str, Any]] = client.client_list()  # type: ignore[assignment]
        return len([entry for entry in clients if entry.get("name") == "streamfleet-gateway"])
    finally:
        client.close()


def _phase(url: str, port: int, per_job: int) -> dict[str, Any]:
    ttft_ms = RAMP_MS if per_job > 1 else 1000
    job_ids = asyncio.run(_submit(url, JOBS, ttft_ms))
    shares = [job_ids[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)]
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.sse_client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for share in shares
        if share
    ]
    for client, share in zip(clients, shares, strict=False):
        assert client.stdin is not None
        client.stdin.write(orjson.dumps({"host": "127.0.0.1", "port": port, "jobs": share, "per_job": per_job}))
        client.stdin.close()
    time.sleep(ttft_ms / 1000 + 1)  # every subscriber is connected and tokens flow
    connections = _gateway_connections(url)
    results = []
    for client in clients:
        assert client.stdout is not None
        results.append(orjson.loads(client.stdout.read()))
        client.wait(timeout=60)
    latencies = [sample for result in results for sample in result["latencies_us"]]
    return {
        "subscribers": sum(result["connected"] for result in results),
        "failed": sum(result["failed"] for result in results),
        "errors": sorted({error for result in results for error in result["errors"]}),
        "events": sum(result["events"] for result in results),
        "redis_connections": connections,
        **{key: round(value / 1000, 2) for key, value in percentiles(latencies).items()},
    }


def run() -> list[dict[str, Any]]:
    with redis_server() as url, processes() as started:
        simulator_port, gateway_port = free_port(), free_port()
        env = {
            "STREAMFLEET_REDIS_URL": url,
            "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{simulator_port}/v1",
        }
        started.append(spawn(["-m", "simulator", "--port", str(simulator_port)]))
        started.append(spawn(["-m", "worker", "--concurrency", "500"], env))
        started.append(spawn(["-m", "producer.gateway", "--port", str(gateway_port)], env))
        wait_for_port(simulator_port)
        wait_for_port(gateway_port)
        baseline = _phase(url, gateway_port, 1)
        load = _phase(url, gateway_port, max(1, SUBSCRIBERS // JOBS))
    return [
        {
            "scenario": "gateway fan-out: delivery latency p50 (simulator send to SSE receipt)",
            "case": f"{load['subscribers']} subscribers on {JOBS} jobs, {TPS} tokens/s each, one gateway process",
            "fleet_ms": load["p50"],
            "baseline_ms": baseline["p50"],
            "ratio": round(load["p50"] / baseline["p50"], 2) if baseline["p50"] else None,
            "goal": "5000 subscribers, a handful of Redis connections",
            "p99_ms": load["p99"],
            "baseline_p99_ms": baseline["p99"],
            "max_ms": load["max"],
            "events_delivered": load["events"],
            "failed_subscribers": load["failed"],
            "errors": load["errors"] + baseline["errors"],
            "gateway_redis_connections": load["redis_connections"],
            "baseline_subscribers": baseline["subscribers"],
        }
    ]
