"""The Python client: submit, tail, wait for the result, cancel, ask for status.

async with FleetClient() as fleet:
    job_id = await fleet.submit({"model": "gpt-4o-mini", "messages": [...]})
    async for event in fleet.tail(job_id):
        ...
    result = await fleet.result(job_id, timeout=60)
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from types import TracebackType
from typing import Any

from shared import jsonutil
from shared.errors import InvalidRequest, JobCancelled, JobFailed, StorageFull, StreamfleetError, UnknownJob
from shared.models import CANCELLED, DELTA, DONE, ERROR, QUEUED, RETRY, Event, Result, queued_data, validate_request
from shared.settings import Settings
from shared.store import (
    Entry,
    OutOfMemory,
    Stores,
    Unavailable,
    format_id,
    open_stores,
    parse_cursor,
    parse_id,
    queue,
    stream_ttl_while_queued,
)

from .fanout import FanOut, ReadFailed, SlowSubscriber, StreamGone

logger = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def check_job_id(job_id: str) -> None:
    """``UnknownJob`` for a string that cannot be a job id (before it reaches a key)."""
    if not _JOB_ID.fullmatch(job_id):
        raise UnknownJob(job_id)


READ_COUNT = 1000
TAIL_BLOCK_MS = 1000
"""How long the client's shared reader waits in one read: a tail that joins wakes it with a write,
which a full Redis refuses; that tail's events then start at the next read, within this."""


def status_of(last: Entry | Event) -> str:
    """A job's status from its last event."""
    if last.terminal:
        return last.type
    return "queued" if last.type == QUEUED else "running"


