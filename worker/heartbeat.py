"""A live worker's heartbeat: a key that names the worker and its running jobs, refreshed while it lives."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from shared import jsonutil, keys

from .runtime import Runtime

logger = logging.getLogger(__name__)

INTERVAL_S = 2.0
TTL_S = 10


async def beat(runtime: Runtime) -> None:
    """Refresh this worker's key every ``INTERVAL_S`` until cancelled; remove it on the way out."""
    key = keys.worker(runtime.worker_id)
    started = time.time()
    try:
        while True:
            record = {
                "id": runtime.worker_id,
                "pid": os.getpid(),
                "started": started,
                "running": runtime.cancels.running,
                "entries_written": runtime.writer.entries_written,
            }
            try:
                await runtime.redis.set(key, jsonutil.dumps(record), ex=TTL_S)
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(INTERVAL_S)
    finally:
        try:
            await asyncio.shield(runtime.redis.delete(key))
        except Exception:  # the key expires by itself
            pass
