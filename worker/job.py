"""The job function: a generation from the upstream socket to the job stream, attempt by attempt.

    started(1) -> delta... -> retry(1) -> started(2) -> delta... -> done | error | cancelled

Each upstream SSE data event becomes one ``delta`` entry holding the event's bytes (compacted, never
re-serialized); the chunk is parsed once, for the accumulator that builds the result. A retryable
failure (connect error, 408/409/429/5xx, a stream cut or stalled) ends the attempt with a ``retry``
event and, after a backoff with jitter (or the upstream's ``Retry-After``), a new attempt; anything
else is final. The terminal event goes through ``JobStream.end``, which appends it only if the
stream has none yet and this attempt still owns the job.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from arq.worker import Retry as ArqRetry

from shared import jsonutil
from shared.accumulate import Accumulator, accumulator_for
from shared.models import CANCELLED, DONE, ERROR, RETRY, Error, make_error, queued_data
from shared.store import DeltaEncoder, OutOfMemory, Start, Unavailable, stream_ttl_while_queued

from . import metrics, supervisor
from .runtime import Runtime
from .upstream import (
    DONE_MARKER,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamStreamError,
    UpstreamTimeout,
    scrub,
    stream_error,
)
from .writer import BACKLOG_LIMIT

logger = logging.getLogger(__name__)

INTER_TOKEN_SAMPLE = 31
"""``streamfleet_inter_token_seconds`` observes one gap in 32 (deltas & 31 == 0): a histogram takes a
lock and searches its buckets: 3-6 % of the worker's CPU at 2,000 streams, observing one gap in 8."""


async def generate(ctx: dict[str, Any], *, endpoint: str, request: dict[str, Any], tenant: str | None = None) -> None:
    """arq job function: run the generation ``ctx["job_id"]`` to its terminal event.

    When Redis cannot be reached the job goes back to arq's queue (``Retry``) instead of failing,
    since arq drops a job whose function raised; its next attempt is announced as usual.
    """
    runtime: Runtime = ctx["runtime"]
    job_id = ctx["job_id"]
    fields = {"job": job_id, "worker": runtime.worker_id}
    if runtime.settings.claim_pause_seconds:
        await asyncio.sleep(runtime.settings.claim_pause_seconds)  # tests: a window between claim and start
    job = Job(runtime, job_id, endpoint, request, tenant=tenant, enqueued=ctx["enqueue_time"].timestamp())
    try:
        await job.run()
    except Unavailable as exc:
        logger.warning("job %s: Redis unreachable (%s); back to the queue", job_id, exc, extra=fields)
        raise ArqRetry(defer=1) from exc
    except Exception as exc:  # a bug: the job still gets its one terminal event
        logger.exception("job %s: internal error", job_id, extra=fields)
        error = make_error("internal", f"the worker failed: {type(exc).__name__}")
        await runtime.end(job_id, ERROR, {"error": error, "partial": None})


class Fenced(Exception):
    """A newer attempt or the terminal event is in the stream: this attempt must stop writing."""


class Full(Exception):
    """Redis had no memory for an entry of this attempt."""


