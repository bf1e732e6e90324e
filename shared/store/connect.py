"""Opening Redis for each role: the URLs from the settings (or the embedded server), one way for
every process."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from .. import embedded
from ..settings import EMBEDDED, Settings
from ..urls import cluster_url, is_sentinel_url, sentinel_url

SOCKET_TIMEOUT_S = 15.0
"""Longer than any XREAD BLOCK we issue: a block longer than the socket timeout raises TimeoutError."""
BLOCK_MS = 5_000
"""How long a reader blocks in one XREAD before it checks on the job and blocks again."""


def _resolved(url: str, settings: Settings) -> str:
    """A URL from the settings (checked there), or the embedded server's (started if need be)."""
    return embedded.ensure(settings.state_dir).url if url == EMBEDDED else url


def queue_url(settings: Settings) -> str:
    """The queue's Redis URL."""
    return _resolved(settings.redis_url, settings)


def stream_url(settings: Settings) -> str:
    """The stream store's Redis URL: its own setting, else the queue's."""
    return _resolved(settings.stream_redis_url or settings.redis_url, settings)


class _SentinelPool(SentinelConnectionPool):
    """Connections to whichever server the Sentinels name as primary; closing it closes the
    connections to the Sentinels too (redis-py leaves them open)."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


class _SentinelBlockingPool(_SentinelPool, BlockingConnectionPool):
    """As ``_SentinelPool``, waiting for a free connection past the bound (redis-py has the two apart)."""


def _sentinel_pool(url: str, options: dict[str, Any]) -> ConnectionPool:
    """A pool of connections to the primary the Sentinels of ``url`` name (``sentinel_url``); after a
    failover, a connection to the old primary fails and the next one goes to the new."""
    target = sentinel_url(url)
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels,
        sentinel_kwargs={"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "password": target.sentinel_password},
    )
    connection: dict[str, Any] = {**options, "db": target.db, "username": target.username, "password": target.password}
    if target.tls:
        connection["ssl"] = True
    if connection.get("max_connections") is not None:
        return _SentinelBlockingPool(target.service, sentinels, timeout=SOCKET_TIMEOUT_S, **connection)  # type: ignore[no-untyped-call]
    return _SentinelPool(target.service, sentinels, **connection)  # type: ignore[no-untyped-call]


def pool(url: str, *, max_connections: int | None = None, name: str | None = None) -> ConnectionPool:
    """A connection pool for ``url`` (a server's URL, or Sentinels': ``sentinel_url``); TLS
    connections check the server's hostname.

    :param max_connections: a bound: past it, a command waits for a free connection (instead of
        failing, as redis-py's plain pool would).
    :param name: the CLIENT SETNAME of its connections (``CLIENT LIST`` then tells who is who).
    """
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "max_connections": max_connections,
        "client_name": name,
    }
    if is_sentinel_url(url):
        return _sentinel_pool(url, options)
    if url.startswith("rediss://"):
        options["ssl_check_hostname"] = True
    if max_connections is not None:
        return BlockingConnectionPool.from_url(url, timeout=SOCKET_TIMEOUT_S, **options)
    return ConnectionPool.from_url(url, **options)


def connect(url: str, *, max_connections: int | None = None, name: str | None = None) -> Redis:
    """A ``redis.asyncio.Redis`` with bytes responses; closing it closes its pool."""
    return Redis.from_pool(pool(url, max_connections=max_connections, name=name))


SLOT_MOVING = (MovedError, AskError, ClusterDownError, TryAgainError)
"""Error replies of a cluster node that mean the slot is elsewhere or between primaries, to commands
sent to a node by hand (``node_client``): wait, learn the slot map again, try again (a slot being
migrated is used once its move is over: no ASKING)."""


def _bound(limit: int | None) -> asyncio.Semaphore | contextlib.nullcontext[None]:
    return asyncio.Semaphore(limit) if limit else contextlib.nullcontext()


class _SeededCluster(RedisCluster):
    """``RedisCluster`` that keeps its seed nodes: redis-py forgets a node whose command failed from the
    nodes it learns the cluster from, and a failed command closes every node's connections, so one
    primary's death fails the commands in flight on the others too: under concurrent readers that left
    no node to learn from, for good ("Redis Cluster cannot be connected")."""

    def __init__(self, seeds: list[tuple[str, int]], *, max_in_flight: int | None = None, **options: Any) -> None:
        super().__init__(startup_nodes=[ClusterNode(host, port) for host, port in seeds], **options)
        self._seeds = seeds
        # redis-py's cluster opens a connection per concurrent command and, at its bound, raises
        # instead of waiting: bounds on commands and on pipelines in flight (two, since a pipeline's
        # redirected command runs as a command) bound the connections per node, and wait.
        self.in_flight = _bound(max_in_flight)
        self.pipelines_in_flight = _bound(max_in_flight)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with self.in_flight:
                return await super().execute_command(*args, **kwargs)
        except (RuntimeError, AttributeError) as exc:
            raise await self._closed_under(exc) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        super().pipeline(transaction, shard_hint)  # what it refuses (a transaction), refused the same way
        return _ClosedAware(self)  # type: ignore[abstract]

    async def _closed_under(self, exc: Exception) -> Exception:
        """A node's error makes redis-py close every node's connections, also those other commands are
        using: uvloop then raises RuntimeError on a closed transport, and redis-py AttributeError on a
        connection whose writer is gone. Either is an unreachable Redis, to be tried again."""
        closed = "closed" in str(exc) if isinstance(exc, RuntimeError) else "'NoneType' object" in str(exc)
        if not closed:
            return exc
        await self.aclose()
        return RedisConnectionError(f"a cluster connection was closed under a command ({exc})")

    async def initialize(self) -> RedisCluster:
        known = self.nodes_manager.startup_nodes
        for host, port in self._seeds:
            if f"{host}:{port}" not in known:
                node = ClusterNode(host, port, **self.connection_kwargs)
                known[node.name] = node
        return await super().initialize()


class _ClosedAware(ClusterPipeline):
    """A cluster pipeline that reports a connection closed under it as ``_SeededCluster`` does."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        assert isinstance(self._client, _SeededCluster)
        try:
            async with self._client.pipelines_in_flight:
                return await super().execute(raise_on_error, allow_redirections)
        except (RuntimeError, AttributeError) as exc:
            raise await self._client._closed_under(exc) from exc


def node_client(node: ClusterNode) -> Redis:
    """A client of one cluster node, with the cluster client's settings (its own connection, for
    commands packed by hand: ``shared.store.cluster`` and ``shared.store.live``)."""
    pool = ConnectionPool(connection_class=node.connection_class, max_connections=1, **node.connection_kwargs)
    return Redis.from_pool(pool)  # closing the client closes its connection


def connect_cluster(url: str, *, max_connections: int | None = None, name: str | None = None) -> RedisCluster:
    """A ``redis.asyncio.RedisCluster`` from a cluster URL's seed nodes (``shared.urls``): it learns the
    slots' owners from them, follows MOVED and ASK, and learns them again after a failover.

    :param max_connections: a bound on commands in flight, so on the connections to each node: past
        it, a command waits.
    """
    target = cluster_url(url)
    cluster: RedisCluster = _SeededCluster(  # type: ignore[abstract]
        target.nodes,
        max_in_flight=max_connections,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        ssl_check_hostname=target.tls,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        client_name=name,
    )
    return cluster
