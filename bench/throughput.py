"""Worker throughput: deltas per second one worker process publishes, the upstream sending as fast as
it can (a recording replayed whole), every delta in Redis.

Baseline in the same run: the obvious worker (``bench.naive_worker``: httpx-sse, one awaited XADD per
delta). Also reported as a fraction of ``redis-benchmark``'s pipelined XADD rate on the same server.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from producer import FleetClient
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from .common import processes, redis_server, spawn, text_chunks, wait_all_ended

JOBS = 20
CHUNKS = 5000


def recording(directory: Path, chunks: int = CHUNKS) -> str:
    """A long OpenAI-style recording in ``directory`` for the simulator to replay; its name."""
    body = b"".join(b"data: " + chunk + b"\n\n" for chunk in text_chunks(chunks, obfuscation=True))
    (directory / "long.sse").write_bytes(body + b"data: [DONE]\n\n")
    return "long.sse"


async def publish(settings: Settings, name: str, jobs: int) -> tuple[float, int]:
    """Submit ``jobs`` jobs replaying the recording ``name``; the seconds until the last ended and the
    deltas they stored."""
    async with FleetClient(settings) as fleet:
        request = {"model": "bench", "simulator": {"replay": name}}
        started = time.time()
        ids = [await fleet.submit({**request, "messages": [{"role": "user", "content": str(i)}]}) for i in range(jobs)]
        elapsed = await wait_all_ended(fleet.stores.streams, ids) - started
        stored = sum([await fleet.stores.streams.length(job_id) for job_id in ids])
    return elapsed, stored - 3 * jobs  # queued, started, done


def _redis_benchmark(url: str) -> float | None:
    binary = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if binary is None:
        return None
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        [binary, "-p", port, "-n", "300000", "-P", "64", "-q", "XADD", "bench:xadd", "*", "d", "x" * 24],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    return float(found[-1]) if found else None


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory, redis_server() as url, processes() as started:
        name = recording(Path(directory))
        port = free_port()
        base = f"http://127.0.0.1:{port}/v1"
        env = {"STREAMFLEET_REDIS_URL": url, "STREAMFLEET_UPSTREAM_BASE_URL": base}
        started.append(spawn(["-m", "simulator", "--port", str(port), "--replay-dir", directory]))
        started.append(spawn(["-m", "worker"], env))
        wait_for_port(port)
        time.sleep(1.5)
        elapsed, stored = asyncio.run(publish(Settings(redis_url=url), name, JOBS))
        naive = orjson.loads(
            subprocess.run(
                [sys.executable, "-m", "bench.naive_worker", url, base, name, str(JOBS)],
                capture_output=True,
                check=True,
                timeout=600,
            ).stdout
        )
        xadd_rate = _redis_benchmark(url)
    fleet_rate = stored / elapsed
    naive_rate = naive["deltas"] / naive["seconds"]
    return [
        {
            "scenario": "worker throughput (deltas/s one worker process publishes, every delta in Redis)",
            "case": f"{JOBS} jobs x {CHUNKS} OpenAI chunks, upstream as fast as it can",
            "fleet_per_s": round(fleet_rate),
            "baseline_per_s": round(naive_rate),
            "ratio": round(fleet_rate / naive_rate, 2),
            "goal": ">= 3x the baseline",
            "redis_benchmark_pipelined_xadd_per_s": round(xadd_rate) if xadd_rate else None,
            "fraction_of_redis_benchmark": round(fleet_rate / xadd_rate, 3) if xadd_rate else None,
            "deltas_stored": stored,
        }
    ]
