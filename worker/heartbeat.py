"""Liveness: this worker's heartbeat, the leases of the jobs it holds, the reaping of lapsed ones, and
the sweep for orphaned streams.

Every ``lease_seconds / 5`` a worker renews the leases of the jobs it holds (from the moment it claims
them) and gives back to the queue any job whose lease has lapsed: its worker died (SIGKILL, OOM, a
lost machine). So a job runs again a few seconds after its worker is gone, whatever it was doing.

Every ``orphan_sweep_seconds`` one worker of the fleet looks through the stream store for streams that
have not ended and have not moved for a whole period, and asks the queue about their jobs: a job the
queue does not know at all was lost with the queue's data (see ``shared.store``), and nothing else
would ever end its stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from shared import jsonutil
from shared.models import ERROR, make_error
from shared.store import parse_id

from . import metrics
from .health import Probe
from .runtime import Runtime

logger = logging.getLogger(__name__)

WORKER_TTL_S = 10


async def beat(runtime: Runtime, held: Callable[[], list[str]]) -> None:
    """Run until cancelled; remove this worker's record on the way out.

    :param held: the jobs this worker holds (the arq worker's claimed jobs).
    """
    lease_ms = int(runtime.settings.lease_seconds * 1000)
    interval = runtime.settings.lease_seconds / 5
    started = time.time()
    try:
        while True:
            holding = held()
            record = {
                "id": runtime.worker_id,
                "pid": os.getpid(),
                "started": started,
                "running": holding,
                "entries_written": runtime.writer.entries_written,
            }
            try:
                depth, fleet_held = await runtime.queue.beat(
                    runtime.worker_id, record, ttl_s=WORKER_TTL_S, held=holding, lease_ms=lease_ms
                )
                runtime.redis_seen = time.monotonic()
                metrics.QUEUE_DEPTH.set(depth)
                metrics.FLEET_RUNNING.set(fleet_held)
                metrics.RUNNING_JOBS.set(len(holding))  # the list the heartbeat reports to `status`
                await reap(runtime, holding)
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)
            runtime.beat_at = time.monotonic()
            await asyncio.sleep(interval)
    finally:
        try:
            await asyncio.shield(runtime.queue.forget_worker(runtime.worker_id))
        except Exception:  # the record expires by itself
            pass


async def reap(runtime: Runtime, holding: list[str]) -> None:
    """Give every job whose lease lapsed back to the queue (or end it, if arq has lost it)."""
    queue, streams = runtime.queue, runtime.streams
    for job_id in await queue.lapsed():
        if job_id in holding:
            continue  # ours: the renewal above raced the clock; the next one will catch up
        owner = await streams.owner(job_id)  # before the requeue: a new attempt may start right after it
        outcome = await queue.requeue_lapsed(job_id)
        if outcome == "requeued":
            outcome = f"requeued, attempt {await streams.void(job_id, owner)}"
        elif outcome == "lost":
            error = make_error("worker_lost", "the worker running this job stopped renewing its lease")
            await runtime.end(job_id, ERROR, {"error": error, "partial": None})
            await queue.finish(job_id, again_at_ms=None)  # after the end: the queue lets go last
        else:
            continue
        fields = {"job": job_id, "worker": runtime.worker_id, "event": "reclaimed", "outcome": outcome}
        logger.warning("job %s: its worker stopped renewing its lease; %s", job_id, outcome, extra=fields)


async def sweep_orphans(runtime: Runtime) -> None:
    """Run until cancelled: every ``orphan_sweep_seconds``, one worker of the fleet ends the streams
    whose jobs the queue lost."""
    period = runtime.settings.orphan_sweep_seconds
    while True:
        await asyncio.sleep(period)
        try:
            if await runtime.queue.take_sweep(runtime.worker_id, for_ms=int(period * 1000)):
                ended = await end_orphans(runtime, still_for_ms=int(period * 1000))
                if ended:
                    logger.warning("orphan sweep: ended %d jobs the queue had lost", ended)
        except Exception as exc:
            logger.warning("orphan sweep failed: %s", exc)


async def end_orphans(runtime: Runtime, *, still_for_ms: int) -> int:
    """End every stream that has not ended, has not moved for ``still_for_ms``, and whose job the queue
    does not know; return how many."""
    queue, streams = runtime.queue, runtime.streams
    cursor, ended = 0, 0
    while True:
        cursor, open_jobs = await streams.scan_open(cursor)
        before = time.time() * 1000 - still_for_ms
        still = [job_id for job_id, last_id in open_jobs if parse_id(last_id)[0] < before]
        if still:
            for job_id, known in zip(still, await queue.known(still), strict=True):
                if known:
                    continue
                message = "the queue lost this job (its Redis restarted without its data, or failed over)"
                error = make_error("internal", message)
                if await runtime.end(job_id, ERROR, {"error": error, "partial": None}):
                    ended += 1
                    fields = {"job": job_id, "worker": runtime.worker_id, "event": ERROR, "error_type": "internal"}
                    logger.warning("job %s: error (%s)", job_id, message, extra=fields)
        if cursor == 0:
            return ended


MODELS_EVERY_S = 300
MODELS_TTL_S = 900


async def publish_models(runtime: Runtime) -> None:
    """Run until cancelled: every ``MODELS_EVERY_S``, put the upstream's model list where the gateways
    read it (``/v1/models``); the gateways hold no upstream key, the workers do."""
    while True:
        models = await runtime.upstream.models()
        if models is not None:
            try:
                await runtime.queue.set_models(models, ttl_s=MODELS_TTL_S)
            except Exception as exc:
                logger.warning("could not keep the upstream's model list: %s", exc)
        await asyncio.sleep(MODELS_EVERY_S)


async def report_status(runtime: Runtime, probes: tuple[Probe, Probe], path: str) -> None:
    """Run until cancelled: a pool's child writes its probes for the pool's own (``worker.pool``)."""
    live, ready = probes
    target = Path(path)
    while True:
        record = {"live": live()[0], "ready": ready()[0], "at": time.time(), "pid": os.getpid()}
        partial = target.with_suffix(".tmp")
        partial.write_bytes(jsonutil.dumps(record))
        partial.replace(target)  # readers never see half a file
        await asyncio.sleep(runtime.settings.lease_seconds / 5)
