"""Opening Redis for each role: the URLs from the settings (or the embedded server), one way for
every process."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

from .. import embedded
from ..errors import ConfigurationError
from ..settings import EMBEDDED, Settings

SOCKET_TIMEOUT_S = 15.0
"""Longer than any XREAD BLOCK we issue: a block longer than the socket timeout raises TimeoutError."""
BLOCK_MS = 5_000
"""How long a reader blocks in one XREAD before it checks on the job and blocks again."""


def _checked(url: str, variable: str, settings: Settings) -> str:
    if url == EMBEDDED:
        return embedded.ensure(settings.state_dir).url
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(f"{variable} must start with redis://, rediss:// or unix://, not {scheme or '(none)'}")
    return url


def queue_url(settings: Settings) -> str:
    """The queue's Redis URL: the configured one, or the embedded server's (started if need be)."""
    return _checked(settings.redis_url, "STREAMFLEET_REDIS_URL", settings)


def stream_url(settings: Settings) -> str:
    """The stream store's Redis URL: its own setting, else the queue's."""
    if settings.stream_redis_url is None:
        return queue_url(settings)
    return _checked(settings.stream_redis_url, "STREAMFLEET_STREAM_REDIS_URL", settings)


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
