"""Fan-in on a Redis Cluster: how one gateway reader follows many streams when they are in many slots.

On one Redis a reader blocks in one XREAD over every stream it follows; a cluster refuses that across
slots (CROSSSLOT). Three ways around it, measured on a local cluster of three primaries (no
replicas), a reader process following ``STREAMS`` streams that a writer process appends to at
``RATE`` entries/s each (~60-byte entries, each stamped with CLOCK_MONOTONIC), both on uvloop:

- **buckets**: every stream in one hash tag, one blocking XREAD over them all on one connection to
  their primary (``redis.asyncio.Redis``, as the single-Redis reader does): what a reader pays per
  bucket if jobs were grouped into a few hash tags;
- **notify+read** (ours, ``shared.store.live``): every stream in its own slot; each append also
  announces its entry (SPUBLISH on the stream's live channel); the reader holds one connection per
  primary subscribed (SSUBSCRIBE, one command per channel) and reads each announced stream from its
  cursor (non-blocking XREAD), a round's reads packed into one write per primary (on a connection
  per primary, which count too). This is the gateway's own code (``ClusterStreamStore.follow``);
  its first version read through redis-py's cluster pipeline, which cost ~85 µs of CPU an XREAD
  and put this design's p99 at 130-160 ms against the buckets' 6-7 ms;
- **a connection per stream**: every stream in its own slot, one connection each blocked in XREAD.

The writer appends as the fleet does, through a script (EVALSHA; in notify+read the script's twin
that also publishes: ``shared.store.streams``), one task per stream at its own phase, the calls of a
loop turn in one cluster pipeline (grouped per node). So the designs differ in what the fan-in
costs, not in script overhead.

Per design: delivery latency p50/p99 (stamp to the reader's receipt), the reader's CPU per entry
(``time.process_time()`` inside it, after a warm-up), the Redis CPU per entry (INFO cpu of every
primary, before and after: writes and reads together) and the reader's connections (CLIENT LIST, by
name). One row per design: ``fleet_ms`` is its p99, ``baseline_ms`` the buckets' p99 (one XREAD is
the floor any other fan-in is held against), ``ratio`` the one over the other; the CPU figures and
connections, which decide between the designs as much, are beside. Everything shares two cores
(three Redis processes, the writer, the reader): latency measures the box too.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import uvloop
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from shared.store import keys
from shared.store.cluster import ClusterStreamStore
from shared.store.connect import connect_cluster
from tests.cluster import LocalCluster, local_cluster

from .common import percentiles, redis_cpu_s

STREAMS = int(os.environ.get("STREAMFLEET_BENCH_FANIN_STREAMS", "300"))
SECONDS = int(os.environ.get("STREAMFLEET_BENCH_FANIN_SECONDS", "10"))
RATE = 20  # entries/s per stream
ENTRY_BYTES = 60
COUNT = 100  # entries an XREAD takes from one stream at most
WARMUP_NS = 1_000_000_000  # from the reader's first entry: latency and CPU counted after it
READER = "fanin-reader"  # the reader's connections' name (CLIENT SETNAME), to count them

_XADD = "return redis.call('XADD', KEYS[1], '*', 'd', ARGV[1])"
_XADD_LIVE = f"""
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[1])
redis.call('SPUBLISH', KEYS[1] .. '{keys.LIVE_SUFFIX}', id)
return id
"""


class _Tally:
    """What the reader received: every entry counted, latencies and CPU after the warm-up."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.samples: list[float] = []
        self.warm_from_ns: int | None = None
        self.last_ns = 0
        self.cpu_from = self.cpu_to = 0.0
        self.done = asyncio.Event()

    def take(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        now = time.monotonic_ns()
        if self.warm_from_ns is None:
            self.warm_from_ns = now + WARMUP_NS
        if now >= self.warm_from_ns:
            if not self.samples:
                self.cpu_from = time.process_time()
            for _, fields in entries:
                self.samples.append((now - int(fields[b"d"].split(b" ", 1)[0])) / 1e6)
        self.received += len(entries)
        self.last_ns = now
        if self.received >= self.expected:
            self.cpu_to = time.process_time()
            self.done.set()


def _owner(cluster: RedisCluster, key: str) -> ClusterNode:
    node = cluster.get_node_from_key(key)
    assert node is not None
    return node


async def _plain(port: int, key: str) -> Redis:
    """A connection of the reader's own to the primary that owns ``key``'s slot."""
    cluster = RedisCluster(host="127.0.0.1", port=port)
    await cluster.initialize()
    node = _owner(cluster, key)
    await cluster.aclose()
    redis = Redis(host=node.host, port=int(node.port), client_name=READER, single_connection_client=True)
    await redis.initialize()  # connected now, before the writer starts
    return redis


def _keys(design: str) -> list[str]:
    if design == "buckets":
        return [f"bench:{{b0}}:s{i}" for i in range(STREAMS)]
    return [keys.events(f"job_{i}") for i in range(STREAMS)]  # a slot each, as jobs' streams are


async def _buckets(port: int, streams: list[str], tally: _Tally, ready: asyncio.Event) -> None:
    """One XREAD BLOCK over every stream (one slot), on one connection to its primary."""
    cursors = dict.fromkeys(streams, "0-0")
    async with await _plain(port, streams[0]) as redis:
        ready.set()
        while True:
            for stream, entries in await redis.xread(cursors, count=COUNT, block=0):  # type: ignore[arg-type]
                cursors[stream.decode()] = entries[-1][0]
                tally.take(entries)


async def _notified(port: int, streams: list[str], tally: _Tally, ready: asyncio.Event) -> None:
    """The gateway's own reader on a cluster: ``ClusterStreamStore.follow`` (``shared.store.live``)."""
    cluster = connect_cluster(f"redis+cluster://127.0.0.1:{port}", name=READER)
    store = ClusterStreamStore(cluster, ttl_seconds=60)
    live = store.waker("bench", 0)
    cursors = dict.fromkeys(streams, "0-0")
    try:
        await store.follow(cursors, wake=live, count=COUNT, block_ms=1000)  # subscribed before the writer
        ready.set()
        while True:
            for job_id, entries in await store.follow(cursors, wake=live, count=COUNT, block_ms=5000):
                cursors[keys.events(job_id)] = entries[-1][0].decode()
                tally.take(entries)
    finally:
        await store.drop_wakes([live])
        await cluster.aclose()


async def _connections(port: int, streams: list[str], tally: _Tally, ready: asyncio.Event) -> None:
    """A connection per stream, each blocked in XREAD on its stream."""

    async def follow(redis: Redis, stream: str) -> None:
        cursor = "0-0"
        while True:
            for _, entries in await redis.xread({stream: cursor}, count=COUNT, block=0):
                cursor = entries[-1][0]
                tally.take(entries)

    connections = []
    try:
        for stream in streams:
            connections.append(await _plain(port, stream))
        ready.set()
        await asyncio.gather(*(follow(redis, stream) for redis, stream in zip(connections, streams, strict=True)))
    finally:
        for redis in connections:
            await redis.aclose()


_Reader = Callable[[int, list[str], _Tally, asyncio.Event], Coroutine[Any, Any, None]]
DESIGNS: dict[str, tuple[str, _Reader, str, str]] = {
    "buckets": ("one hash tag, one XREAD BLOCK over all", _buckets, _XADD, "the floor (one slot only)"),
    "notify+read": (
        "a slot each, SSUBSCRIBE per primary + XREADs packed per primary",
        _notified,
        _XADD_LIVE,
        "connections per primary, not per stream; p99 near the floor's",
    ),
    "connection per stream": (
        "a slot each, one XREAD BLOCK connection per stream",
        _connections,
        _XADD,
        "(the alternative: a connection per stream)",
    ),
}


async def _read(design: str, port: int, pipe: Connection) -> None:
    tally, ready = _Tally(STREAMS * RATE * SECONDS), asyncio.Event()
    reader = asyncio.create_task(DESIGNS[design][1](port, _keys(design), tally, ready))
    await ready.wait()
    pipe.send("ready")
    try:
        await asyncio.wait_for(tally.done.wait(), SECONDS + 30)
    except TimeoutError:
        tally.cpu_to = time.process_time()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    cpu_us = (tally.cpu_to - tally.cpu_from) * 1e6 / max(1, len(tally.samples))
    seconds = (tally.last_ns - (tally.warm_from_ns or 0)) / 1e9
    pipe.send(
        {
            "received": tally.received,
            "latency": percentiles(tally.samples),
            "cpu_us": cpu_us,
            "per_s": len(tally.samples) / seconds if seconds > 0 else 0.0,
        }
    )


async def _write(design: str, port: int) -> None:
    """A task per stream appending ``RATE`` entries/s, at its own phase, for ``SECONDS``; the calls of
    a loop turn leave in one cluster pipeline (one batch in flight at a time)."""
    cluster = RedisCluster(host="127.0.0.1", port=port)
    sha = await cluster.script_load(DESIGNS[design][2])
    pending: list[tuple[str, bytes]] = []
    flusher: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()

    async def flush() -> None:
        nonlocal flusher
        while pending:
            batch = pending[:]
            pending.clear()
            async with cluster.pipeline(transaction=False) as pipe:
                for stream, data in batch:
                    pipe.execute_command("EVALSHA", sha, 1, stream, data)  # pipe.evalsha is refused
                await pipe.execute()
        flusher = None

    async def append(stream: str, start: float) -> None:
        nonlocal flusher
        for k in range(RATE * SECONDS):
            await asyncio.sleep(start + k / RATE - loop.time())
            stamp = b"%d " % time.monotonic_ns()
            pending.append((stream, stamp.ljust(ENTRY_BYTES, b"x")))
            if flusher is None:
                flusher = loop.create_task(flush())

    phases = random.Random(7)
    await asyncio.gather(*(append(stream, loop.time() + phases.random() / RATE) for stream in _keys(design)))
    while flusher is not None:
        await flusher
    await cluster.aclose()


def _reader_process(design: str, port: int, pipe: Connection) -> None:
    uvloop.run(_read(design, port, pipe))


def _writer_process(design: str, port: int) -> None:
    uvloop.run(_write(design, port))


def _reader_connections(cluster: LocalCluster) -> int:
    return sum(
        1 for port in cluster.primaries for client in cluster.client(port).client_list() if client["name"] == READER
    )


def _measure(cluster: LocalCluster, design: str) -> dict[str, Any]:
    """One design: the reader started and connected, then the writer; figures over the writer's run."""
    for port in cluster.primaries:
        cluster.client(port).flushall()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    port = cluster.primaries[0]
    reader = context.Process(target=_reader_process, args=(design, port, theirs))
    writer = context.Process(target=_writer_process, args=(design, port))
    reader.start()
    try:
        assert ours.poll(60), f"{design}: the reader did not get ready"
        assert ours.recv() == "ready"
        connections = _reader_connections(cluster)
        cpu_before = redis_cpu_s(cluster.primaries)
        writer.start()
        while not ours.poll(1):
            assert writer.exitcode in (None, 0), f"{design}: the writer failed"
            assert reader.is_alive(), f"{design}: the reader failed"
        result: dict[str, Any] = ours.recv()
        redis_cpu = redis_cpu_s(cluster.primaries) - cpu_before
    finally:
        for process in (writer, reader):
            if process.pid is not None:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join()
    written = STREAMS * RATE * SECONDS
    return {**result, "connections": connections, "redis_cpu_us": redis_cpu * 1e6 / written, "written": written}


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as directory, local_cluster(Path(directory), replicas_each=0) as cluster:
        measured = {design: _measure(cluster, design) for design in DESIGNS}
    floor = measured["buckets"]["latency"]["p99"]
    rows = []
    for design, (how, _, _, goal) in DESIGNS.items():
        figures = measured[design]
        latency = figures["latency"]
        rows.append(
            {
                "scenario": "reader fan-in on a Redis Cluster (3 primaries), delivery p99",
                "case": f"{design}: {how}; {STREAMS} streams x {RATE} entries/s",
                "fleet_ms": round(latency["p99"], 2),
                "baseline_ms": round(floor, 2),
                "ratio": round(latency["p99"] / floor, 2) if floor else None,
                "goal": goal,
                "p50_ms": round(latency["p50"], 2),
                "max_ms": round(latency["max"], 2),
                "reader_cpu_us_per_entry": round(figures["cpu_us"], 1),
                "redis_cpu_us_per_entry": round(figures["redis_cpu_us"], 1),
                "reader_connections": figures["connections"],
                "entries": figures["received"],
                "entries_per_s": round(figures["per_s"]),
                "written": figures["written"],
            }
        )
    return rows


if __name__ == "__main__":
    print(orjson.dumps(run(), option=orjson.OPT_INDENT_2).decode())
