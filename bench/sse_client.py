"""A process full of SSE subscribers for the gateway benchmark: ``python -m bench.sse_client``.

Reads ``{"host", "port", "jobs": [...], "per_job": n}`` on stdin, opens ``per_job`` subscriptions to
``/v1/jobs/<id>/events`` of each job, and prints one JSON line: connected subscribers, events, and
the delivery latency of every stamped delta (receipt minus the simulator's ``x_sent_ns``, in µs).

A bare HTTP/1.1 reader on asyncio streams, not httpx: thousands of subscribers in one process must
cost the client as little as possible, or the client's own queueing is what gets measured. It reads
lines; the chunked encoding's size lines are hex numbers and are skipped like any other line.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import uvloop


async def subscribe(host: str, port: int, job_id: str, latencies: list[float], state: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        writer.write(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(status.decode().strip())
        state["connected"] += 1
        delta = False
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"event: "):
                delta = line.startswith(b"event: delta")
                if line.startswith(b"event: done") or line.startswith(b"event: error"):
                    return
            elif delta and line.startswith(b"data: ") and b"x_sent_ns" in line:
                received = time.monotonic_ns()
                if not state["cpu_from_ns"]:
                    state["cpu_from_ns"] = time.process_time_ns()
                sent = orjson.loads(line[6:])["chunk"].get("x_sent_ns")
                if sent:
                    latencies.append((received - sent) / 1000)
                    state["events"] += 1
    finally:
        writer.close()


async def main() -> None:
    spec: dict[str, Any] = orjson.loads(sys.stdin.buffer.read())
    latencies: list[float] = []
    state = {"connected": 0, "events": 0, "cpu_from_ns": 0}
    tasks = []
    for job_id in spec["jobs"]:
        for _ in range(spec["per_job"]):
            tasks.append(asyncio.create_task(subscribe(spec["host"], spec["port"], job_id, latencies, state)))
            if len(tasks) % 100 == 0:
                await asyncio.sleep(0.02)  # ramp up: the listen backlog is finite
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    errors = sorted({f"{type(failure).__name__}: {failure}"[:200] for failure in failures})[:5]
    # The reader's own CPU per event, from its first event on (connecting excluded).
    cpu_us = (time.process_time_ns() - state.pop("cpu_from_ns")) / 1000 / max(1, state["events"])
    output = {**state, "failed": len(failures), "errors": errors, "latencies_us": latencies, "cpu_us_per_event": cpu_us}
    sys.stdout.write(orjson.dumps(output).decode() + "\n")


if __name__ == "__main__":
    uvloop.run(main())
