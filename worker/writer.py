"""Publishing deltas: every job's XADDs, coalesced into one script call per event-loop turn.

A job hands its delta to ``append`` and goes back to reading its socket. The first append of a turn
schedules a flush; every append made before it runs (by any job whose socket had data in the same
turn) joins the same batch, written by one script call (``StreamStore.append``). There is no timer:
when idle a delta leaves at once, under load the batches grow by themselves. Flushes run one at a
time, so each stream's entries keep their order, and what a job appends after its deltas lands
after them.

Entries carry explicit ids (``shared.store.codec``) and are appended with NOMKSTREAM: a late write
to a stream that has expired must not recreate it without a TTL, and a write whose id Redis refuses
marks its attempt *fenced* (``DeltaEncoder.fenced``): a newer attempt or the terminal event is
already there, and the attempt that wrote it must stop. One Redis had no memory for marks it *full*:
the job ends in ``storage_full``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.store import Batch, DeltaEncoder, Fields, StreamStore, Unavailable

from . import metrics

logger = logging.getLogger(__name__)

RETRY_FOR_S = 30.0
"""How long a batch is retried while Redis is unreachable before its jobs are failed."""
FULL_LOG_EVERY_S = 30.0
"""At most one "out of memory" log line this often."""
BACKLOG_LIMIT = 20_000
"""Entries waiting to be written beyond which appending jobs wait for Redis (backpressure)."""


class StreamWriter:
    """Coalesces the appends of every job of this worker process.

    :param streams: the stream store the flushes write to.
    """

    def __init__(self, streams: StreamStore) -> None:
        self._streams = streams
        self._full_since: float | None = None  # when the last "out of memory" line was logged
        self._full_unlogged = 0
        self._batch: Batch = []
        self._batch_done: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.entries_written = 0

    def storage_full(self, refused: int = 1) -> None:
        """Count writes Redis refused for lack of memory; say so once per burst, not once per write."""
        metrics.STORAGE_FULL.inc(refused)
        self._full_unlogged += refused
        now = time.monotonic()
        if self._full_since is None or now - self._full_since > FULL_LOG_EVERY_S:
            logger.error(
                "Redis is out of memory (maxmemory reached): %d writes refused; the jobs they belong to end in "
                "storage_full (free memory, raise maxmemory, or shorten STREAMFLEET_STREAM_TTL_SECONDS)",
                self._full_unlogged,
            )
            self._full_since, self._full_unlogged = now, 0

    @property
    def backlog(self) -> int:
        return len(self._batch)

    def append(self, attempt: DeltaEncoder, entry_id: bytes, fields: Fields) -> asyncio.Future[None]:
        """Queue one entry of ``attempt``; the returned future completes when its batch is in Redis."""
        self._batch.append((attempt, entry_id, fields))
        if self._batch_done is None:
            loop = asyncio.get_running_loop()
            self._batch_done = loop.create_future()
            if self._flusher is None:
                self._flusher = loop.create_task(self._flush())
        return self._batch_done

    async def _flush(self) -> None:
        try:
            while self._batch:
                batch, done = self._batch, self._batch_done
                self._batch, self._batch_done = [], None
                assert done is not None
                try:
                    await self._write(batch)
                except Exception as exc:
                    logger.warning("writing %d entries failed: %s", len(batch), exc)
                    done.set_exception(exc)
                    done.exception()  # retrieved: every waiter still gets it, nobody else is told
                else:
                    self.entries_written += len(batch)
                    done.set_result(None)
        finally:
            self._flusher = None

    async def _write(self, batch: Batch) -> None:
        """Write one batch; while Redis is unreachable, again with backoff, for up to ``RETRY_FOR_S``.

        Replaying a batch is safe because every entry has its id: Redis refuses one it already has.
        A refusal on a replay is checked, since the entry may be ours from before the connection broke.
        """
        delay, give_up, replay = 0.05, time.monotonic() + RETRY_FOR_S, False
        while True:
            try:
                refused, full, size = await self._streams.append(batch)
                break
            except Unavailable as exc:
                if time.monotonic() > give_up:
                    raise
                logger.warning("Redis unreachable while publishing (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay, replay = min(delay * 2, 1.0), True
        for position in refused:
            attempt, entry_id, _ = batch[position - 1]
            if replay and await self._streams.has_entry(attempt.job_id, entry_id):
                continue  # ours, written before the connection broke
            attempt.fenced = True
        for position in full:
            batch[position - 1][0].full = True
        if full:
            self.storage_full(len(full))
        # Counted once a batch, not once a delta: a Prometheus counter takes a lock per call.
        metrics.DELTAS.inc(len(batch) - len(refused) - len(full))
        metrics.PUBLISHED_BYTES.inc(size)
