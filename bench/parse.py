"""Per-chunk cost of the worker's hot path, in one process, against the obvious implementation.

Fleet: ``SSEParser`` on the network bytes, ``orjson`` parse, accumulation, compact encoding.
Baseline: httpx-sse's decoder on decoded text, ``json.loads``, the same accumulation, and the chunk
re-serialized with ``json.dumps`` for storage (what a writer that stores parsed objects does).
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson

from shared.accumulate import ChatAccumulator
from shared.sse import SSEParser
from shared.store import codec

from .common import text_chunks

CHUNKS = 5000
NETWORK_READ = 4096
REPEATS = 5


def _body(chunks: list[bytes]) -> bytes:
    return b"".join(b"data: " + chunk + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def _reads(body: bytes) -> list[bytes]:
    return [body[i : i + NETWORK_READ] for i in range(0, len(body), NETWORK_READ)]


def _fleet(reads: list[bytes]) -> int:
    parser = SSEParser()
    accumulator = ChatAccumulator()
    encoder = codec.DeltaEncoder("bench", 1, "1-0")
    count = 0
    for read in reads:
        for event in parser.feed(read):
            if event.data == b"[DONE]":
                continue
            accumulator.add(orjson.loads(event.data))
            encoder.delta(event.data)
            count += 1
    accumulator.result()
    return count


def _baseline(reads: list[bytes]) -> int:
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    lines, decoder = SSELineDecoder(), SSEDecoder()
    accumulator = ChatAccumulator()
    count = 0
    for read in reads:
        for line in lines.decode(read.decode()):
            event = decoder.decode(line)
            if event is None or event.data == "[DONE]":
                continue
            chunk = json.loads(event.data)
            accumulator.add(chunk)
            json.dumps(chunk).encode()
            count += 1
    accumulator.result()
    return count


def _best_ns_per_chunk(work: Any, reads: list[bytes]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        count = work(reads)
        best = min(best, (time.perf_counter_ns() - start) / count)
    return best


def run() -> list[dict[str, Any]]:
    reads = _reads(_body(text_chunks(CHUNKS, obfuscation=True)))
    fleet = _best_ns_per_chunk(_fleet, reads)
    baseline = _best_ns_per_chunk(_baseline, reads)
    return [
        {
            "scenario": "worker cost per chunk (parse, accumulate, encode)",
            "case": "OpenAI plain-text chunks, 4 KiB reads",
            "fleet_us": round(fleet / 1000, 2),
            "baseline_us": round(baseline / 1000, 2),
            "ratio": round(baseline / fleet, 2),
            "goal": "faster than the baseline",
        }
    ]
