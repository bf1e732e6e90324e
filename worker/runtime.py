"""What every job of a worker process shares: built once at start, closed once at exit."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from shared.models import ERROR
from shared.settings import Settings
from shared.store import OutOfMemory, QueueStore, Stores, StreamStore
from shared.tasks import Supervised

from . import metrics
from .supervisor import Supervisor
from .upstream import Upstream
from .writer import StreamWriter


@dataclass
class Runtime:
    settings: Settings
    stores: Stores
    writer: StreamWriter
    upstream: Upstream
    supervisor: Supervisor
    tasks: Supervised = field(default_factory=Supervised)
    """The worker's shared loops (heartbeat, sweep, cancel listener, ticker): restarted if they die."""
    started: float = field(default_factory=time.monotonic)
    redis_seen: float = 0.0
    """When a heartbeat last reached Redis (monotonic): what the health probes judge Redis by."""
    beat_at: float = 0.0
    """When the heartbeat last ended a round, reaching Redis or not (monotonic)."""
    draining: bool = False
    """Set at the shutdown signal: the worker takes no more jobs and reports itself not ready."""
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def create(cls, settings: Settings, stores: Stores) -> Runtime:
        return cls(
            settings=settings,
            stores=stores,
            writer=StreamWriter(stores.streams),
            upstream=Upstream(settings),
            supervisor=Supervisor(stores, settings),
        )

    @property
    def queue(self) -> QueueStore:
        return self.stores.queue

    @property
    def streams(self) -> StreamStore:
        return self.stores.streams

    async def end(
        self,
        job_id: str,
        kind: str,
        data: Any,
        *,
        started_id: str | None = None,
        opening: tuple[dict[str, Any], str | None] | None = None,
    ) -> bool:
        """Write the job's terminal event (``StreamStore.end``) and count it; False if refused. A job
        that ends in error joins the recent failures (unless the queue's Redis is full too)."""
        ended = await self.streams.end(job_id, kind, data, started_id=started_id, opening=opening)
        if ended is None:
            return False
        metrics.JOBS.labels(kind).inc()
        if kind == ERROR:
            try:
                await self.queue.record_failure(job_id, data.get("error") or {})
            except OutOfMemory:
                self.writer.storage_full()
        return True

    async def aclose(self) -> None:
        await self.tasks.aclose()
        await self.upstream.aclose()
