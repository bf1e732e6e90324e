"""One-connection fan-out: a few shared readers feed every SSE subscriber of a gateway process.

A subscriber does not hold a Redis connection. Each job stream that has subscribers belongs to one
of ``READERS`` reader tasks; a reader blocks in one XREAD over all its streams (plus a wake-up stream
of its own, written to when a stream joins), decodes each new entry once, and puts it into every
subscriber's bounded queue. So N subscribers on M jobs cost ``READERS`` blocked connections, not N.

A subscriber joining a stream the reader already follows first replays what it missed with its own
XRANGE reads up to the reader's position, then takes live events; duplicates are skipped by id.

**Pings.** One ticker task puts a ``None`` into the queue of every subscriber that has had nothing
for ``ping_interval`` seconds, and ``events`` yields it: the SSE writer turns it into ``: ping``.
No per-event timer, no task per subscriber.

**Slow subscribers.** A subscriber whose queue (``QUEUE_SIZE`` events) is full is cut off: its SSE
response ends, and the client resumes with ``Last-Event-ID`` from where it was. Nobody waits for the
slowest reader, and nothing is lost to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import connection, keys
from shared.jobstream import StreamDecoder, parse_id
from shared.models import Event

logger = logging.getLogger(__name__)

READERS: Final = 4
QUEUE_SIZE: Final = 4096
READ_COUNT: Final = 1000
CATCH_UP_COUNT: Final = 1000


class SlowSubscriber(Exception):
    """The subscriber fell ``QUEUE_SIZE`` events behind and was cut off; it may resume."""


class StreamGone(Exception):
    """The job's stream expired (or Redis lost it) while a subscriber waited."""


class Subscriber:
    __slots__ = ("dropped", "gone", "job_id", "last_offer", "queue")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = False
        self.gone = False
        self.last_offer = time.monotonic()

    def offer(self, event: Event | None) -> None:
        if self.dropped:
            return
        self.last_offer = time.monotonic()
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped = True
            self.queue = asyncio.Queue(1)  # frees the backlog; the consumer sees `dropped`
            self.queue.put_nowait(event)


class _Reader:
    """One reader task: a blocked XREAD over its streams."""

    def __init__(self, redis: Redis, index: int) -> None:
        self.redis = redis
        self.wake_key = f"sf:gateway:{uuid.uuid4().hex}:{index}"
        self.streams: dict[str, str] = {}  # stream key -> last id read
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.decoders: dict[str, StreamDecoder] = {}
        self.stopping = False

    async def run(self) -> None:
        delay = 0.05
        wake_cursor = "0-0"  # not "$": a wake written before the first XREAD must not be missed
        while not self.stopping:
            try:
                request: dict[Any, Any] = {**self.streams, self.wake_key: wake_cursor}
                response = await self.redis.xread(request, count=READ_COUNT, block=connection.BLOCK_MS)
                delay = 0.05
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self.stopping:  # redis-py may turn the cancellation of a blocked read into this
                    return
                logger.warning("fan-out reader lost Redis (%s); again in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if not response:
                await self._check_gone()
                continue
            for raw_key, entries in response:
                key = raw_key.decode()
                if key == self.wake_key:
                    wake_cursor = entries[-1][0].decode()
                    continue
                if key not in self.streams:
                    continue
                events = await self.decoders[key].decode(entries)
                self.streams[key] = events[-1].id
                self._deliver(key, events)

    def _deliver(self, key: str, events: list[Event]) -> None:
        subscribers = self.subscribers.get(key, set())
        for event in events:
            for subscriber in subscribers:
                subscriber.offer(event)
            if event.terminal:
                self._forget(key)
                return

    def _forget(self, key: str) -> None:
        self.streams.pop(key, None)
        self.subscribers.pop(key, None)
        self.decoders.pop(key, None)

    async def _check_gone(self) -> None:
        """On an idle timeout: streams that expired meanwhile will never send a terminal event."""
        tracked = list(self.streams)
        if not tracked:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in tracked:
                pipe.exists(key)
            exists = await pipe.execute()
        for key, present in zip(tracked, exists, strict=True):
            if not present:
                for subscriber in self.subscribers.get(key, set()):
                    subscriber.gone = True
                    subscriber.offer(Event("0-0", "gone", None))
                self._forget(key)


class FanOut:
    """The gateway's shared readers.

    :param redis: the client the readers' blocked XREADs use (one connection per reader).
    """

    def __init__(self, redis: Redis, *, readers: int = READERS, ping_interval: float = 15.0) -> None:
        self.redis = redis
        self.ping_interval = ping_interval
        self._readers = [_Reader(redis, i) for i in range(readers)]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(reader.run()) for reader in self._readers]
        self._tasks.append(asyncio.create_task(self._ping()))

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(Exception):
            await self.redis.delete(*(reader.wake_key for reader in self._readers))

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval / 2)
            quiet_since = time.monotonic() - self.ping_interval
            for reader in self._readers:
                for subscribers in reader.subscribers.values():
                    for subscriber in subscribers:
                        if subscriber.last_offer < quiet_since:
                            subscriber.offer(None)

    @property
    def subscribers(self) -> int:
        return sum(len(subs) for reader in self._readers for subs in reader.subscribers.values())

    @property
    def streams(self) -> int:
        return sum(len(reader.streams) for reader in self._readers)

    def _reader_for(self, key: str) -> _Reader:
        return self._readers[hash(key) % len(self._readers)]

    async def events(self, job_id: str, *, after: str = "0") -> AsyncIterator[Event | None]:
        """The job's events after ``after``, live, until the terminal one; ``None`` for a ping.

        Raises ``SlowSubscriber`` when the subscriber fell too far behind (it may resume after the
        last event it got) and ``StreamGone`` when the stream expired meanwhile.
        """
        key = keys.events(job_id)
        reader = self._reader_for(key)
        subscriber = Subscriber(job_id)
        followed = key in reader.streams
        # No await from here to the registration: the reader cannot move in between.
        position = reader.streams.get(key, after)
        if not followed:
            reader.streams[key] = after
            reader.decoders[key] = StreamDecoder(self.redis, key)
        reader.subscribers.setdefault(key, set()).add(subscriber)
        try:
            if not followed:
                await self.redis.xadd(reader.wake_key, {"w": "1"}, maxlen=1, approximate=False)
            last = parse_id(after)
            if parse_id(position) > last:
                # Catch up on our own until the reader's position, then take live events.
                async for missed in self._catch_up(key, after, position):
                    last = parse_id(missed.id)
                    yield missed
                    if missed.terminal:
                        return
            while True:
                event = await subscriber.queue.get()
                if subscriber.dropped:
                    raise SlowSubscriber(job_id)
                if subscriber.gone:
                    raise StreamGone(job_id)
                if event is None:
                    yield None
                    continue
                if parse_id(event.id) <= last:
                    continue
                last = parse_id(event.id)
                yield event
                if event.terminal:
                    return
        finally:
            subs = reader.subscribers.get(key)
            if subs is not None:
                subs.discard(subscriber)
                if not subs:
                    reader._forget(key)

    async def _catch_up(self, key: str, after: str, until: str) -> AsyncIterator[Event]:
        decoder = StreamDecoder(self.redis, key)
        cursor = after
        while parse_id(cursor) < parse_id(until):
            entries = await self.redis.xrange(key, f"({cursor}", until, count=CATCH_UP_COUNT)
            if not entries:
                return
            for event in await decoder.decode(entries):
                cursor = event.id
                yield event
