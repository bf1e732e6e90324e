"""Cancellation of running jobs, requested from any process.

A cancel request sets the job's cancel flag and publishes its id on one channel (see
``shared.jobstream``). Each worker listens on that channel and cancels the task of a job it runs, at
once. Pub/sub can miss a message while the connection is down, so the listener also checks the flags
of its running jobs every ``SWEEP_S`` seconds; and a job checks its flag when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from shared import keys

logger = logging.getLogger(__name__)

SWEEP_S = 1.0


class Cancellations:
    """Which jobs this worker runs, and which of them were asked to stop."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._running: dict[str, asyncio.Task[object]] = {}
        self._requested: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> list[str]:
        return list(self._running)

    def register(self, job_id: str, task: asyncio.Task[object]) -> None:
        self._running[job_id] = task

    def unregister(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._requested.discard(job_id)

    def requested(self, job_id: str) -> bool:
        """Whether this job's cancellation came from a cancel request (not from a shutdown)."""
        return job_id in self._requested

    def _cancel(self, job_id: str) -> None:
        task = self._running.get(job_id)
        if task is not None and job_id not in self._requested:
            logger.info("job %s: cancel requested", job_id)
            self._requested.add(job_id)
            task.cancel()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._sweep())]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.CANCEL_CHANNEL)
                    delay = 0.05
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                        if message and message.get("type") == "message":
                            self._cancel(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("cancel listener lost Redis (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            job_ids = list(self._running)
            if not job_ids:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for job_id in job_ids:
                        pipe.exists(keys.cancel_flag(job_id))
                    flags = await pipe.execute()
            except Exception as exc:
                logger.warning("cancel sweep failed: %s", exc)
                continue
            for job_id, flagged in zip(job_ids, flags, strict=True):
                if flagged:
                    self._cancel(job_id)
