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

import httpx
import orjson
import redis

from producer import FleetClient
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from . import send_floor
from .common import cpu_s, percentiles, processes, redis_server, spawn

SUBSCRIBERS = int(os.environ.get("STREAMFLEET_BENCH_SUBSCRIBERS", "5000"))
JOBS = 50
CLIENT_PROCESSES = 3
TOKENS = 30
TPS = 3
RAMP_MS = 9000
ONE_JOB_SUBSCRIBERS = int(os.environ.get("STREAMFLEET_BENCH_ONE_JOB_SUBSCRIBERS", "2000"))


async def _submit(url: str, stream_url: str | None, count: int, simulator: dict[str, int]) -> list[str]:
    request = {"model": "bench", "messages": [{"role": "user", "content": "fan out"}]}
    async with FleetClient(Settings(redis_url=url, stream_redis_url=stream_url)) as fleet:
        return [
            await fleet.submit(
                # Lengths vary, so the jobs do not all end in the same instant.
                {
                    **request,
                    "simulator": {
                        "tokens": simulator["tokens"] + i % 10 * 3,
                        "tps": simulator["tps"],
                        "ttft_ms": simulator["ttft_ms"] + i * 20,
                        "stamp": True,
                    },
                }
            )
            for i in range(count)
        ]


def _gateway_connections(urls: list[str]) -> int:
    """The gateway's connections to these servers (its queue's, its stream store's primaries)."""
    count = 0
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            clients: list[dict[str, Any]] = client.client_list()  # type: ignore[assignment]
            count += len([entry for entry in clients if entry.get("name") == "streamfleet-gateway"])
        finally:
            client.close()
    return count


def _frames_sent(port: int) -> float:
    """The gateway's count of events written to subscribers (its /metrics)."""
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(SENT))


SENT = "streamfleet_gateway_events_sent_total"


