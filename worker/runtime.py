"""What every job of a worker process shares: built once at start, closed once at exit."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared.settings import Settings
from shared.transitions import JobStream

from .supervisor import Supervisor
from .upstream import Upstream
from .writer import StreamWriter


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    jobs: JobStream
    writer: StreamWriter
    upstream: Upstream
    supervisor: Supervisor
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def create(cls, settings: Settings, redis: Redis) -> Runtime:
        return cls(
            settings=settings,
            redis=redis,
            jobs=JobStream(redis, ttl_seconds=settings.stream_ttl_seconds),
            writer=StreamWriter(redis),
            upstream=Upstream(settings),
            supervisor=Supervisor(redis, settings),
        )

    async def aclose(self) -> None:
        await self.supervisor.aclose()
        await self.upstream.aclose()
