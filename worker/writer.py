"""Publishing deltas: every job's XADDs, coalesced into one script call per event-loop turn.

A job hands its delta to ``append`` and goes back to reading its socket. The first append of a turn
schedules a flush; every append made before it runs (by any job whose socket had data in the same
turn) joins the same batch, written by one call of a Lua script (``shared.jobstream.APPEND_LUA``).
There is no timer: when idle a delta leaves at once, under load the batches grow by themselves.
Flushes run one at a time, so each stream's entries keep their order, and what a job appends after
its deltas lands after them.

Entries carry explicit ids (see ``shared.jobstream``) and XADD uses NOMKSTREAM: a late write to a
stream that has expired must not recreate it without a TTL, and a write whose id Redis refuses
marks its stream *fenced*: a newer attempt or the terminal event is already there, and the attempt
that wrote it must stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.jobstream import APPEND_LUA, D, Fields, T

from . import metrics

logger = logging.getLogger(__name__)

RETRY_FOR_S = 30.0
"""How long a batch is retried while Redis is unreachable before its jobs are failed."""
BACKLOG_LIMIT = 20_000
"""Entries waiting to be written beyond which appending jobs wait for Redis (backpressure)."""


class StreamWriter:
    """Coalesces XADDs from every job of this worker process.

    :param redis: the client whose pool the flushes use.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._sha = hashlib.sha1(APPEND_LUA.encode()).hexdigest().encode()
        self._batch: list[tuple[str, bytes, Fields]] = []
        self.fenced: set[str] = set()
        """Streams a write was refused on. The attempt that owns one stops and clears it."""
        self._batch_done: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.entries_written = 0

    @property
    def backlog(self) -> int:
        return len(self._batch)

    def append(self, stream: str, entry_id: bytes, fields: Fields) -> asyncio.Future[None]:
        """Queue one entry; the returned future completes when its batch is in Redis."""
        self._batch.append((stream, entry_id, fields))
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

    async def _write(self, batch: list[tuple[str, bytes, Fields]]) -> None:
        """Write one batch; while Redis is unreachable, again with backoff, for up to ``RETRY_FOR_S``.

        Replaying a batch is safe because every entry has its id: Redis refuses one it already has.
        A refusal on a replay is checked, since the entry may be ours from before the connection broke.
        """
        delay, give_up, replay = 0.05, time.monotonic() + RETRY_FOR_S, False
        while True:
            try:
                refused = await self._append(batch)
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() > give_up:
                    raise
                logger.warning("Redis unreachable while publishing (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay, replay = min(delay * 2, 1.0), True
        for position in refused:
            stream, entry_id, _ = batch[position - 1]
            if replay and await self._redis.xrange(stream, entry_id, entry_id):
                continue  # ours, written before the connection broke
            self.fenced.add(stream)

    async def _append(self, batch: list[tuple[str, bytes, Fields]]) -> list[int]:
        """One EVALSHA of ``APPEND_LUA`` for the batch, packed here: redis-py would encode each of the
        thousands of arguments in Python and read one reply per command."""
        keys = [stream.encode() for stream, _, _ in batch]
        argv = [part for _, entry_id, fields in batch for part in (entry_id, fields[T], fields[D])]
        payload = _resp([b"EVALSHA", self._sha, b"%d" % len(keys), *keys, *argv])
        metrics.PUBLISHED_BYTES.inc(len(payload))
        pool = self._redis.connection_pool
        conn = await pool.get_connection("EVALSHA")
        try:
            await conn.send_packed_command(payload, check_health=False)
            try:
                reply = await conn.read_response()
            except NoScriptError:
                await self._redis.script_load(APPEND_LUA)  # Redis restarted and forgot it
                await conn.send_packed_command(payload, check_health=False)
                reply = await conn.read_response()
        finally:
            await pool.release(conn)
        return [int(position) for position in reply or []]


def _resp(args: list[bytes]) -> bytes:
    """A command in the Redis protocol (RESP)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)
