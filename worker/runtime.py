"""What every job of a worker process shares: built once at start, closed once at exit."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from shared.settings import Settings
from shared.transitions import JobStream

from . import metrics
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
    started: float = field(default_factory=time.monotonic)
    redis_seen: float = 0.0
    """When a heartbeat last reached Redis (monotonic): what the health probes judge Redis by."""
    beat_at: float = 0.0
    """When the heartbeat last ended a round, reaching Redis or not (monotonic)."""
    draining: bool = False
    """Set at the shutdown signal: the worker takes no more jobs and reports itself not ready."""
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

    async def end(self, job_id: str, kind: str, data: Any, *, started_id: str | None = None) -> bool:
        """Write the job's terminal event (see ``JobStream.end``) and count it; False if refused."""
        ended = await self.jobs.end(job_id, kind, data, started_id=started_id)
        if ended:
            metrics.JOBS.labels(kind).inc()
        return ended is not None

    async def aclose(self) -> None:
        await self.supervisor.aclose()
        await self.upstream.aclose()
