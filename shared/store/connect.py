"""Opening Redis for each role: the URLs from the settings (or the embedded server), one way for
every process."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

from .. import embedded
from ..settings import EMBEDDED, Settings

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


def pool(url: str, *, max_connections: int | None = None, name: str | None = None) -> ConnectionPool:
    """A connection pool for ``url``; TLS connections check the server's hostname.

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
    if url.startswith("rediss://"):
        options["ssl_check_hostname"] = True
    if max_connections is not None:
        return BlockingConnectionPool.from_url(url, timeout=SOCKET_TIMEOUT_S, **options)
    return ConnectionPool.from_url(url, **options)


def connect(url: str, *, max_connections: int | None = None, name: str | None = None) -> Redis:
    """A ``redis.asyncio.Redis`` with bytes responses; closing it closes its pool."""
    return Redis.from_pool(pool(url, max_connections=max_connections, name=name))
