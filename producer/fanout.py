"""One-connection fan-out: a few shared readers feed every subscriber of a process: the gateway's
SSE responses, and the Python client's live tails.

A subscriber does not hold a Redis connection. Each job stream that has subscribers is *followed* by
one of ``READERS`` reader tasks; a reader blocks in one XREAD over all its streams (plus a wake-up
stream of its own, written to when a stream joins), decodes each new entry once, and puts it into
every subscriber's bounded queue. So N subscribers on M jobs cost ``READERS`` blocked connections,
not N. Entries are passed on undecoded (``Entry.body``): the SSE writer forwards their bytes.

A subscriber joining a stream the reader already follows first replays what it missed with its own
XRANGE reads up to the follow's position, then takes live events; duplicates are skipped by id.

**Follows are objects.** A reader awaits Redis while subscribers come and go. What it read belongs to
the ``_Follow`` it read for, and it delivers only if that follow is still the one in place (a follow
made during a read did not ask for what that read returns): a stream whose last subscriber left
during the await, and maybe got a new follow from a new cursor, is never written back with a stale
position.

**A reader survives its input.** An error that one stream's entries cause (a corrupt entry, a
reference that cannot be fetched) ends that stream's subscribers, who may resume; the reader logs
it and carries on with the others. An error on the XREAD itself is retried with backoff. A reader
that dies anyway is restarted and logged (``shared.tasks``), which ``/healthz`` reports.

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final

from shared.store import (
    Entry,
    Position,
    RawEntry,
    StoreError,
    StreamReader,
    StreamStore,
    Unavailable,
    format_id,
    parse_cursor,
    parse_id,
)
from shared.store.connect import BLOCK_MS
from shared.store.streams import Wake
from shared.tasks import Supervised

logger = logging.getLogger(__name__)

READERS: Final = 4
QUEUE_SIZE: Final = 4096
READ_COUNT: Final = 1000
CATCH_UP_COUNT: Final = 1000


class SlowSubscriber(Exception):
    """The subscriber fell ``QUEUE_SIZE`` events behind and was cut off; it may resume."""


class StreamGone(Exception):
    """The job's stream expired (or Redis lost it) while a subscriber waited."""


class ReadFailed(Exception):
    """The reader could not read this job's stream; the subscriber may resume."""


_GONE: Final = Entry("0-0", "gone", 0, b"null")
_FAILED: Final = Entry("0-0", "failed", 0, b"null")
_END: Final = Entry("0-0", "end", 0, b"null")
"""Tells a subscriber's task that the reader wrote the terminal event to it directly."""


Direct = Callable[[Entry | None], bool]
"""Writes an event (or, for ``None``, a ping) to a subscriber's connection at once; False when it
cannot (its writes are paused, or it is gone): the event then goes to the subscriber's queue."""


class Subscriber:
    __slots__ = ("direct", "dropped", "job_id", "last", "last_offer", "queue")

    def __init__(self, job_id: str, after: Position) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = False
        self.last_offer = time.monotonic()
        self.last = after
        """The position of the last event this subscriber got (earlier ones are duplicates)."""
        self.direct: Direct | None = None
        """Set while the subscriber is caught up: the reader writes to it without waking its task."""

    def offer(self, entry: Entry | None, now: float) -> bool:
        """Hand over an event (``None``: a ping) at ``now`` (``time.monotonic()``, read once for
        all the subscribers it goes to); True when it was written at once."""
        if self.dropped:
            return False
        self.last_offer = now
        direct = self.direct
        if direct is not None:
            if entry is None:
                if direct(None):
                    return True
            else:
                position = entry.position
                if position <= self.last:
                    return False  # caught up through the catch-up read already
                if direct(entry):
                    self.last = position
                    if entry.terminal:
                        self.direct = None
                        self.queue.put_nowait(_END)
                    return True
            self.direct = None  # paused or gone: its task takes over from the queue
        self._put(entry)
        return False

    def stop(self, why: Entry) -> None:
        """End this subscriber's stream (``_GONE``, ``_FAILED``): its task takes over from the queue
        and raises, whether or not the reader was writing to it directly."""
        self.direct = None
        self._put(why)

    def _put(self, entry: Entry | None) -> None:
        try:
            self.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped = True
            self.queue = asyncio.Queue(1)  # frees the backlog; the consumer sees `dropped`
            self.queue.put_nowait(entry)


class _Follow:
    """One stream a reader follows: its position, its decoder, its subscribers."""

    __slots__ = ("cursor", "decoder", "handle", "since", "subscribers")

    def __init__(self, handle: str, decoder: StreamReader, cursor: str, since: int) -> None:
        self.handle = handle
        self.decoder = decoder
        self.cursor = cursor
        self.since = since
        """The reader's read under way when this follow was made: that read is not for it."""
        self.subscribers: set[Subscriber] = set()

    def offer(self, entry: Entry) -> int:
        """Hand an event to every subscriber; how many got it written at once."""
        written = 0
        now = time.monotonic()
        for subscriber in self.subscribers:
            written += subscriber.offer(entry, now)
        return written

    def stop(self, why: Entry) -> None:
        for subscriber in self.subscribers:
            subscriber.stop(why)


