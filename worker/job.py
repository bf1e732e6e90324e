"""The job function: one attempt of one generation, from the upstream socket to the job stream.

    started -> delta, delta, ... -> done | error | cancelled

Each upstream SSE data event becomes one ``delta`` entry holding the event's bytes (compacted, not
re-serialized); the chunk is parsed once, for the accumulator that builds the result written with
``done``. The terminal event goes through ``JobStream.end``, which appends it only if the stream has
none yet and this attempt still owns the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shared import jsonutil, keys
from shared.accumulate import accumulator_for
from shared.jobstream import DeltaEncoder
from shared.models import CANCELLED, DONE, ERROR, RETRY, make_error

from .runtime import Runtime
from .upstream import UpstreamError, UpstreamStreamError, stream_error
from .writer import BACKLOG_LIMIT

logger = logging.getLogger(__name__)

DONE_MARKER = b"[DONE]"


async def generate(ctx: dict[str, Any], *, endpoint: str, request: dict[str, Any]) -> None:
    """arq job function: run one attempt of the generation ``ctx["job_id"]``."""
    runtime: Runtime = ctx["runtime"]
    await Attempt(runtime, ctx["job_id"], ctx["job_try"], endpoint, request).run()


class Fenced(Exception):
    """A newer attempt or the terminal event is in the stream: this attempt must stop writing."""


class Attempt:
    def __init__(
        self, runtime: Runtime, job_id: str, attempt: int, endpoint: str, request: dict[str, Any]
    ) -> None:
        self.runtime = runtime
        self.job_id = job_id
        self.attempt = attempt
        self.endpoint = endpoint
        self.request = request
        self.stream = keys.events(job_id)
        self.accumulator = accumulator_for(endpoint)
        self.deltas = 0
        self.pending: asyncio.Future[None] | None = None
        self.encoder: DeltaEncoder | None = None

    async def run(self) -> None:
        runtime, job_id = self.runtime, self.job_id
        started_id = await runtime.jobs.start(job_id, self.attempt)
        if started_id == "cancel":
            await runtime.jobs.end(job_id, CANCELLED, {"partial": None})
            logger.info("job %s: cancelled before attempt %d started", job_id, self.attempt)
            return
        if started_id in ("gone", "ended"):
            logger.info("job %s: attempt %d not started, the job has %s", job_id, self.attempt, started_id)
            return
        self.encoder = DeltaEncoder(self.attempt, started_id)
        task = asyncio.current_task()
        assert task is not None
        runtime.cancels.register(job_id, task)
        started = time.monotonic()
        logger.info("job %s: attempt %d started on %s", job_id, self.attempt, runtime.worker_id)
        try:
            kind, data = await self._stream()
            await self._drain()
        except asyncio.CancelledError:
            if not runtime.cancels.requested(job_id):
                # Shutdown: arq hands the job back to the queue and another attempt follows.
                await asyncio.shield(self._announce_retry())
                raise
            task.uncancel()
            kind, data = CANCELLED, {"partial": self._partial()}
        except Fenced:
            logger.warning(
                "job %s: attempt %d fenced off by a newer attempt or the end", job_id, self.attempt
            )
            return
        finally:
            runtime.cancels.unregister(job_id)
            runtime.writer.fenced.discard(self.stream)
        await self._drain()
        ended = await runtime.jobs.end(job_id, kind, data, started_id=started_id)
        logger.info(
            "job %s: %s after %d deltas in %.3fs (attempt %d)",
            job_id,
            kind if ended else f"{kind} not written (the job had ended or moved on)",
            self.deltas,
            time.monotonic() - started,
            self.attempt,
        )

    async def _stream(self) -> tuple[str, dict[str, Any]]:
        writer, encoder, stream = self.runtime.writer, self.encoder, self.stream
        assert encoder is not None
        failure: UpstreamError | None = None
        try:
            async with self.runtime.upstream.open(self.endpoint, self.request) as events:
                async for event in events:
                    if event.data == DONE_MARKER:
                        break
                    try:
                        chunk = jsonutil.loads(event.data)
                    except ValueError:
                        raise UpstreamStreamError(
                            make_error("upstream_error", "the upstream sent data that is not JSON")
                        ) from None
                    self.pending = writer.append(stream, *encoder.delta(event.data))
                    self.deltas += 1
                    self.accumulator.add(chunk, event.event)
                    # An error inside the stream is final, but what the upstream sends after it
                    # (OpenAI's response.failed) is still published: the job ends when the stream does.
                    failure = failure or stream_error(event, chunk)
                    if stream in writer.fenced:
                        raise Fenced
                    if writer.backlog > BACKLOG_LIMIT:
                        await self.pending
        except UpstreamError as exc:
            failure = failure or exc
        if failure is not None:
            return ERROR, {"error": failure.error, "partial": self._partial()}
        return DONE, {"result": self.accumulator.result()}

    def _partial(self) -> Any:
        return self.accumulator.result() if self.deltas else None

    async def _drain(self) -> None:
        """Wait until this attempt's deltas are in Redis, so the terminal event lands after them."""
        if self.pending is not None:
            await self.pending
        if self.stream in self.runtime.writer.fenced:
            raise Fenced

    async def _announce_retry(self) -> None:
        assert self.encoder is not None
        error = make_error("worker_lost", "the worker shut down; the job goes back to the queue")
        retry = self.encoder.event(RETRY, {"attempt": self.attempt, "error": error, "delay_s": 0})
        # Batches are written in order: once this one is in, so are the deltas before it.
        await self.runtime.writer.append(self.stream, *retry)
