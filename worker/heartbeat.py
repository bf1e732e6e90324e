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
                await runtime.redis.set(key, jsonutil.dumps(record), ex=WORKER_TTL_S)
                await reap(runtime)
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)
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
            logger.warning("job %s: its worker stopped renewing its lease; %s", job_id, outcome)
