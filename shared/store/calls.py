"""Script calls coalesced per event-loop turn: every call made in one turn (by any job, any request)
leaves in one socket write and its replies are read back in order, as the worker's appends do.

redis-py spends ~100 µs of CPU on one awaited script call (the pool, encoding each argument, one
write, one read); a job makes several (a submit two, a worker's start, end and finish three), and a
thousand jobs a second made it the larger part of a short job's cost. Here a call is packed by hand
(~3 µs) and a turn's calls share the write and the connection. There is no timer: alone, a call
leaves at once; under load, the batches grow by themselves. One batch is in flight at a time.

A call's reply, or the error Redis answered it with, goes to its own caller only; a connection
that fails fails the calls of its batch, which the callers handle as they would any unreachable
Redis. A script Redis does not know (it restarted) is loaded and its calls sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, Final

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import NoScriptError, ResponseError


class Lua:
    """A script, by its source and its SHA-1 (what EVALSHA names it by); ``live``, the twin a Redis
    Cluster runs (``shared.store.streams``)."""

    __slots__ = ("live", "sha", "source")

    def __init__(self, source: str, *, live: Lua | None = None) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self.live = live


def resp(args: list[bytes]) -> bytes:
    """A command in the Redis protocol (RESP)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def _arg(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b"%d" % value


def evalsha(script: Lua, keys: list[Any], args: list[Any]) -> bytes:
    """``EVALSHA`` of ``script`` with these keys and arguments (bytes, str or int), packed."""
    return resp([b"EVALSHA", script.sha, b"%d" % len(keys), *map(_arg, keys), *map(_arg, args)])


_Call = tuple[Lua, bytes, "asyncio.Future[Any]"]


class Calls:
    """The script calls of one Redis client, coalesced per loop turn.

    :param redis: the client whose pool the batches borrow a connection from.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._line = Line(redis)
        self._pending: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None

    async def run(self, script: Lua, *, keys: list[Any], args: list[Any]) -> Any:
        """Run ``script``; its reply (bytes, as redis-py reads it), or the error Redis answered."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, evalsha(script, keys, args), future))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    unknown = await self._send(batch)
                    if unknown:  # Redis restarted and forgot them: load, and send those calls again
                        for source in {script.source for script, _, _ in unknown}:
                            await self._redis.script_load(source)
                        await self._send(unknown)
                except BaseException as exc:  # the connection failed (or the loop is closing)
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc) if isinstance(exc, Exception) else future.cancel()
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._flusher = None

    async def _send(self, batch: list[_Call]) -> list[_Call]:
        """Send a batch, hand each reply to its caller; return the calls whose script Redis lacked."""
        replies = await self._line.send_packed(b"".join(command for _, command, _ in batch), len(batch))
        unknown = []
        for call, reply in zip(batch, replies, strict=True):
            future = call[2]
            if isinstance(reply, NoScriptError):
                unknown.append(call)
            elif future.done():  # a caller that gave up (cancelled) is owed nothing
                continue
            elif isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        return unknown


async def send_packed(redis: Redis, payload: bytes, replies: int) -> list[Any]:
    """Send commands packed in one payload on one of ``redis``'s connections and read their
    ``replies``; an error Redis answers one command with is that command's reply (a
    ``ResponseError``), and a connection that fails raises."""
    pool = redis.connection_pool
    connection = await pool.get_connection()
    try:
        return await _exchange(connection, payload, replies)
    finally:
        await pool.release(connection)


async def _exchange(connection: Any, payload: bytes, replies: int) -> list[Any]:
    await connection.send_packed_command(payload, check_health=False)
    read: list[Any] = []
    for _ in range(replies):
        try:
            read.append(await connection.read_response())
        except ResponseError as error:  # this command's own error; the connection is fine
            read.append(error)
    return read


HOLD_IDLE_S: Final = 1.0
"""How long a ``Line`` keeps its connection unused before giving it back to the pool."""


class Line:
    """One connection of a client's pool, kept between the batches of one user that sends a batch at
    a time (a flusher), as long as they come within ``HOLD_IDLE_S`` of each other.

    redis-py's pool checks a connection every time it lends one: a read with a zero timeout, which
    costs a task cancellation and two turns of the loop (~25 µs of CPU; the whole exchange 80 µs
    against 52 µs on a kept connection). At light load a flush carries one entry, so that check was
    paid for every delta. A connection idle longer goes back to the pool, and the next batch borrows
    one checked: a server or proxy that closes idle connections is met there, as before. A batch sent
    while another is in flight (a second user) borrows from the pool as before. A connection that
    fails goes back to the pool (redis-py has closed it) and the next batch borrows another. A bounded
    pool (the gateway's, a client's given ``max_connections``) lends one per batch as before: a kept
    connection would be missing to whoever waits for one.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis  # its pool is looked up when used: a cluster client has none (its store sends elsewhere)
        self._connection: Any = None
        self._last_used = 0.0
        self._busy = False

    async def send_packed(self, payload: bytes, replies: int) -> list[Any]:
        """As ``send_packed``, on the kept connection."""
        pool = self._redis.connection_pool
        if self._busy or isinstance(pool, BlockingConnectionPool):
            return await send_packed(self._redis, payload, replies)
        self._busy = True
        try:
            connection, self._connection = self._connection, None
            if connection is not None and time.monotonic() - self._last_used > HOLD_IDLE_S:
                await pool.release(connection)
                connection = None
            if connection is None:
                connection = await pool.get_connection()
            try:
                read = await _exchange(connection, payload, replies)
            except BaseException:
                await pool.release(connection)
                raise
            self._connection, self._last_used = connection, time.monotonic()
            return read
        finally:
            self._busy = False
