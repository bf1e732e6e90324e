"""Running a worker process: arq's ``Worker``, built inside a running uvloop loop.

Delivery guarantee: every submitted job ends with exactly one terminal event, the last in its
stream, and a reader sees each upstream event of every attempt once, in order, with the attempts
that failed marked void by a ``retry`` event; an upstream request may run more than once (a retry,
or a worker lost mid-job), and nothing survives a Redis that restarts without persistence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvloop
from arq.worker import func

from shared import processes
from shared.models import ERROR, make_error
from shared.settings import Settings
from shared.store import Stores, Unavailable, open_stores, queue
from shared.store.queue import FencedWorker

from . import heartbeat
from .health import HealthServer, worker_probes
from .job import generate
from .runtime import Runtime

logger = logging.getLogger(__name__)

ARQ_MAX_TRIES = 1000
"""arq's own try limit, out of the way: the fleet bounds attempts itself (``max_attempts``), because
when arq's tries run out it never calls the job, and nothing would end the job's stream."""


def build_worker(runtime: Runtime, *, concurrency: int, burst: bool) -> FencedWorker:
    """arq's Worker (fenced: ``shared.store.queue``) from explicit keyword arguments; must run inside
    the loop it will use."""
    settings = runtime.settings
    # arq's own timeout must never fire first: the job's deadline (supervisor) ends it properly.
    arq_timeout = settings.job_deadline_seconds + 60

    def draining() -> None:
        runtime.draining = True  # not ready from now on (the probes)

    async def given_up(job_id: str, expired: bool) -> None:
        """arq will not run the job (expired in the queue, unreadable): its stream still ends."""
        if expired:
            error = make_error("timeout", "the job expired in the queue before a worker took it")
        else:
            error = make_error("internal", "the job could not be run: its queue entry is unreadable")
        if await runtime.end(job_id, ERROR, {"error": error, "partial": None}):
            fields = {"job": job_id, "worker": runtime.worker_id, "event": ERROR, "error_type": error["type"]}
            logger.warning("job %s: error (%s)", job_id, error["message"], extra=fields)

    return FencedWorker(
        runtime.queue,
        lease_ms=int(settings.lease_seconds * 1000),
        wake=runtime.supervisor.wake,
        poll_delay_s=settings.poll_delay_seconds,
        on_signal=draining,
        on_given_up=given_up,
        functions=[func(generate, name=queue.FUNCTION, timeout=arq_timeout, max_tries=ARQ_MAX_TRIES)],
        burst=burst,
        max_jobs=concurrency,
        job_timeout=arq_timeout,
        max_tries=ARQ_MAX_TRIES,
        keep_result=0,  # results live in the job stream, not in arq
        allow_abort_jobs=False,  # cancellation is ours: see worker.supervisor
        handle_signals=True,
        job_completion_wait=int(settings.shutdown_grace_seconds),
        job_serializer=queue.serialize,
        job_deserializer=queue.deserialize,
        ctx={"runtime": runtime},
        log_results=False,
    )


async def _reachable(stores: Stores) -> None:
    """Wait for both roles' Redis, with backoff: a worker started while Redis restarts or the queue
    fails over waits for it (not ready meanwhile) instead of exiting."""
    delay = 0.1
    while True:
        try:
            await stores.queue.ping()
            await stores.streams.ping()
            return
        except Unavailable as exc:
            logger.warning("Redis is not reachable yet (%s); trying again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _check_eviction_policy(stores: Stores) -> None:
    """A Redis that evicts keys loses jobs and streams: say so at start."""
    for role, policy in (await stores.eviction_policies()).items():
        if policy not in (None, "noeviction"):
            logger.warning(
                "the %s's Redis maxmemory-policy is %s: under memory pressure it will evict jobs and streams; "
                "set it to noeviction",
                role,
                policy,
            )


async def serve(
    settings: Settings,
    *,
    concurrency: int | None = None,
    burst: bool = False,
    metrics_port: int | None = None,
    status_file: str | None = None,
) -> None:
    """Run one worker until it is signalled (or, with ``burst``, until the queue is empty).

    :param metrics_port: serve ``/metrics``, ``/livez`` and ``/readyz`` there (``worker.health``).
    :param status_file: write the probes there every heartbeat (a pool's child: ``worker.pool``).
    """
    if concurrency is not None:  # --concurrency: everything sized by it (the upstream's keep-alive pool) follows
        settings = settings.model_copy(update={"concurrency": concurrency})
    stores = await open_stores(settings, name="streamfleet-worker")
    runtime = Runtime.create(settings, stores)
    worker = build_worker(runtime, concurrency=settings.concurrency, burst=burst)
    await _reachable(stores)
    await _check_eviction_policy(stores)
    runtime.supervisor.start(runtime.tasks)
    runtime.tasks.start("heartbeat", lambda: heartbeat.beat(runtime, lambda: worker.held))
    runtime.tasks.start("orphan sweep", lambda: heartbeat.sweep_orphans(runtime))
    runtime.tasks.start("model list", lambda: heartbeat.publish_models(runtime))
    probes = worker_probes(runtime)
    health = HealthServer(*probes, processes.exposition)
    if status_file is not None:
        runtime.tasks.start("pool status", lambda: heartbeat.report_status(runtime, probes, status_file))
    if metrics_port is not None:
        await health.start(settings.metrics_host, metrics_port)
    processes.settle_garbage_collector()
    logger.info("worker %s: taking jobs (concurrency %d)", runtime.worker_id, worker.max_jobs)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
        # arq's own bookkeeping of the jobs it just cancelled must reach Redis before we close it.
        if worker.tasks:
            await asyncio.wait(list(worker.tasks.values()), timeout=5)
    finally:
        await health.aclose()
        await runtime.aclose()
        await stores.aclose()
        logger.info("worker %s: stopped", runtime.worker_id)


def run(
    settings: Settings,
    *,
    concurrency: int | None = None,
    burst: bool = False,
    metrics_port: int | None = None,
    status_file: str | None = None,
) -> None:
    """Entry point: a uvloop event loop running ``serve``."""
    # arq logs each job's arguments at INFO, and they are request bodies: keep arq to warnings.
    logging.getLogger("arq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the job lines
    uvloop.run(
        serve(settings, concurrency=concurrency, burst=burst, metrics_port=metrics_port, status_file=status_file)
    )
