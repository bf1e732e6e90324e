"""Added latency per delta and concurrent streams per worker process.

Many jobs stream at once through one worker; a consumer process follows them all (the gateway's
fan-out readers: a few XREADs over every stream) and measures each delta's latency from the
simulator's send stamp (CLOCK_MONOTONIC). Baseline in the same run: the same number of streams read
straight from the simulator by the lean reader (``bench.lean``, raw asyncio streams), no fleet.
Added latency = fleet minus baseline, per percentile. The worker's RSS is read from /proc before and
during the load, and its CPU time over the fleet run gives CPU per delta, reported beside the lean
reader's CPU per event: their ratio holds on any machine. On two cores shared with
the simulator and the consumer, the 2,000-stream case measures the box as much as the worker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from producer import FleetClient
from producer.fanout import FanOut
from shared.models import DELTA
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from .common import cpu_s, percentiles, processes, redis_server, spawn
from .lean import sse_data

CASES = ((100, 20, 60), (200, 50, 100), (2000, 20, 60))  # streams, tokens/s, tokens
START_MS = 4000


def _request(i: int, tps: int, tokens: int, ttft_ms: int) -> dict[str, Any]:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": f"stream {i}"}],
        "stream": True,
        "simulator": {"tokens": tokens, "tps": tps, "ttft_ms": ttft_ms, "stamp": True},
    }


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _direct(port: int, streams: int, tps: int, tokens: int) -> tuple[list[float], float]:
    """The floor: every stream read straight from the simulator by the lean reader (``bench.lean``).
    Returns the latencies and the reader's CPU per event, counted from the first event on (its
    connecting excluded)."""
    samples: list[float] = []
    cpu_from: list[float] = []

    async def one(i: int) -> None:
        body = orjson.dumps(_request(i, tps, tokens, START_MS))
        async for data in sse_data("127.0.0.1", port, "/v1/chat/completions", body):
            if data[:1] == b"{":
                received = time.monotonic_ns()
                if not cpu_from:
                    cpu_from.append(time.process_time())
                sent = orjson.loads(data).get("x_sent_ns")
                if sent:
                    samples.append((received - sent) / 1e6)

    await asyncio.gather(*(one(i) for i in range(streams)))
    cpu_us = (time.process_time() - cpu_from[0]) * 1e6 / max(1, len(samples)) if cpu_from else 0.0
    return samples, cpu_us


async def _fleet(url: str, worker_pid: int, streams: int, tps: int, tokens: int) -> tuple[list[float], float]:
    samples: list[float] = []
    async with FleetClient(Settings(redis_url=url)) as fleet:
        fanout = FanOut(fleet.stores.streams)
        fanout.start()
        idle_rss = _rss_kb(worker_pid)
        ids = [await fleet.submit(_request(i, tps, tokens, START_MS)) for i in range(streams)]
        rss: list[int] = []

        async def follow(job_id: str) -> None:
            async for event in fanout.events(job_id):
                if event is not None and event.type == DELTA:
                    received = time.monotonic_ns()
                    sent = event.data["chunk"].get("x_sent_ns")
                    if sent:
                        samples.append((received - sent) / 1e6)

        async def sample_rss() -> None:
            await asyncio.sleep(START_MS / 1000 + 1)
            rss.append(_rss_kb(worker_pid))

        await asyncio.gather(sample_rss(), *(follow(job_id) for job_id in ids))
        await fanout.aclose()
    return samples, (max(rss) - idle_rss) / streams


def run() -> list[dict[str, Any]]:
    rows = []
    for streams, tps, tokens in CASES:
        with redis_server() as url, processes() as started:
            port = free_port()
            base = f"http://127.0.0.1:{port}/v1"
            env = {"STREAMFLEET_REDIS_URL": url, "STREAMFLEET_UPSTREAM_BASE_URL": base}
            started.append(spawn(["-m", "simulator", "--port", str(port)]))
            worker = spawn(["-m", "worker", "--concurrency", str(streams + 100)], env)
            started.append(worker)
            wait_for_port(port)
            time.sleep(1.5)
            direct_samples, direct_cpu_us = asyncio.run(_direct(port, streams, tps, tokens))
            direct = percentiles(direct_samples)
            cpu_before = cpu_s(worker.pid)
            fleet_samples, rss_per_stream_kb = asyncio.run(_fleet(url, worker.pid, streams, tps, tokens))
            cpu_us_per_delta = (cpu_s(worker.pid) - cpu_before) * 1e6 / max(1, len(fleet_samples))
            fleet = percentiles(fleet_samples)
        rows.append(
            {
                "scenario": "added latency per delta (fleet minus direct upstream)",
                "case": f"{streams} streams x {tps} tokens/s through one worker process",
                "fleet_ms": round(fleet["p50"] - direct["p50"], 2),
                "baseline_ms": round(direct["p50"], 2),
                "ratio": round(fleet["p50"] / direct["p50"], 2) if direct["p50"] else None,
                "goal": "added p50 <= 1 ms, p99 <= 5 ms (200 streams); p99 <= 20 ms at 2000 streams",
                "added_p99_ms": round(fleet["p99"] - direct["p99"], 2),
                "fleet_p99_ms": round(fleet["p99"], 2),
                "direct_p99_ms": round(direct["p99"], 2),
                "deltas": len(fleet_samples),
                "worker_rss_kb_per_stream": round(rss_per_stream_kb, 1),
                # The worker's CPU per delta, whole job included (claim, start, end): what one core holds;
                # beside it the lean reader's per event, and their ratio (which holds across machines).
                "worker_cpu_us_per_delta": round(cpu_us_per_delta, 1),
                "direct_cpu_us_per_event": round(direct_cpu_us, 1),
                "worker_cpu_ratio": round(cpu_us_per_delta / direct_cpu_us, 2) if direct_cpu_us else None,
                "streams_per_core_at_20_tokens_s": int(1e6 / cpu_us_per_delta / 20) if cpu_us_per_delta else None,
            }
        )
    return rows
