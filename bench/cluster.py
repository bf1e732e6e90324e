"""Job streams on one Redis against a Redis Cluster of 1 and of 3 primaries (the throughput test).

The worker publishes replayed recordings as fast as the upstream sends them, into one Redis (the
baseline: the fan-in's one XREAD, no announcements) and into a local cluster of 1 and of 3 primaries
(``tests.cluster``; the scripts also announce each entry for the gateway, ``shared.store.live``). Each
case reports deltas/s, the Redis CPU per delta (every primary's ``used_cpu_user + used_cpu_sys``, before
and after) and how the jobs' streams spread over the primaries. The queue is a server of its own in
every case, so only the stream store differs.

What it cannot show: a 3x speed-up. One worker process on this 2-core machine is the bottleneck, and
the three primaries share those two cores with it; the Redis CPU per delta and the spread are what the
capacity model (``docs/scaling.md``) scales by.

Also measured: ``WAIT 1 100`` after each flush's pipeline on a primary with a replica (what making
each flush durable on a replica before it is acknowledged would cost the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from shared.ports import free_port, wait_for_port
from shared.settings import Settings
from shared.store import keys
from tests.cluster import local_cluster

from . import gateway as bench_gateway
from .common import percentiles, processes, redis_cpu_s, redis_server, spawn
from .throughput import publish, recording

JOBS = 60
CHUNKS = 2000
GATEWAY_JOBS = 200
GATEWAY_SUBSCRIBERS = 2000
FLUSHES = 2000
FLUSH_ENTRIES = 20


def _streams_per_node(ports: list[int]) -> list[int]:
    return sorted(len(list(redis.Redis(port=port).scan_iter(match=keys.EVENTS_PATTERN, count=1000))) for port in ports)


@contextlib.contextmanager
def _stream_store(primaries: int, directory: Path) -> Iterator[tuple[str | None, list[int]]]:
    """The stream store's URL (None: the queue's own server) and the ports of its primaries."""
    if primaries == 0:
        yield None, []
        return
    with local_cluster(directory, primaries=primaries, replicas_each=0) as cluster:
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in cluster.primaries), cluster.primaries


def _case(primaries: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as directory,
        redis_server() as queue_url,
        _stream_store(primaries, Path(directory)) as (stream_url, ports),
        processes() as started,
    ):
        name = recording(Path(directory), CHUNKS)
        port = free_port()
        env = {"STREAMFLEET_REDIS_URL": queue_url, "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"}
        if stream_url:
            env["STREAMFLEET_STREAM_REDIS_URL"] = stream_url
        started.append(spawn(["-m", "simulator", "--port", str(port), "--replay-dir", directory]))
        started.append(spawn(["-m", "worker"], env))
        wait_for_port(port)
        time.sleep(1.5)
        nodes = ports or [int(queue_url.rsplit(":", 1)[1].split("/")[0])]
        cpu_before = redis_cpu_s(nodes)
        settings = Settings(redis_url=queue_url, stream_redis_url=stream_url)
        elapsed, deltas = asyncio.run(publish(settings, name, JOBS))
        redis_cpu_us = (redis_cpu_s(nodes) - cpu_before) * 1e6 / deltas
        spread = _streams_per_node(ports) if ports else [JOBS]
    return {"rate": deltas / elapsed, "redis_cpu_us": redis_cpu_us, "spread": spread, "deltas": deltas}


def _gateway_case(primaries: int) -> dict[str, Any]:
    """``GATEWAY_SUBSCRIBERS`` SSE subscribers on ``GATEWAY_JOBS`` jobs through one gateway process,
    the stream store on one Redis (0) or a cluster (``bench.gateway.phase``)."""
    with (
        tempfile.TemporaryDirectory() as directory,
        redis_server() as queue_url,
        _stream_store(primaries, Path(directory)) as (stream_url, ports),
        processes() as started,
    ):
        gateway_pid, gateway_port = bench_gateway.serve(started, queue_url, stream_url)
        nodes = ports or [int(queue_url.rsplit(":", 1)[1].split("/")[0])]
        cpu_before = redis_cpu_s(nodes)
        result = bench_gateway.phase(
            queue_url,
            gateway_port,
            gateway_pid,
            GATEWAY_JOBS,
            GATEWAY_SUBSCRIBERS // GATEWAY_JOBS,
            cluster=[f"redis://127.0.0.1:{port}/0" for port in ports] or None,
            ttft_ms=bench_gateway.RAMP_MS,
            tokens=bench_gateway.TOKENS,
            tps=20,
        )
        result["redis_cpu_us_per_frame"] = (redis_cpu_s(nodes) - cpu_before) * 1e6 / max(1, result["events"])
    return result


def _wait_cost(directory: Path) -> dict[str, float]:
    """Milliseconds per flush (a pipeline of ``FLUSH_ENTRIES`` XADDs) without and with ``WAIT 1 100``,
    on a primary with one replica."""
    with local_cluster(directory, primaries=1, replicas_each=1) as cluster:
        primary = redis.Redis(port=cluster.primaries[0])
        data = b"x" * 40
        timings: dict[str, list[float]] = {"plain": [], "wait": []}
        for _ in range(FLUSHES):
            for kind in ("plain", "wait"):
                pipe = primary.pipeline(transaction=False)
                for _ in range(FLUSH_ENTRIES):
                    pipe.xadd("{bench}:wait", {"d": data}, maxlen=10_000, approximate=True)
                if kind == "wait":
                    pipe.execute_command("WAIT", 1, 100)  # type: ignore[no-untyped-call]
                began = time.perf_counter()
                replies = pipe.execute()
                timings[kind].append((time.perf_counter() - began) * 1000)
                assert kind == "plain" or replies[-1] == 1, "the replica did not acknowledge"
    return {f"{kind}_{q}": round(v, 3) for kind, samples in timings.items() for q, v in percentiles(samples).items()}


def run() -> list[dict[str, Any]]:
    one, single, three = _case(0), _case(1), _case(3)
    rows = [
        {
            "scenario": "job streams on a Redis Cluster (one worker process publishing as fast as the upstream sends)",
            "case": f"{JOBS} jobs x {CHUNKS} chunks: {primaries} primaries against one Redis",
            "fleet_per_s": round(case["rate"]),
            "baseline_per_s": round(one["rate"]),
            "ratio": round(case["rate"] / one["rate"], 2),
            "goal": "no 3x on 2 cores (the worker is the bottleneck): Redis CPU per delta and spread scale",
            "redis_cpu_us_per_delta": round(case["redis_cpu_us"], 2),
            "one_redis_cpu_us_per_delta": round(one["redis_cpu_us"], 2),
            "streams_per_primary": case["spread"],
            "deltas": case["deltas"],
        }
        for primaries, case in ((1, single), (3, three))
    ]
    fan_one, fan_three = _gateway_case(0), _gateway_case(3)
    rows.append(
        {
            "scenario": "gateway fan-in, 3-primary cluster (announcements, then reads) against one Redis (one XREAD)",
            "case": f"{fan_three['subscribers']} SSE subscribers on {GATEWAY_JOBS} jobs x 20 tokens/s, one gateway",
            "fleet_ms": fan_three["p99"],
            "baseline_ms": fan_one["p99"],
            "ratio": round(fan_three["p99"] / fan_one["p99"], 2) if fan_one["p99"] else None,
            "goal": "delivery p99 within today's (<= 250 ms); connections grow with nodes, not jobs",
            "p50_ms": fan_three["p50"],
            "one_redis_p50_ms": fan_one["p50"],
            "gateway_streaming_cpu_us_per_frame": fan_three["gateway_streaming_cpu_us_per_frame"],
            "one_redis_gateway_streaming_cpu_us_per_frame": fan_one["gateway_streaming_cpu_us_per_frame"],
            "redis_cpu_us_per_frame": round(fan_three["redis_cpu_us_per_frame"], 2),
            "one_redis_redis_cpu_us_per_frame": round(fan_one["redis_cpu_us_per_frame"], 2),
            "gateway_redis_connections": fan_three["redis_connections"],
            "one_redis_gateway_redis_connections": fan_one["redis_connections"],
            "events_delivered": fan_three["events"],
            "failed_subscribers": fan_three["failed"] + fan_one["failed"],
            "errors": fan_three["errors"] + fan_one["errors"],
        }
    )
    with tempfile.TemporaryDirectory() as directory:
        wait = _wait_cost(Path(directory))
    rows.append(
        {
            "scenario": "WAIT 1 100 after each flush (a primary and its replica, loopback)",
            "case": f"{FLUSHES} flushes of {FLUSH_ENTRIES} XADDs",
            "fleet_ms": wait["wait_p50"],
            "baseline_ms": wait["plain_p50"],
            "ratio": round(wait["wait_p50"] / wait["plain_p50"], 2),
            "goal": "measured, not a goal: the flush waits a replication round trip",
            **wait,
        }
    )
    return rows
