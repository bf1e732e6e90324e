"""The stream store on a Redis Cluster (``STREAMFLEET_STREAM_REDIS_URL=redis+cluster://...``).

Every key of one job carries the job id as its hash tag, so each script of a job's life runs on the
one node that owns the job's slot, through redis-py's ``RedisCluster`` (which routes by key, follows
MOVED and ASK, and learns the slots again after a failover). What spans jobs is split by slot:

- **appends**: a flush's entries are grouped by slot, one append script per slot, all of them in one
  cluster pipeline: one round trip per node per flush.
- **the cancel sweep, last entries, existence checks**: pipelines, split per node the same way.
- **the orphan sweep**: SCAN runs on every primary in turn.
- **the gateway's fan-in** (one XREAD over every followed stream) is refused across slots by a
  cluster: not built yet, so ``follow`` says so, and the gateway refuses to start on a cluster.

While a primary fails over, its slots answer CLUSTERDOWN or nothing: those errors count as Redis
being unreachable (``Unavailable``), which the writer and the readers already wait out.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, NoScriptError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .calls import Lua
from .codec import D, RawEntry, T, is_terminal
from .streams import _APPEND, Appended, Batch, StreamStore, Wake

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError, RedisClusterException)
"""``stores.Unavailable``, which imports this module: on a cluster, also a slot whose primary is failing
over, and a client that cannot reach a node to learn the slots from."""


class ClusterCalls:
    """Script calls on a cluster, each routed to the node of its keys' slot (no coalescing across
    nodes: a turn's calls mostly belong to different slots)."""

    def __init__(self, redis: RedisCluster) -> None:
        self._redis = redis

    async def run(self, script: Lua, *, keys: list[Any], args: list[Any]) -> Any:
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

    async def append(self, batch: Batch) -> Appended:
        groups: dict[int, list[int]] = {}
        stream_keys = [keys.events(attempt.job_id).encode() for attempt, _, _ in batch]
        for position, key in enumerate(stream_keys):
            groups.setdefault(key_slot(key), []).append(position)
        pending = list(groups.values())
        refused: list[int] = []
        full: list[int] = []
        size = 0
        for _ in range(2):  # once more for groups whose primary did not know the script (a new primary)
            unknown = []
            async with self.redis.pipeline(transaction=False) as pipe:
                for positions in pending:
                    argv = [part for p in positions for part in (batch[p][1], batch[p][2][T], batch[p][2][D])]
                    pipe.execute_command(
                        "EVALSHA", _APPEND.sha, len(positions), *(stream_keys[p] for p in positions), *argv
                    )
                    size += sum(len(part) for part in argv)
                replies = await pipe.execute(raise_on_error=False)
            for positions, reply in zip(pending, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    unknown.append(positions)
                    continue
                if isinstance(reply, Exception):
                    if isinstance(reply, UNREACHABLE):
                        # A node is gone (failing over): learn the slots' owners again on the next try.
                        await self.redis.aclose()
                    raise reply
                group_refused, group_full = reply
                refused += [positions[int(p) - 1] + 1 for p in group_refused]
                full += [positions[int(p) - 1] + 1 for p in group_full]
            if not unknown:
                break
            await self.redis.script_load(_APPEND.source)
            pending = unknown
        return Appended(sorted(refused), sorted(full), size)

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

    async def follow(
        self, cursors: dict[str, str], *, wake: Wake, count: int, block_ms: int | None
    ) -> list[tuple[str, list[RawEntry]]]:
        raise NotImplementedError("the gateway's fan-in over a Redis Cluster is not built yet")
