"""Liveness: this worker's heartbeat key, the leases of its jobs, and the reaping of lapsed ones.

Every ``lease_seconds / 5`` a worker renews the leases of the jobs it runs and gives back to the
queue any job whose lease has lapsed: its worker died (SIGKILL, OOM, a lost machine). So a job is
running again a few seconds after its worker is gone, not after arq's in-progress key expires (the
job timeout plus 10 s).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from shared import jsonutil, keys
from shared.models import ERROR

from . import metrics
from .runtime import Runtime

logger = logging.getLogger(__name__)

WORKER_TTL_S = 10


async def beat(runtime: Runtime) -> None:
    """Run until cancelled; remove this worker's key on the way out."""
    key = keys.worker(runtime.worker_id)
    lease_ms = int(runtime.settings.lease_seconds * 1000)
    interval = runtime.settings.lease_seconds / 5
    started = time.time()
    try:
        while True:
            running = runtime.supervisor.running
            record = {
                "id": runtime.worker_id,
                "pid": os.getpid(),
                "started": started,
                "running": running,
                "entries_written": runtime.writer.entries_written,
            }
            try:
                await runtime.jobs.renew(running, lease_ms=lease_ms)
                pipe = runtime.redis.pipeline(transaction=False)
                pipe.set(key, jsonutil.dumps(record), ex=WORKER_TTL_S)
                pipe.zcard(keys.QUEUE)
                pipe.zcard(keys.RUNNING)
                _, queue_entries, fleet_running = await pipe.execute()
                runtime.redis_seen = time.monotonic()
                # arq's queue holds running jobs too (until they finish): the waiting ones are the rest.
                metrics.QUEUE_DEPTH.set(max(0, queue_entries - fleet_running))
                metrics.FLEET_RUNNING.set(fleet_running)
                await reap(runtime)
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)
            runtime.beat_at = time.monotonic()
            await asyncio.sleep(interval)
    finally:
        try:
            await asyncio.shield(runtime.redis.delete(key))
        except Exception:  # the key expires by itself
            pass


async def reap(runtime: Runtime) -> None:
    """Give every job whose lease lapsed back to the queue (or end it, if arq has lost it)."""
    for job_id in await runtime.jobs.lapsed():
        if job_id in runtime.supervisor.running:
            continue  # ours: the renewal above raced the clock; the next one will catch up
        outcome = await runtime.jobs.reclaim(job_id)
        if outcome in ("requeued", "lost"):
            fields = {"job": job_id, "worker": runtime.worker_id, "event": "reclaimed", "outcome": outcome}
            logger.warning("job %s: its worker stopped renewing its lease; %s", job_id, outcome, extra=fields)
        if outcome == "lost":
            metrics.JOBS.labels(ERROR).inc()
