"""The stream store on a Redis Cluster (``STREAMFLEET_STREAM_REDIS_URL=redis+cluster://...``).

Every key of one job carries the job id as its hash tag, so each script of a job's life runs on the
one node that owns the job's slot, through redis-py's ``RedisCluster`` (which routes by key, follows
MOVED and ASK, and learns the slots again after a failover). What spans jobs is split by slot:

- **appends**: a flush's entries are grouped by slot, one append script call per slot, packed by hand
  into one write per node: one round trip per node per flush, the nodes written at once.
- **the cancel sweep, last entries, existence checks**: pipelines, split per node the same way.
- **the orphan sweep**: SCAN runs on every primary in turn.
- **the gateway's fan-in** (on one Redis, one XREAD over every followed stream) is refused across
  slots by a cluster: here each script announces what it appends on the job's live channel, and a
  reader listens per node and reads what was announced (``shared.store.live``).

While a primary fails over, its slots answer CLUSTERDOWN or nothing: those errors count as Redis
being unreachable (``Unavailable``), which the writer and the readers already wait out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .calls import Lua, send_packed
from .codec import RawEntry, is_terminal
from .connect import SLOT_MOVING, node_client
from .live import Live
from .streams import _APPEND, Appended, Batch, StreamStore, Wake, pack_append

_APPEND_LIVE = _APPEND.live or _APPEND

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError, RedisClusterException)
"""``stores.Unavailable``, which imports this module: on a cluster, also a slot whose primary is failing
over, and a client that cannot reach a node to learn the slots from."""


class ClusterCalls:
    """Script calls on a cluster, each routed to the node of its keys' slot (no coalescing across
    nodes: a turn's calls mostly belong to different slots)."""

    def __init__(self, redis: RedisCluster) -> None:
        self._redis = redis

    async def run(self, script: Lua, *, keys: list[Any], args: list[Any]) -> Any:
        script = script.live or script  # announcing what it appends, for the gateway (shared.store.live)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._redis.execute_command(*command)
        except NoScriptError:
            await self._redis.script_load(script.source)  # every primary (a new one after a failover)
            return await self._redis.execute_command(*command)


