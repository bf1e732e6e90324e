"""Redis memory per delta: the fleet's compact entries against storing each chunk's JSON whole.

``MEMORY USAGE`` of a job stream holding N deltas (plus its queued/started/done entries), divided
by N; the baseline stores the raw chunk JSON in every entry, as the obvious writer would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shared.store import codec, connect

from .common import redis_server, text_chunks

DELTAS = 2000


async def _measure(url: str, chunks: list[bytes]) -> dict[str, float]:
    redis = connect.connect(url)
    try:
        await redis.flushdb()
        encoder = codec.DeltaEncoder("bench", 1, "1763474589000-1")
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xadd("compact", codec.encode("started", {"attempt": 1}), id="1763474589000-1")  # type: ignore[arg-type]
            for raw in chunks:
                entry_id, fields = encoder.delta(raw)
                pipe.xadd("compact", fields, id=entry_id)  # type: ignore[arg-type]
            for raw in chunks:
                pipe.xadd("naive", {"type": "delta", "chunk": raw})
            await pipe.execute()
        compact = await redis.memory_usage("compact", samples=0)
        naive = await redis.memory_usage("naive", samples=0)
        return {"compact": compact / len(chunks), "naive": naive / len(chunks)}
    finally:
        await redis.aclose()


def run() -> list[dict[str, Any]]:
    rows = []
    with redis_server() as url:
        for label, obfuscation in (
            ("plain text, no padding (vLLM, Groq, simulator)", False),
            ("plain text, OpenAI with obfuscation padding", True),
        ):
            chunks = text_chunks(DELTAS, obfuscation=obfuscation)
            figures = asyncio.run(_measure(url, chunks))
            rows.append(
                {
                    "scenario": "redis memory per delta",
                    "case": label,
                    "fleet_bytes": round(figures["compact"], 1),
                    "baseline_bytes": round(figures["naive"], 1),
                    "ratio": round(figures["naive"] / figures["compact"], 2),
                    "goal": "<= 40 bytes",
                    "chunk_bytes": round(sum(map(len, chunks)) / len(chunks), 1),
                }
            )
    return rows
