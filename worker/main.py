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
from signal import Signals
from typing import Any

import uvloop
from arq.connections import ArqRedis
from arq.worker import Worker, func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import connection, keys, queue
from shared.models import ERROR, make_error
from shared.settings import Settings

from . import heartbeat, metrics
from .health import HealthServer
from .job import generate
from .runtime import Runtime

logger = logging.getLogger(__name__)

ARQ_MAX_TRIES = 1000
"""arq's own try limit, out of the way: the fleet bounds attempts itself (``max_attempts``), because
when arq's tries run out it never calls the job, and nothing would end the job's stream."""


class FleetWorker(Worker):
    """arq's Worker, with what arq leaves to its user.

    - An idle worker takes a job the moment it is submitted: the submit publishes on a channel that
      wakes it, where arq alone would find the job at its next poll (every 0.5 s by default).
    - A job arq gives up on without calling the job function (expired in the queue, unreadable
      payload) still gets its terminal ``error`` event.
    - A Redis that blinks does not kill the poll loop: it waits and polls again.
    """

    def __init__(self, runtime: Runtime, **kwargs: Any) -> None:
        self.runtime = runtime
        super().__init__(**kwargs)
        self._poll_failures = 0

    async def _poll_iteration(self) -> None:
        wake = self.runtime.supervisor.wake
        wake.clear()  # before looking at the queue: a submit from now on sets it again
        started = self._jobs_started()
        try:
            await super()._poll_iteration()
            self._poll_failures = 0
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._poll_failures += 1
            delay = min(0.05 * 2**self._poll_failures, 2.0)
            logger.warning("polling the queue failed (%s); again in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            return
        if self._jobs_started() == started and not self.burst:
            # Nothing taken: sleep until a submit (or a free slot) wakes us, or the poll interval passes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.runtime.settings.poll_delay_seconds)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim the batch in one script call (``JobStream.claim``) and start what was taken; arq
        claims one job at a time, four round trips each, and two workers collide on every job."""
        free = self.max_jobs - self.job_counter
        if free <= 0 or not job_ids:
            return
        wanted = [job_id.decode() for job_id in job_ids[:free]]
        taken = await self.runtime.jobs.claim(wanted, in_progress_ms=int(self.in_progress_timeout_s * 1000))
        for job_id, score in taken:
            await self.sem.acquire()  # arq's own bookkeeping of running jobs, as in its start_jobs
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self.runtime.draining = True  # not ready from now on (the probes)
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: Signals) -> None:
        self.runtime.draining = True
        super().handle_sig(signum)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        expired = not await self.pool.exists(keys.arq_job(job_id))
        await super().finish_failed_job(job_id, result_data)
        if expired:
            error = make_error("timeout", "the job expired in the queue before a worker took it")
        else:
            error = make_error("internal", "the job could not be run: its queue entry is unreadable")
        if await self.runtime.end(job_id, ERROR, {"error": error, "partial": None}):
            fields = {"job": job_id, "worker": self.runtime.worker_id, "event": ERROR, "error_type": error["type"]}
            logger.warning("job %s: error (%s)", job_id, error["message"], extra=fields)


def build_worker(runtime: Runtime, redis: ArqRedis, *, concurrency: int, burst: bool) -> Worker:
    """arq's Worker from explicit keyword arguments; must run inside the loop it will use."""
    settings = runtime.settings
    # arq's own timeout must never fire first: the job's deadline (supervisor) ends it properly.
    arq_timeout = settings.job_deadline_seconds + 60
    return FleetWorker(
        runtime,
        functions=[func(generate, name=queue.FUNCTION, timeout=arq_timeout, max_tries=ARQ_MAX_TRIES)],
        redis_pool=redis,
        burst=burst,
        max_jobs=concurrency,
        poll_delay=0,  # FleetWorker._poll_iteration does the waiting: woken by a submit, else polling
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


async def _check_eviction_policy(redis: ArqRedis) -> None:
    """A queue that evicts keys loses jobs: say so at start."""
    try:
        policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
    except Exception:  # managed Redis often forbids CONFIG
        return
    if policy not in (None, "noeviction"):
        logger.warning(
            "Redis maxmemory-policy is %s: under memory pressure it will evict queued jobs and streams; "
            "set it to noeviction",
            policy,
        )


async def serve(
    settings: Settings, *, concurrency: int | None = None, burst: bool = False, metrics_port: int | None = None
) -> None:
    """Run one worker until it is signalled (or, with ``burst``, until the queue is empty).

    :param metrics_port: serve ``/metrics``, ``/livez`` and ``/readyz`` there (``worker.health``).
    """
    url = connection.resolve_url(settings)
    redis = ArqRedis(
        pool_or_conn=connection.pool(url, name="streamfleet-worker"),
        job_serializer=queue.serialize,
        job_deserializer=queue.deserialize,
    )
    runtime = Runtime.create(settings, redis)
    worker = build_worker(runtime, redis, concurrency=concurrency or settings.concurrency, burst=burst)
    await _check_eviction_policy(redis)
    runtime.supervisor.start()
    # Read at scrape time from the supervisor, the same list the heartbeat reports to `status`.
    metrics.RUNNING_JOBS.set_function(lambda: len(runtime.supervisor.running))
    beating = asyncio.create_task(heartbeat.beat(runtime))
    health = HealthServer(runtime)
    if metrics_port is not None:
        await health.start(settings.metrics_host, metrics_port)
    logger.info("worker %s: taking jobs (concurrency %d)", runtime.worker_id, worker.max_jobs)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
        # arq's own bookkeeping of the jobs it just cancelled must reach Redis before we close it.
        if worker.tasks:
            await asyncio.wait(list(worker.tasks.values()), timeout=5)
    finally:
        await health.aclose()
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await runtime.aclose()
        await redis.aclose()
        await redis.connection_pool.disconnect()
        logger.info("worker %s: stopped", runtime.worker_id)


def run(
    settings: Settings, *, concurrency: int | None = None, burst: bool = False, metrics_port: int | None = None
) -> None:
    """Entry point: a uvloop event loop running ``serve``."""
    # arq logs each job's arguments at INFO, and they are request bodies: keep arq to warnings.
    logging.getLogger("arq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the job lines
    uvloop.run(serve(settings, concurrency=concurrency, burst=burst, metrics_port=metrics_port))
