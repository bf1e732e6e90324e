"""The obvious worker, as the throughput baseline: ``python -m bench.naive_worker URL BASE RECORDING JOBS``.

For each job: stream the upstream with httpx and httpx-sse, and for every event one awaited XADD of
the chunk's JSON to the job's own stream. Prints the seconds the jobs took, all at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import uvloop
from httpx_sse import aconnect_sse
from redis.asyncio import Redis


async def job(client: httpx.AsyncClient, redis: Redis, recording: str, index: int) -> int:
    body = {
        "model": "naive",
        "messages": [{"role": "user", "content": str(index)}],
        "simulator": {"replay": recording},
        "stream": True,
    }
    count = 0
    async with aconnect_sse(client, "POST", "/chat/completions", json=body) as source:
        async for event in source.aiter_sse():
            if event.data == "[DONE]":
                break
            await redis.xadd(f"naive:{index}", {"type": "delta", "chunk": json.dumps(json.loads(event.data))})
            count += 1
    return count


async def main(url: str, base: str, recording: str, jobs: int) -> None:
    redis = Redis.from_url(url)
    async with httpx.AsyncClient(base_url=base, timeout=None) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*(job(client, redis, recording, i) for i in range(jobs)))
        elapsed = time.perf_counter() - started
    await redis.aclose()
    print(json.dumps({"seconds": elapsed, "deltas": sum(counts)}))


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