class ClusterStreamStore(StreamStore):
    """``StreamStore`` on a Redis Cluster: what spans jobs is split by slot (module docstring)."""

    def __init__(self, redis: RedisCluster, *, ttl_seconds: int) -> None:
        super().__init__(redis, ttl_seconds=ttl_seconds)  # type: ignore[arg-type]
        self._calls = ClusterCalls(redis)  # type: ignore[assignment]
        self._node_clients: dict[str, Redis] = {}  # node name -> the appends' client for it

    async def append(self, batch: Batch) -> Appended:
        """One append script call per slot, packed by hand into one write per primary (redis-py's
        cluster pipeline spends tens of µs of CPU per command), the primaries written at once."""
        cluster: RedisCluster = self.redis  # type: ignore[assignment]
        await cluster.initialize()  # the slot map: a no-op once known
        groups: dict[int, list[int]] = {}
        for position, (attempt, _, _) in enumerate(batch):
            groups.setdefault(key_slot(attempt.key), []).append(position)
        by_node: dict[str, tuple[ClusterNode, list[list[int]]]] = {}
        for slot, positions in groups.items():
            node = cluster.nodes_manager.get_node_from_slot(slot)
            by_node.setdefault(node.name, (node, []))[1].append(positions)
        written = await asyncio.gather(
            *(
                self._append_on(node, [[batch[p] for p in group] for group in node_groups])
                for node, node_groups in by_node.values()
            ),
            return_exceptions=True,
        )
        refused: list[int] = []
        full: list[int] = []
        size = 0
        for (_, node_groups), outcome in zip(by_node.values(), written, strict=True):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, UNREACHABLE):
                    await cluster.aclose()  # learn the slots' owners again before the writer tries again
                raise outcome
            replies, sent = outcome
            size += sent
            for positions, (group_refused, group_full) in zip(node_groups, replies, strict=True):
                refused += [positions[int(p) - 1] + 1 for p in group_refused]
                full += [positions[int(p) - 1] + 1 for p in group_full]
        return Appended(sorted(refused), sorted(full), size)

    async def _append_on(self, node: ClusterNode, groups: list[Batch]) -> tuple[list[Any], int]:
        """Each group's append script call on ``node``, in one write; its replies and the bytes sent."""
        client = self._node_clients.get(node.name)
        if client is None:
            client = self._node_clients[node.name] = node_client(node)
        payloads = [pack_append(_APPEND_LIVE, group) for group in groups]
        try:
            replies = await send_packed(client, b"".join(payloads), len(payloads))
            unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if unknown:  # a new primary (a failover) that has not seen the script yet
                await client.script_load(_APPEND_LIVE.source)
                again = await send_packed(client, b"".join(payloads[i] for i in unknown), len(unknown))
                for i, reply in zip(unknown, again, strict=True):
                    replies[i] = reply
        except UNREACHABLE:
            del self._node_clients[node.name]
            await client.aclose()
            raise
        for reply in replies:
            if isinstance(reply, SLOT_MOVING):  # the slot moved or is moving, or its primary is failing over
                raise RedisConnectionError(f"appending on {node.name}: {type(reply).__name__} {reply}")
            if isinstance(reply, ResponseError):
                raise reply
        return replies, sum(len(payload) for payload in payloads)

    async def cancel_requested(self, job_ids: list[str]) -> list[bool]:
        if not job_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(keys.cancel_flag(job_id))
            return [bool(flag) for flag in await pipe.execute()]

    async def scan_open(self, cursor: int, *, count: int = 500) -> tuple[int, list[tuple[str, str]]]:
        """The whole cluster in one step: SCAN each primary to its end (the cursor is 0 when done)."""
        found: list[bytes] = []
        cluster: RedisCluster = self.redis  # type: ignore[assignment]
        for node in cluster.get_primaries():
            node_cursor = 0
            while True:
                node_cursor, some = await cluster.execute_command(
                    "SCAN",
                    node_cursor,
                    "MATCH",
                    keys.EVENTS_PATTERN,
                    "COUNT",
                    count,
                    "TYPE",
                    "stream",
                    target_nodes=node,
                )
                found += some
                if int(node_cursor) == 0:
                    break
        job_ids = [keys.job_of(key) for key in found]
        lasts = await self.last_entries(job_ids)
        return 0, [
            (job_id, last[0].decode())
            for job_id, last in zip(job_ids, lasts, strict=True)
            if last and not is_terminal(last[1])
        ]

    def waker(self, gateway: str, index: int) -> Wake:
        return Live(self.redis)  # type: ignore[arg-type]

    async def wake(self, wake: Wake, handle: str) -> None:
        assert isinstance(wake, Live)
        wake.wake(handle)

    async def drop_wakes(self, wakes: Iterable[Wake]) -> None:
        for wake in wakes:
            assert isinstance(wake, Live)
            await wake.aclose()

    async def follow(
        self, cursors: dict[str, str], *, wake: Wake, count: int, block_ms: int | None
    ) -> list[tuple[str, list[RawEntry]]]:
        """The followed streams that have entries after their cursors, as ``StreamStore.follow``
        answers, from announcements and reads (``shared.store.live``); with ``block_ms`` None, one read
        of each of these streams, subscribing to nothing."""
        live = wake
        assert isinstance(live, Live)
        if block_ms is None:
            return await live.read(cursors, list(cursors), count)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        live.woken = False
        while True:
            live.news.clear()
            due: list[str] = []
            try:
                await live.track(cursors)
                due = live.take_due(cursors)
                found = await live.read(cursors, due, count) if due else []
            except UNREACHABLE:
                live.due.update(due)  # still to be read
                await self.redis.aclose()  # learn the slots' owners again before the next try
                raise
            if live.woken:
                # A follow made during this read does not take what it returns (the gateway's reader
                # drops it, as it would on one Redis), and no announcement may come again: read these
                # once more in the next round, which the new follow is part of.
                live.due.update(due)
                return found
            if found:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            await live.wait(remaining)
            if live.woken:
                return []
