"""Both roles, opened once per process: the queue's client and the stream store's (one client when
both roles live on one Redis)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import OutOfMemoryError as OutOfMemory
from redis.exceptions import RedisError
from redis.exceptions import RedisError as StoreError

from ..settings import Settings
from ..urls import is_cluster_url
from . import connect, queue
from .cluster import UNREACHABLE, ClusterStreamStore
from .queue import QueueStore
from .streams import StreamStore

Unavailable: Final = UNREACHABLE
"""What a Redis that cannot be reached raises: worth waiting and trying again (on a cluster, also a
slot whose primary is failing over). (``StoreError``, redis-py's ``RedisError``, is the root of every
error a Redis command raises.)"""
__all__ = ["OutOfMemory", "StoreError", "Stores", "Unavailable", "open_stores", "stream_ttl_while_queued"]


def stream_ttl_while_queued(settings: Settings) -> int:
    """How long a job's stream lives before the job ends: longer than arq keeps a waiting job, plus
    two job deadlines."""
    return queue.QUEUE_TTL_SECONDS + int(settings.job_deadline_seconds) * 2


@dataclass
class Stores:
    queue: QueueStore
    streams: StreamStore

    @property
    def split(self) -> bool:
        """Whether the two roles live on different Redis servers."""
        return self.queue.redis is not self.streams.redis

    async def eviction_policies(self) -> dict[str, str | None]:
        """Each role's ``maxmemory-policy``, ``None`` where the server will not say (managed Redis
        often forbids CONFIG)."""
        clients = {"queue": self.queue.redis, "stream store": self.streams.redis}
        policies: dict[str, str | None] = {}
        for role, client in clients.items():
            try:
                value = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
            except RedisError:
                value = None
            policies[role] = value.decode() if isinstance(value, bytes) else value
        return policies

    async def memory(self) -> dict[str, dict[str, Any]]:
        """Each role's memory: bytes used, the ``maxmemory`` bound (0: none) and whether it is reached."""
        clients = (
            {"queue": self.queue.redis, "stream store": self.streams.redis}
            if self.split
            else {"redis": self.queue.redis}
        )
        report: dict[str, dict[str, Any]] = {}
        for role, client in clients.items():
            info = await client.info("memory")
            used, bound = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
            report[role] = {"used_bytes": used, "max_bytes": bound, "full": bool(bound) and used >= bound}
        return report

    async def aclose(self) -> None:
        await self.queue.redis.aclose(close_connection_pool=True)
        if isinstance(self.streams, ClusterStreamStore):
            await self.streams.redis.aclose()
        elif self.split:
            await self.streams.redis.aclose(close_connection_pool=True)


async def open_stores(settings: Settings, *, name: str, max_connections: int | None = None) -> Stores:
    """Open both roles (starting the embedded server if that is the setting).

    :param name: the CLIENT SETNAME of the connections.
    :param max_connections: bound each role's pool (commands wait for a free connection).
    """
    queue_url = await asyncio.to_thread(connect.queue_url, settings)
    stream_url = await asyncio.to_thread(connect.stream_url, settings)
    queue_client = queue.connect(connect.pool(queue_url, max_connections=max_connections, name=name))
    if is_cluster_url(stream_url):
        cluster = connect.connect_cluster(stream_url, max_connections=max_connections, name=name)
        return Stores(QueueStore(queue_client), ClusterStreamStore(cluster, ttl_seconds=settings.stream_ttl_seconds))
    stream_client = (
        queue_client
        if stream_url == queue_url
        else connect.connect(stream_url, max_connections=max_connections, name=name)
    )
    return Stores(QueueStore(queue_client), StreamStore(stream_client, ttl_seconds=settings.stream_ttl_seconds))