class _Reader:
    """One reader task: a blocked XREAD over its streams."""

    def __init__(
        self, streams: StreamStore, wake: Wake, name: str, sent: Callable[[int], object] | None, block_ms: int
    ) -> None:
        self.streams = streams
        self.wake = wake
        self.name = name
        self.sent = sent
        self.block_ms = block_ms
        self.follows: dict[str, _Follow] = {}  # job id -> what is followed
        self.cursors: dict[str, str] = {}  # the follows' positions, as the XREAD takes them (kept, not rebuilt)
        self.reads = 0
        self.stopping = False

    async def run(self) -> None:
        delay = 0.05
        while not self.stopping:
            self.reads += 1
            read = self.reads
            try:
                found = await self.streams.follow(
                    self.cursors, wake=self.wake, count=READ_COUNT, block_ms=self.block_ms
                )
                delay = 0.05
            except Unavailable as exc:
                if self.stopping:  # redis-py may turn the cancellation of a blocked read into this
                    return
                logger.warning("fan-out %s lost Redis (%s); again in %.2fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception:
                logger.exception("fan-out %s: the shared read failed; looking for the stream that caused it", self.name)
                await self._isolate()
                continue
            if not found:
                await self._check_gone(list(self.follows))
                continue
            for job_id, entries in found:
                follow = self.follows.get(job_id)
                # A follow made during this read (after its stream's last one went) did not ask for these.
                if follow is not None and follow.since < read:
                    await self._read(job_id, follow, entries)

    async def _read(self, job_id: str, follow: _Follow, raw: list[RawEntry]) -> None:
        try:
            entries = await follow.decoder.decode(raw)  # may fetch a reference it joined too late to see
        except Unavailable as exc:
            # Redis went away (a failover): not this stream's fault. Its cursor stays where it was, so
            # the next read, once Redis is back, brings these entries again.
            logger.warning("fan-out %s: Redis away while decoding job %s (%s); read again", self.name, job_id, exc)
            return
        except Exception:
            logger.exception(
                "fan-out %s: job %s's entries cannot be read; its subscribers are ended", self.name, job_id
            )
            if self.follows.get(job_id) is follow:
                follow.stop(_FAILED)
                self.forget(job_id, follow)
            return
        if self.follows.get(job_id) is not follow:
            return  # its subscribers left while we decoded; a newer follow reads from its own cursor
        follow.cursor = self.cursors[follow.handle] = entries[-1].id
        written = 0
        for entry in entries:
            written += follow.offer(entry)
            if entry.terminal:
                self.forget(job_id, follow)
                break
        if written and self.sent is not None:
            self.sent(written)  # once a batch, not once a subscriber: a metric's counter takes a lock

    async def _isolate(self) -> None:
        """After a shared read failed for a reason other than the connection: read each stream on its
        own, once, and end the subscribers of those that fail, so one stream never stops the others."""
        for job_id, follow in list(self.follows.items()):
            try:
                cursor = self.cursors[follow.handle]  # what the shared read sent
                await self.streams.follow({follow.handle: cursor}, wake=self.wake, count=1, block_ms=None)
            except Unavailable:
                return  # the next shared read waits for Redis
            except Exception as exc:
                logger.warning(
                    "fan-out %s: job %s's stream cannot be read (%s); its subscribers are ended", self.name, job_id, exc
                )
                follow.stop(_FAILED)
                self.forget(job_id, follow)

    def forget(self, job_id: str, follow: _Follow) -> None:
        if self.follows.get(job_id) is follow:
            del self.follows[job_id]
            del self.cursors[follow.handle]

    async def _check_gone(self, job_ids: list[str]) -> None:
        """On an idle timeout: streams that expired meanwhile will never send a terminal event."""
        if not job_ids:
            return
        try:
            present = await self.streams.which_exist(job_ids)
        except Unavailable:
            return  # the next XREAD says how Redis is
        for job_id, exists in zip(job_ids, present, strict=True):
            follow = self.follows.get(job_id)
            if not exists and follow is not None:
                follow.stop(_GONE)
                self.forget(job_id, follow)


class FanOut:
    """A process's shared readers.

    :param streams: the stream store the readers' blocked XREADs use (one connection per reader).
    :param readers: how many reader tasks (and blocked connections).
    :param ping_interval: seconds of silence after which a subscriber gets a ping.
    :param sent: called with how many events the readers wrote to subscribers directly (a metric).
    :param block_ms: the longest a read waits. A stream that joins wakes its reader with a write,
        which Redis refuses when it is full: then the stream is read from the next read on.
    """

    def __init__(
        self,
        streams: StreamStore,
        *,
        readers: int = READERS,
        ping_interval: float = 15.0,
        sent: Callable[[int], object] | None = None,
        block_ms: int = BLOCK_MS,
    ) -> None:
        self.streams = streams
        self.ping_interval = ping_interval
        name = uuid.uuid4().hex
        self._readers = [
            _Reader(streams, streams.waker(name, i), f"reader {i}", sent, block_ms) for i in range(readers)
        ]
        self.tasks = Supervised()
        """The readers and the pinger: restarted if they die, reported by ``/healthz``."""

    def start(self) -> None:
        for reader in self._readers:
            self.tasks.start(f"fan-out {reader.name}", reader.run)
        self.tasks.start("fan-out pinger", self._ping)

    async def aclose(self) -> None:
        for reader in self._readers:
            reader.stopping = True
        await self.tasks.aclose()
        with contextlib.suppress(Exception):
            await self.streams.drop_wakes(reader.wake for reader in self._readers)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval / 2)
            now = time.monotonic()
            quiet_since = now - self.ping_interval
            for reader in self._readers:
                for follow in list(reader.follows.values()):
                    for subscriber in follow.subscribers:
                        if subscriber.last_offer < quiet_since:
                            subscriber.offer(None, now)

    @property
    def subscribers(self) -> int:
        return sum(len(follow.subscribers) for reader in self._readers for follow in reader.follows.values())

    @property
    def followed(self) -> int:
        """How many streams the readers follow."""
        return sum(len(reader.follows) for reader in self._readers)

    def _reader_for(self, job_id: str) -> _Reader:
        return self._readers[hash(job_id) % len(self._readers)]

    async def events(
        self, job_id: str, *, after: str = "0", direct: Direct | None = None
    ) -> AsyncGenerator[Entry | None, None]:
        """The job's events after ``after``, live, until the terminal one; ``None`` for a ping.
        ``after`` is before the stream's end: a caller resuming a stream checks that first
        (``StreamStore.ended_at``), or it waits until the stream expires.

        :param direct: how to write an event to this subscriber at once. Whenever the subscriber is
            caught up (nothing queued), the reader uses it instead of the queue, and the events it
            writes are not yielded here; what is yielded (the catch-up, and events that arrive while
            its writes are paused) is the caller's to write.

        Raises ``SlowSubscriber`` when the subscriber fell too far behind (it may resume after the
        last event it got), ``StreamGone`` when the stream expired meanwhile, and ``ReadFailed``
        when its entries could not be read.
        """
        after = format_id(parse_cursor(after))  # a cursor Redis would refuse never reaches a shared read
        reader = self._reader_for(job_id)
        subscriber = Subscriber(job_id, parse_id(after))
        # No await from here to the registration: the reader cannot move in between.
        follow = reader.follows.get(job_id)
        joined = follow is None
        if follow is None:
            handle = self.streams.handle(job_id)
            follow = _Follow(handle, self.streams.reader(job_id), after, reader.reads)
            reader.follows[job_id], reader.cursors[handle] = follow, after
        position = follow.cursor
        follow.subscribers.add(subscriber)
        try:
            if joined:
                try:
                    await self.streams.wake(reader.wake, handle)
                except StoreError as exc:  # Redis full or away: the reader's next read (<= block_ms) finds it
                    logger.debug("fan-out: no wake for job %s (%s)", job_id, exc)
            if parse_id(position) > subscriber.last:
                # Catch up on our own until the follow's position, then take live events.
                async for missed in self._catch_up(job_id, after, position):
                    subscriber.last = missed.position
                    yield missed
                    if missed.terminal:
                        return
            while True:
                if direct is not None and subscriber.queue.empty():
                    subscriber.direct = direct  # caught up: the reader writes to it from now on
                entry = await subscriber.queue.get()
                if subscriber.dropped:
                    raise SlowSubscriber(job_id)
                if entry is None:
                    yield None
                    continue
                if entry is _END:
                    return
                if entry is _GONE:
                    raise StreamGone(job_id)
                if entry is _FAILED:
                    raise ReadFailed(job_id)
                if entry.position <= subscriber.last:
                    continue
                subscriber.last = entry.position
                yield entry
                if entry.terminal:
                    return
        finally:
            subscriber.direct = None
            follow.subscribers.discard(subscriber)
            if not follow.subscribers:
                reader.forget(job_id, follow)

    async def _catch_up(self, job_id: str, after: str, until: str) -> AsyncIterator[Entry]:
        decoder = self.streams.reader(job_id)
        cursor = after
        while parse_id(cursor) < parse_id(until):
            raw = await self.streams.range(job_id, cursor, until, count=CATCH_UP_COUNT)
            if not raw:
                return
            for entry in await decoder.decode(raw):
                cursor = entry.id
                yield entry