def phase(
    url: str,
    port: int,
    gateway_pid: int,
    jobs: int,
    per_job: int,
    *,
    cluster: list[str] | None = None,
    **simulator: int,
) -> dict[str, Any]:
    """Subscribers in client processes on ``jobs`` jobs, ``per_job`` each; ``cluster``: the URLs of
    the stream store's primaries, when it is a cluster (the first is its seed)."""
    ttft_ms = simulator["ttft_ms"]
    stream_url = "redis+cluster://" + cluster[0].removeprefix("redis://").split("/")[0] if cluster else None
    job_ids = asyncio.run(_submit(url, stream_url, jobs, simulator))
    shares = [job_ids[i::CLIENT_PROCESSES] for i in range(CLIENT_PROCESSES)] if jobs > 1 else []
    if jobs == 1:  # one job: its subscribers split over the client processes
        per_job = -(-per_job // CLIENT_PROCESSES)
        shares = [job_ids] * CLIENT_PROCESSES
    cpu_before = cpu_s(gateway_pid)
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
    connections = _gateway_connections([url, *(cluster or [])])
    # From here on the gateway only streams: its CPU per frame over this window is like for like with
    # the readers', which is counted from their first event on (their connecting excluded).
    streaming_cpu, streaming_sent = cpu_s(gateway_pid), _frames_sent(port)
    results = []
    for client in clients:
        assert client.stdout is not None
        results.append(orjson.loads(client.stdout.read()))
        client.wait(timeout=60)
    gateway_cpu = cpu_s(gateway_pid) - cpu_before
    streaming_cpu = cpu_s(gateway_pid) - streaming_cpu
    streaming_sent = _frames_sent(port) - streaming_sent
    latencies = [sample for result in results for sample in result["latencies_us"]]
    events = sum(result["events"] for result in results)
    return {
        "subscribers": sum(result["connected"] for result in results),
        "failed": sum(result["failed"] for result in results),
        "errors": sorted({error for result in results for error in result["errors"]}),
        "events": events,
        "redis_connections": connections,
        # The gateway's CPU per frame it delivered (its subscribers' connecting included), and a lean
        # reader's (the subscribers' own) CPU per event beside it.
        "gateway_cpu_us_per_frame": round(gateway_cpu * 1e6 / max(1, events), 1),
        "gateway_streaming_cpu_us_per_frame": round(streaming_cpu * 1e6 / max(1, streaming_sent), 1),
        "reader_cpu_us_per_event": round(sum(r["cpu_us_per_event"] for r in results) / max(1, len(results)), 1),
        **{key: round(value / 1000, 2) for key, value in percentiles(latencies).items()},
    }


def serve(started: list[subprocess.Popen[bytes]], queue_url: str, stream_url: str | None = None) -> tuple[int, int]:
    """The simulator, a worker and a gateway process on these Redis URLs, added to ``started``; the
    gateway's pid and port once it answers."""
    simulator_port, gateway_port = free_port(), free_port()
    env = {"STREAMFLEET_REDIS_URL": queue_url, "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{simulator_port}/v1"}
    if stream_url:
        env["STREAMFLEET_STREAM_REDIS_URL"] = stream_url
    started.append(spawn(["-m", "simulator", "--port", str(simulator_port)]))
    started.append(spawn(["-m", "worker", "--concurrency", "500"], env))
    gateway = spawn(["-m", "producer.gateway", "--port", str(gateway_port)], env)
    started.append(gateway)
    wait_for_port(simulator_port)
    wait_for_port(gateway_port)
    return gateway.pid, gateway_port


def run() -> list[dict[str, Any]]:
    with redis_server() as url, processes() as started:
        gateway_pid, gateway_port = serve(started, url)
        baseline = phase(url, gateway_port, gateway_pid, JOBS, 1, ttft_ms=1000, tokens=TOKENS, tps=TPS)
        per_job = max(1, SUBSCRIBERS // JOBS)
        load = phase(url, gateway_port, gateway_pid, JOBS, per_job, ttft_ms=RAMP_MS, tokens=TOKENS, tps=TPS)
        one = phase(url, gateway_port, gateway_pid, 1, ONE_JOB_SUBSCRIBERS, ttft_ms=RAMP_MS, tokens=200, tps=20)
    floor_us = send_floor.measure()
    rows = []
    for case, measured, goal in (
        (f"{load['subscribers']} subscribers on {JOBS} jobs, {TPS} tokens/s each", load, "a handful of connections"),
        (f"{one['subscribers']} subscribers on one job, 20 tokens/s", one, "p99 <= 250 ms, CPU <= 0.35x a reader"),
    ):
        rows.append(
            {
                "scenario": "gateway fan-out, one process: delivery latency p50 (simulator send to SSE receipt)",
                "case": case,
                "fleet_ms": measured["p50"],
                "baseline_ms": baseline["p50"],
                "ratio": round(measured["p50"] / baseline["p50"], 2) if baseline["p50"] else None,
                "goal": goal,
                "p99_ms": measured["p99"],
                "baseline_p99_ms": baseline["p99"],
                "max_ms": measured["max"],
                "events_delivered": measured["events"],
                "failed_subscribers": measured["failed"],
                "errors": measured["errors"] + baseline["errors"],
                "gateway_redis_connections": measured["redis_connections"],
                "baseline_subscribers": baseline["subscribers"],
                "gateway_cpu_us_per_frame": measured["gateway_cpu_us_per_frame"],
                "reader_cpu_us_per_event": measured["reader_cpu_us_per_event"],
                "gateway_cpu_ratio": (
                    round(measured["gateway_cpu_us_per_frame"] / measured["reader_cpu_us_per_event"], 2)
                    if measured["reader_cpu_us_per_event"]
                    else None
                ),
                # Streaming only (every subscriber connected), like for like with the readers' figure.
                "gateway_streaming_cpu_us_per_frame": measured["gateway_streaming_cpu_us_per_frame"],
                "gateway_streaming_cpu_ratio": (
                    round(measured["gateway_streaming_cpu_us_per_frame"] / measured["reader_cpu_us_per_event"], 2)
                    if measured["reader_cpu_us_per_event"]
                    else None
                ),
                # One send() of a frame to a waiting reader, from plain Python: no fan-out costs less.
                "send_floor_us_per_frame": round(floor_us, 1),
            }
        )
    return rows
