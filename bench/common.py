"""What the benchmark scenarios share: a Redis server of their own, chunk samples, result tables."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from shared.ports import free_port
from shared.store import StreamStore
from shared.store.codec import is_terminal

RESULTS = Path(__file__).resolve().parent.parent / "bench-results"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A fresh Valkey server (the embedded binary) for one scenario, or STREAMFLEET_BENCH_REDIS_URL."""
    configured = os.environ.get("STREAMFLEET_BENCH_REDIS_URL")
    if configured:
        yield configured
        return
    from shared.embedded import server_command

    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        process = subprocess.Popen(
            server_command(port, Path(data_dir)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
                time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait()


def text_chunks(count: int, *, obfuscation: bool, seed: int = 7) -> list[bytes]:
    """A plain-text Chat Completions stream as OpenAI sends it (with its per-chunk ``obfuscation``
    padding, or without, as most other providers), one word per chunk."""
    rng = random.Random(seed)
    words = ["the", "stream", "of", "tokens", "moves", "fast", "through", "redis", "to", "every", "reader"]
    chunks = []
    for i in range(count):
        data: dict[str, Any] = {
            "id": "chatcmpl-CdBn3w5hXG2eYkQJmR1pT8aVzL0uS",
            "object": "chat.completion.chunk",
            "created": 1763474589,
            "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "default",
            "system_fingerprint": "fp_560af6e559",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": (" " if i else "") + rng.choice(words)},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
        }
        if obfuscation:
            data["obfuscation"] = "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(2, 12)))
        chunks.append(orjson.dumps(data))
    return chunks


def write_results(name: str, rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
    return path


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes stopped (SIGTERM, then SIGKILL) when the scenario ends."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    import sys

    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, "STREAMFLEET_WORKER_PROCESSES": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def redis_cpu_s(ports: list[int]) -> float:
    """The CPU time so far of the Redis servers on these ports, together (INFO cpu)."""
    total = 0.0
    for port in ports:
        with redis.Redis(port=port) as client:
            cpu: dict[str, Any] = client.info("cpu")
        total += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return total


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1]}


async def wait_all_ended(streams: StreamStore, job_ids: list[str]) -> float:
    """Wait until every job has its terminal event; return when the last one was written (wall clock,
    seconds: a stream entry's id is Redis's millisecond clock, the machine's ``time.time()``).

    It looks only at each job's last entry (one pipeline a pass, every 0.5 s): a consumer decoding
    every delta, or polling fast, would take the CPU being measured, and the entry ids make the
    end time exact whatever the polling interval."""
    pending, ended_ms = list(job_ids), 0
    while pending:
        still = []
        for job_id, last in zip(pending, await streams.last_entries(pending), strict=True):
            assert last is not None, f"job {job_id} has no stream"
            entry_id, fields = last
            if is_terminal(fields):
                ended_ms = max(ended_ms, int(entry_id.split(b"-")[0]))
            else:
                still.append(job_id)
        pending = still
        if pending:
            await asyncio.sleep(0.5)
    return ended_ms / 1000
