"""Running a worker process: arq's ``Worker``, built inside a running uvloop loop.

Delivery guarantee: every job's stream ends with exactly one terminal event, and a consumer that reads
it to the end sees each upstream event of the attempt that finished once, in upstream order; what is
not promised is that an upstream request runs only once (arq is at-least-once, so a job whose worker
dies or shuts down runs again as a new, announced attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvloop
from arq.connections import ArqRedis
from arq.worker import Worker, func

from shared import connection, queue
from shared.settings import Settings

from . import heartbeat
from .job import generate
from .runtime import Runtime

logger = logging.getLogger(__name__)


def build_worker(runtime: Runtime, redis: ArqRedis, *, concurrency: int, burst: bool) -> Worker:
    """arq's Worker from explicit keyword arguments; must run inside the loop it will use."""
    settings = runtime.settings
    return Worker(
        functions=[func(generate, name=queue.FUNCTION, timeout=settings.job_timeout_seconds, max_tries=3)],
        redis_pool=redis,
        burst=burst,
        max_jobs=concurrency,
        poll_delay=settings.poll_delay_seconds,
        job_timeout=settings.job_timeout_seconds,
        keep_result=0,  # results live in the job stream, not in arq
        allow_abort_jobs=False,  # cancellation is ours: see worker.cancel
        handle_signals=True,
        job_serializer=queue.serialize,
        job_deserializer=queue.deserialize,
        ctx={"runtime": runtime},
        log_results=False,
    )


async def serve(settings: Settings, *, concurrency: int | None = None, burst: bool = False) -> None:
    """Run one worker until it is signalled (or, with ``burst``, until the queue is empty)."""
    url = connection.resolve_url(settings)
    redis = ArqRedis(
        pool_or_conn=connection.pool(url),
        job_serializer=queue.serialize,
        job_deserializer=queue.deserialize,
    )
    runtime = Runtime.create(settings, redis)
    worker = build_worker(runtime, redis, concurrency=concurrency or settings.concurrency, burst=burst)
    runtime.cancels.start()
    beating = asyncio.create_task(heartbeat.beat(runtime))
    logger.info("worker %s: taking jobs (concurrency %d)", runtime.worker_id, worker.max_jobs)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await runtime.aclose()
        await redis.aclose()
        await redis.connection_pool.disconnect()
        logger.info("worker %s: stopped", runtime.worker_id)


def run(settings: Settings, *, concurrency: int | None = None, burst: bool = False) -> None:
    """Entry point: a uvloop event loop running ``serve``."""
    # arq logs each job's arguments at INFO, and they are request bodies: keep arq to warnings.
    logging.getLogger("arq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the job lines
    uvloop.run(serve(settings, concurrency=concurrency, burst=burst))