class FleetClient:
    """A connection to the fleet, for backend services.

    :param settings: the fleet's settings; read from the environment when omitted.
    :param name: the name its Redis connections carry (``CLIENT LIST``).
    :param max_connections: bound each connection pool (commands wait for a free connection).
    :param overrides: settings fields to override, e.g. ``redis_url="redis://..."``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        name: str = "streamfleet-client",
        max_connections: int | None = None,
        **overrides: Any,
    ) -> None:
        self.name = name
        self.max_connections = max_connections
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        self.settings = settings
        self._stores: Stores | None = None
        self._fanout: FanOut | None = None

    async def __aenter__(self) -> FleetClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Open the connection pools (starting the embedded server if that is the setting)."""
        if self._stores is None:
            self._stores = await open_stores(self.settings, name=self.name, max_connections=self.max_connections)

    async def aclose(self) -> None:
        if self._fanout is not None:
            await self._fanout.aclose()
            self._fanout = None
        if self._stores is not None:
            await self._stores.aclose()
            self._stores = None

    @property
    def stores(self) -> Stores:
        """The queue and the stream store (``shared.store``)."""
        if self._stores is None:
            raise StreamfleetError("the client is not connected: use 'async with FleetClient() as fleet'")
        return self._stores

    @property
    def fanout(self) -> FanOut:
        """The shared readers every live ``tail`` and ``wait`` of this client takes its events from:
        one blocked connection for all of them, however many jobs are followed (started on first use)."""
        return self.start_fanout()

    def start_fanout(
        self,
        *,
        readers: int = 1,
        ping_interval: float = 15.0,
        sent: Callable[[int], object] | None = None,
        block_ms: int = TAIL_BLOCK_MS,
    ) -> FanOut:
        """Start the client's shared readers with these options (``FanOut``), unless they run already;
        the gateway's are its own subscribers' as well. They stop with the client."""
        if self._fanout is None:
            self._fanout = FanOut(
                self.stores.streams, readers=readers, ping_interval=ping_interval, sent=sent, block_ms=block_ms
            )
            self._fanout.start()
        return self._fanout

    async def submit(
        self,
        request: dict[str, Any],
        *,
        endpoint: str = "chat.completions",
        idempotency_key: str | None = None,
        tenant: str | None = None,
    ) -> str:
        """Queue a generation; return its job id. Raises ``InvalidRequest`` before queuing anything.

        Two steps (``shared.store``): the job is queued, then its stream is opened; a crash between
        them loses nothing (a worker opens the stream when it starts the job).

        :param request: the OpenAI request body; fields the fleet does not know pass through.
        :param endpoint: ``"chat.completions"`` or ``"responses"``.
        :param idempotency_key: the same key returns the same job id and runs one job.
        :param tenant: who submits (the gateway's tenants); idempotency keys are per tenant.
        """
        validate_request(request, endpoint)
        size = len(jsonutil.dumps(request))
        if size > self.settings.max_request_bytes:
            raise InvalidRequest(
                f"the request is {size} bytes; the limit is {self.settings.max_request_bytes} "
                "(STREAMFLEET_MAX_REQUEST_BYTES)"
            )
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 256 and idempotency_key.isprintable()):
            raise InvalidRequest("an idempotency key must be 1 to 256 printable characters")
        stores = self.stores
        job_id = "job_" + uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        try:
            job_id, live = await stores.queue.enqueue(
                job_id,
                queue.payload(endpoint=endpoint, request=request, tenant=tenant, enqueue_time_ms=now_ms),
                score_ms=now_ms,
                idempotency_key=f"{tenant}:{idempotency_key}" if tenant and idempotency_key else idempotency_key,
            )
        except OutOfMemory:
            raise StorageFull("the queue's Redis refused the job; nothing was queued") from None
        if live:  # a job arq has let go of has ended: its stream is there, or has expired
            try:
                await stores.streams.create(
                    job_id,
                    queued_data(job_id, endpoint, request),
                    tenant=tenant,
                    ttl_seconds=stream_ttl_while_queued(self.settings),
                )
            except OutOfMemory:
                # Take the job back, so that it does not run for a caller told it failed. (A worker
                # that took it meanwhile ends it in storage_full.)
                await stores.queue.dequeue(job_id)
                raise StorageFull("the stream store's Redis refused the job's stream; it was not queued") from None
        logger.info("job %s: queued (%s)", job_id, endpoint)
        return job_id

    async def tenant_of(self, job_id: str) -> str | None:
        """The tenant that submitted the job through the gateway, if any."""
        return await self.stores.streams.tenant(job_id)

    async def last_event(self, job_id: str) -> Event:
        """The job's most recent event; raises ``UnknownJob``."""
        return (await self._last(job_id)).event()

    async def _last(self, job_id: str) -> Entry:
        check_job_id(job_id)
        last = await self.stores.streams.last(job_id)
        if last is None:
            raise UnknownJob(job_id)
        return last

    async def tail(self, job_id: str, *, after: str = "0") -> AsyncIterator[Event]:
        """Yield the job's events after ``after`` (from the start by default), live, until the
        terminal event. Raises ``UnknownJob`` at once for an id with no stream.

        A Redis connection that drops is reopened with backoff; reading resumes after the last
        event yielded, so nothing is missed or repeated. Deltas of an attempt already known to be
        void (its ``retry`` is in the same read) are left out; the ``retry`` itself is yielded.
        """
        position = parse_cursor(after)
        after = format_id(position)
        if position != (0, 0):  # from the start, the first read finds the job or its absence
            last = await self.last_event(job_id)
            if last.terminal and parse_id(last.id) <= position:
                return
        async with aclosing(self._follow(job_id, after)) as events:
            async for event in events:
                yield event

    async def _follow(self, job_id: str, after: str) -> AsyncGenerator[Event, None]:
        """``tail`` past its checks: the events after ``after``, live, until the terminal one.

        What exists already is read here, in batches, without waiting: a job with no stream is told
        at once, and deltas of an attempt known to be void in a batch are left out. The rest comes
        from the client's shared readers (``fanout``); a tail that falls too far behind them
        resumes after the last event it yielded, so nothing is missed or repeated.
        """
        streams = self.stores.streams
        reader = streams.reader(job_id)
        cursor = after
        delay = 0.05
        while True:
            try:
                entries = await reader.decode(await streams.range(job_id, cursor, count=READ_COUNT))
                if not entries and not await streams.exists(job_id):
                    raise UnknownJob(job_id)
            except Unavailable as exc:
                logger.warning("tail %s: Redis connection lost (%s); retrying in %.2fs", job_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            # Deltas of an attempt whose `retry` is already in hand are void: a reader catching up
            # never sees them. A live reader got them before the retry, which tells it to drop them.
            void = {entry.data["attempt"] for entry in entries if entry.type == RETRY}
            for entry in entries:
                cursor = entry.id
                if void and entry.type == DELTA and entry.attempt in void:
                    continue
                yield entry.event()
                if entry.terminal:
                    return
            if len(entries) < READ_COUNT:
                break  # caught up
        while True:
            try:
                async with aclosing(self.fanout.events(job_id, after=cursor)) as live:
                    async for found in live:
                        if found is None:
                            continue  # a ping: for connections that need them, not for a tail
                        cursor = found.id
                        yield found.event()
                        if found.terminal:
                            return
            except SlowSubscriber:
                continue
            except StreamGone:
                raise UnknownJob(job_id) from None  # its retention time passed while it was followed
            except ReadFailed:
                raise StreamfleetError(f"job {job_id}'s events cannot be read") from None

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Event:
        """Wait for the job's terminal event and return it; ``TimeoutError`` after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                last = await self.last_event(job_id)
                if last.terminal:
                    return last
                async with aclosing(self._follow(job_id, last.id)) as events:  # `last` says it exists
                    async for event in events:
                        if event.terminal:
                            return event
        except TimeoutError:
            raise TimeoutError(f"job {job_id} did not end within {timeout} s") from None
        raise UnknownJob(job_id)  # the stream ended without a terminal event: it expired

    async def result(self, job_id: str, *, timeout: float | None = None) -> Result:
        """The ``Result`` of a ``done`` job, waiting for it to end.

        Raises ``JobFailed`` or ``JobCancelled`` (carrying the terminal event's data) when the job
        did not end in ``done``, ``TimeoutError`` after ``timeout`` seconds, ``UnknownJob`` at once.
        """
        event = await self.wait(job_id, timeout=timeout)
        if event.type == DONE:
            result: Result = event.data["result"]
            return result
        if event.type == ERROR:
            raise JobFailed(job_id, event.data)
        raise JobCancelled(job_id, event.data)

    async def cancel(self, job_id: str) -> str:
        """Cancel the job; idempotent. Returns at once; ``cancelled`` follows on the stream.

        :returns: ``"cancelled"`` (it was still queued and has ended), ``"signalled"`` (its worker
            ends it now) or ``"ended"`` (it had already ended).
        """
        check_job_id(job_id)
        stores = self.stores
        outcome = await stores.streams.cancel(job_id)
        if outcome == "unknown":
            raise UnknownJob(job_id)
        if outcome == "cancelled":
            await stores.queue.dequeue(job_id)  # after `cancelled`: the queue holds a job until it has ended
        elif outcome == "signal":
            await stores.queue.publish_cancel(job_id)
            outcome = "signalled"
        logger.info("job %s: cancel %s", job_id, outcome)
        return outcome

    async def status(self, job_id: str | None = None) -> dict[str, Any]:
        """A job's status (``{"id", "status", "result"?, "error"?}``), or the fleet's without an id:
        queue depth, running jobs, live workers (from their heartbeats) each with its running jobs,
        and the latest jobs that ended in error, newest first."""
        if job_id is not None:
            last = await self.last_event(job_id)
            status: dict[str, Any] = {"id": job_id, "status": status_of(last)}
            if last.type == DONE:
                status["result"] = last.data["result"]
            elif last.type == ERROR:
                status["error"] = last.data["error"]
            elif last.type == CANCELLED:
                status["partial"] = last.data.get("partial")
            return status
        queue = self.stores.queue
        workers = await queue.workers()
        return {
            "queued": await queue.depth(),
            "running": sum(len(worker.get("running", [])) for worker in workers),
            "workers": sorted(workers, key=lambda worker: str(worker.get("id"))),
            "recent_failures": await queue.failures(10),
            "memory": await self.stores.memory(),
        }