class Job:
    def __init__(
        self,
        runtime: Runtime,
        job_id: str,
        endpoint: str,
        request: dict[str, Any],
        *,
        tenant: str | None,
        enqueued: float,
    ) -> None:
        self.runtime = runtime
        self.tenant = tenant
        self.enqueued = enqueued  # wall clock (s) of the submit
        self.settings = runtime.settings
        self.job_id = job_id
        self.endpoint = endpoint
        self.request = request
        # The current attempt; reset by each start.
        self.start: Start | None = None
        self.encoder: DeltaEncoder | None = None
        self.accumulator: Accumulator | None = None
        self.deltas = 0
        self.pending: asyncio.Future[None] | None = None
        self.first_token_s: float | None = None
        self.queue_wait_s: float | None = None

    def log(self, level: int, message: str, *args: Any, **fields: Any) -> None:
        """One log line about this job; in JSON logs ``fields`` become keys beside job, attempt and worker."""
        if not logger.isEnabledFor(level):
            return
        attempt = self.start.attempt if self.start is not None else None
        extra = {"job": self.job_id, "attempt": attempt, "worker": self.runtime.worker_id, **fields}
        logger.log(level, "job %s: " + message, self.job_id, *args, extra=extra)

    async def run(self) -> None:
        runtime = self.runtime
        task = asyncio.current_task()
        assert task is not None
        watch = runtime.supervisor.watch(self.job_id, task)
        began = time.monotonic()
        delay = 0.0
        try:
            while True:
                try:
                    if delay:
                        watch.waiting()
                        await asyncio.sleep(delay)
                    if not await self._start():
                        return
                    watch.streaming(self.settings.first_byte_timeout_seconds)
                    kind, data = await self._stream(watch)
                except asyncio.CancelledError:
                    reason = watch.take_reason()
                    if reason is None:  # shutdown: arq hands the job back and another attempt follows
                        await asyncio.shield(self._hand_back())
                        raise
                    task.uncancel()
                    if reason == supervisor.CANCEL:
                        kind, data = CANCELLED, {"partial": self._partial()}
                    elif reason == supervisor.DEADLINE:
                        deadline = self.settings.job_deadline_seconds
                        error = make_error("timeout", f"the job passed its {deadline:g} s deadline (job deadline)")
                        kind, data = ERROR, {"error": error, "partial": self._partial()}
                    else:
                        failure = self._timeout(reason)
                        metrics.UPSTREAM_ERRORS.labels(failure.error["type"]).inc()
                        kind, data = ERROR, {"error": failure.error, "partial": self._partial()}
                        retry = await self._retry_or_not(failure)
                        if retry is not None:
                            delay = retry
                            continue
                except UpstreamError as failure:
                    metrics.UPSTREAM_ERRORS.labels(failure.error["type"]).inc()
                    kind, data = ERROR, {"error": failure.error, "partial": self._partial()}
                    if failure.retryable:
                        retry = await self._retry_or_not(failure)
                        if retry is not None:
                            delay = retry
                            continue
                except (Full, OutOfMemory) as full:
                    # Redis has no memory for this job's events: it ends now (its end is written even
                    # so), with what it streamed so far. Not a lost worker, not a retry.
                    if isinstance(full, OutOfMemory):
                        runtime.writer.storage_full()
                    message = "Redis is out of memory (maxmemory reached): the job's events could not be written"
                    kind, data = ERROR, {"error": make_error("storage_full", message), "partial": self._partial()}
                runtime.supervisor.release(self.job_id)  # nothing may interrupt the terminal write
                await self._end(kind, data, began)
                return
        except Fenced:
            self.log(logging.WARNING, "attempt fenced off by a newer attempt or the job's end", event="fenced")
        finally:
            runtime.supervisor.release(self.job_id)

    async def _start(self) -> bool:
        """Open the next attempt; False when the job must not run (it has ended, or is cancelled)."""
        start = await self.runtime.streams.start(
            self.job_id,
            queued_data(self.job_id, self.endpoint, self.request),
            tenant=self.tenant,
            ttl_seconds=stream_ttl_while_queued(self.settings),
            max_attempts=self.settings.max_attempts,
        )
        if start.status == "started":
            self.start = start
            self.encoder = DeltaEncoder(self.job_id, start.attempt, start.started_id)
            self.accumulator = accumulator_for(self.endpoint)
            self.deltas = 0
            self.pending = None
            self.first_token_s = None
            metrics.ATTEMPTS.inc()
            if start.attempt == 1:
                self.queue_wait_s = max(0.0, time.time() - self.enqueued)
                metrics.QUEUE_WAIT.observe(self.queue_wait_s)
            # At DEBUG: the job's one line at INFO is its end, which repeats what this one says.
            self.log(logging.DEBUG, "attempt %d started on %s", start.attempt, self.runtime.worker_id, event="started")
            return True
        runtime = self.runtime
        if start.status == "cancel":
            await runtime.end(self.job_id, CANCELLED, {"partial": None})
            self.log(logging.INFO, "cancelled before it started", event=CANCELLED)
        elif start.status == "exhausted":
            error = await self._last_retry_error()
            await runtime.end(self.job_id, ERROR, {"error": error, "partial": None})
            self.log(logging.INFO, "error, its %d attempts are spent", start.attempt - 1, event=ERROR)
        else:
            self.log(logging.INFO, "not started, the job has %s", start.status, event="skipped")
        return False

    async def _stream(self, watch: supervisor.Watch) -> tuple[str, dict[str, Any]]:
        writer, encoder, accumulator = self.runtime.writer, self.encoder, self.accumulator
        secrets = self.runtime.upstream.secrets
        secret_bytes = [secret.encode() for secret in secrets]
        assert encoder is not None and accumulator is not None
        limit = self.settings.max_stream_events
        in_stream_error: UpstreamError | None = None
        last = time.monotonic()
        metrics.OPEN_STREAMS.inc()
        try:
            async with self.runtime.upstream.open(self.endpoint, self.request) as events:
                async for event in events:
                    now = watch.last_event = time.monotonic()
                    if event.data == DONE_MARKER:
                        break
                    data = event.data
                    try:
                        chunk = jsonutil.loads(data)
                    except ValueError as exc:
                        message = f"the upstream sent data that is not JSON: {str(exc)[:100]}"
                        raise UpstreamStreamError(make_error("upstream_error", message)) from None
                    # An error inside the stream is final, but what the upstream sends after it
                    # (OpenAI's response.failed) is still published: the job ends when the stream does.
                    error = stream_error(event, chunk, secrets)
                    if error is not None:
                        in_stream_error = in_stream_error or error
                        clean = scrub(chunk, secrets)  # an error may echo credentials: never stored
                        if clean != chunk:
                            chunk, data = clean, jsonutil.dumps(clean)
                    elif secrets and any(secret in data for secret in secret_bytes):
                        chunk, data = scrub(chunk, secrets), jsonutil.dumps(scrub(chunk, secrets))
                    self.pending = writer.append(encoder, *encoder.delta(data))
                    if not self.deltas:
                        self.first_token_s = now - last
                        metrics.TIME_TO_FIRST_TOKEN.observe(self.first_token_s)
                    elif not self.deltas & INTER_TOKEN_SAMPLE:
                        metrics.INTER_TOKEN.observe(now - last)  # one gap in 32 (INTER_TOKEN_SAMPLE)
                    last = now
                    self.deltas += 1
                    accumulator.add(chunk, event.event)
                    if encoder.fenced:
                        raise Fenced
                    if encoder.full:
                        raise Full
                    if self.deltas >= limit:
                        raise UpstreamStreamError(
                            make_error("upstream_error", f"the upstream sent over {limit} events; the job was stopped")
                        )
                    if writer.backlog > BACKLOG_LIMIT:
                        await self.pending
        finally:
            metrics.OPEN_STREAMS.dec()
        if in_stream_error is not None:
            raise in_stream_error
        return DONE, {"result": accumulator.result()}

    def _timeout(self, reason: str) -> UpstreamTimeout:
        if reason == supervisor.FIRST_BYTE:
            seconds = self.settings.first_byte_timeout_seconds
            message = f"the upstream sent no event within {seconds:g} s (first byte timeout)"
        else:
            seconds = self.settings.idle_timeout_seconds
            message = f"the upstream went silent for {seconds:g} s mid-stream (idle timeout)"
        return UpstreamTimeout(make_error("timeout", message))

    def _partial(self) -> Any:
        return self.accumulator.result() if self.accumulator is not None and self.deltas else None

    async def _retry_or_not(self, failure: UpstreamError) -> float | None:
        """Announce a retry and return its delay, or None when the attempts are spent."""
        assert self.start is not None and self.encoder is not None
        if self.start.attempt >= self.settings.max_attempts:
            return None
        delay = self._backoff(failure)
        data = {"attempt": self.start.attempt, "error": failure.error, "delay_s": round(delay, 3)}
        # Batches are written in order: once the retry is in, so are the attempt's deltas.
        await self.runtime.writer.append(self.encoder, *self.encoder.event(RETRY, data))
        if self.encoder.fenced:
            raise Fenced
        if self.encoder.full:
            raise Full
        self.log(
            logging.INFO,
            "attempt %d failed (%s); retry in %.2fs",
            self.start.attempt,
            failure.error["message"],
            delay,
            event=RETRY,
            error_type=failure.error["type"],
            delay_s=round(delay, 3),
        )
        self.accumulator = None  # the void attempt's text is no one's partial result
        return delay

    def _backoff(self, failure: UpstreamError) -> float:
        assert self.start is not None
        if isinstance(failure, UpstreamHTTPError) and failure.retry_after is not None:
            return float(min(failure.retry_after, self.settings.job_deadline_seconds))
        exponential = self.settings.retry_base_seconds * 2 ** (self.start.attempt - 1)
        return float(min(self.settings.retry_max_seconds, exponential) * random.uniform(0.5, 1.0))

    async def _last_retry_error(self) -> Error:
        """The error of the last failed attempt, for a job whose attempts are spent."""
        streams = self.runtime.streams
        for entry in await streams.reader(self.job_id).decode(await streams.latest(self.job_id, 10)):
            if entry.type == RETRY:
                error: Error = entry.data["error"]
                return error
        return make_error("internal", "the job's attempts are spent")

    async def _end(self, kind: str, data: dict[str, Any], began: float) -> None:
        if self.pending is not None:
            await self.pending  # the deltas first, then the terminal event
        if self.encoder is not None and self.encoder.fenced:
            raise Fenced
        if self.start is not None:
            ended = await self.runtime.end(self.job_id, kind, data, started_id=self.start.started_id)
        else:  # no attempt started (Redis refused it): the stream may not even exist yet
            opening = (queued_data(self.job_id, self.endpoint, self.request), self.tenant)
            ended = await self.runtime.end(self.job_id, kind, data, opening=opening)
        elapsed = time.monotonic() - began
        timings = {"elapsed_s": round(elapsed, 4), "deltas": self.deltas}
        if self.queue_wait_s is not None:
            timings["queue_wait_s"] = round(self.queue_wait_s, 4)
        if self.first_token_s is not None:
            timings["ttft_s"] = round(self.first_token_s, 4)
        if kind == ERROR:
            timings["error_type"] = data["error"]["type"]
        self.log(
            logging.INFO,
            "%s after %d deltas in %.3fs",
            kind if ended else f"{kind} not written (the job had ended or moved on)",
            self.deltas,
            elapsed,
            event=kind if ended else "end_refused",
            **timings,
        )

    async def _hand_back(self) -> None:
        """Shutdown mid-job: announce the void attempt; arq then puts the job back in the queue, due
        now (``FencedWorker.finish_job``)."""
        if self.start is not None and self.encoder is not None and self.accumulator is not None:
            error = make_error("worker_lost", "the worker shut down; the job goes back to the queue")
            retry = self.encoder.event(RETRY, {"attempt": self.start.attempt, "error": error, "delay_s": 0})
            await self.runtime.writer.append(self.encoder, *retry)
        metrics.HANDED_BACK.inc()
        self.log(logging.INFO, "handed back to the queue", event="handed_back")
