"""The stream store: every key of one job (its event stream, owner, attempt count, cancel flag, tenant),
and every read and write of them.

The job's life on this side, each step one script (atomic, one round trip):

    create  -> ``queued``                  (the submitter, or the worker that starts a job first)
    start   -> ``started(n)``              (numbers the attempt, voids a lost one, makes it the owner)
    append  -> deltas / ``retry``          (explicit ids after ``started``: a stale attempt is refused)
    end     -> ``done|error|cancelled``    (only if none yet, and only by the owning attempt)
    cancel  -> flag, and ``cancelled`` at once if no attempt has started
    void    -> ``retry`` for an attempt whose worker was lost (or ``cancelled``, if one was asked)

Together they keep the contract's central rule: a job's stream ends with exactly one terminal
event, and nothing is appended after it. Every script touches the keys of one job only, so all of
them run on a Redis Cluster (one slot per job).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .. import jsonutil
from ..models import TERMINAL_TYPES, make_error
from . import keys
from .calls import Calls, Line, Lua, resp, send_packed
from .codec import D, Decoder, DeltaEncoder, Entry, Fields, Position, RawEntry, T, is_terminal

# Scripts that end a job, or keep its end possible, are flagged allow-oom: a job's end is written even
# when Redis is full (one small entry per job), so that every job ends. The flag must open the script.
_ALLOW_OOM = "#!lua flags=allow-oom\n"

# Every entry of a job's stream is appended by xadd(). On a Redis Cluster (``shared.store.live``) the
# scripts' twins also announce each one, by its id, on the job's live channel (sharded pub/sub, in the
# job's slot): the gateway's fan-in cannot XREAD across slots, so it listens there and reads what is
# announced. On one Redis nobody listens, and the scripts skip it (it would add ~10 % to the Redis
# CPU of a delta).
_XADD = """
local function xadd(...) return redis.call('XADD', ...) end
"""
_XADD_LIVE = """
local function xadd(key, ...)
  local id = redis.call('XADD', key, ...)
  if id then redis.call('SPUBLISH', key .. 'LIVE_SUFFIX', id) end
  return id
end
""".replace("LIVE_SUFFIX", keys.LIVE_SUFFIX)


def _script(body: str, *, allow_oom: bool = False) -> Lua:
    """A stream store script, and as its ``live`` twin the same announcing every entry it appends."""
    head = _ALLOW_OOM if allow_oom else ""
    return Lua(head + _XADD + body, live=Lua(head + _XADD_LIVE + body))


# An entry comes back from XREVRANGE as {id, {"t", type, "d", data}}.
_LAST_TYPE = """
local function last_type(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last == 0 then return nil end
  return last[1][2][2]
end
local function is_terminal(t)
  return t == 'done' or t == 'error' or t == 'cancelled'
end
"""

# KEYS: events, tenant. ARGV: queued data, ttl s, tenant or "".
_CREATE_BODY = """
local function create()
  xadd(KEYS[1], '*', 't', 'queued', 'd', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2]) end
end
"""
_CREATE = _script(
    _CREATE_BODY
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
create()
return 1
"""
)

# KEYS: events, tenant, cancel flag, owner, attempts. ARGV: queued data, ttl s, tenant or "", max attempts.
# Returns {'started', attempt, id}, {'exhausted', attempt}, {'ended'} (terminal) or {'cancel'}.
# A stream that is not there yet is created first: the worker may take a job before its submitter
# has written `queued` (or the submitter died between its two steps).
_START = _script(
    _LAST_TYPE
    + _CREATE_BODY
    + """
local t = last_type(KEYS[1])
if not t then
  create()
  t = 'queued'
end
if is_terminal(t) then return {'ended'} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'cancel'} end
local ttl = redis.call('TTL', KEYS[1])
local n = redis.call('INCR', KEYS[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[5], ttl) end
if t ~= 'queued' and t ~= 'retry' then
  -- The previous attempt ended without a word (its worker was lost): void it before the next.
  xadd(KEYS[1], 'NOMKSTREAM', '*', 't', 'retry', 'd', '{"attempt":' .. (n - 1) ..
    ',"error":{"type":"worker_lost","message":"the attempt ended without a word: its worker was lost",' ..
    '"status":null,"upstream":null},"delay_s":0}')
end
if n > tonumber(ARGV[4]) then return {'exhausted', n} end
local id = xadd(KEYS[1], 'NOMKSTREAM', '*', 't', 'started', 'd', '{"attempt":' .. n .. '}')
redis.call('SET', KEYS[4], id)
if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
return {'started', n, id}
"""
)

# KEYS: events, owner, attempts, tenant, cancel flag. ARGV: type, data, ttl s, the ending attempt's
# started id or "", and to open a missing stream first: queued data or "", tenant or "", its ttl s.
# Returns the entry id, or false when the stream is gone (and is not to be opened), has ended, or
# belongs to another attempt. Every key of the job then lives as long as the stream.
_END = _script(
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if (not t) and ARGV[5] ~= '' then
  xadd(KEYS[1], '*', 't', 'queued', 'd', ARGV[5])
  if ARGV[6] ~= '' then redis.call('SET', KEYS[4], ARGV[6]) end
  t = 'queued'
end
if (not t) or is_terminal(t) then return false end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return false end
local id = xadd(KEYS[1], 'NOMKSTREAM', '*', 't', ARGV[1], 'd', ARGV[2])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return id
""",
    allow_oom=True,
)

# KEYS: events, cancel flag, tenant. ARGV: cancelled data, ttl s.
# The flag tells a worker that starts the job late; a job no attempt has started ends here and now.
_CANCEL = _script(
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if not t then return 'unknown' end
if is_terminal(t) then return 'ended' end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if t ~= 'queued' then return 'signal' end
xadd(KEYS[1], 'NOMKSTREAM', '*', 't', 'cancelled', 'd', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 'cancelled'
""",
    allow_oom=True,
)

# KEYS: events, owner, cancel flag, attempts, tenant. ARGV: the owner seen before the job was requeued
# ("" if none), worker_lost error JSON, cancelled data, ttl s.
# The stream half of giving a lost worker's job to another: only if that attempt still owns the job
# (a new one may have started already), announce that it is void and take the right to end the job
# from it; or, if a cancel was asked meanwhile, end the job.
_VOID = _script(
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if not t then return 'gone' end
if is_terminal(t) then return 'ended' end
local owner = redis.call('GET', KEYS[2]) or ''
if owner ~= ARGV[1] then return 'moved' end
if redis.call('EXISTS', KEYS[3]) == 1 then
  xadd(KEYS[1], 'NOMKSTREAM', '*', 't', 'cancelled', 'd', ARGV[3])
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
  return 'cancelled'
end
if owner == '' or owner == 'reclaimed' or t == 'queued' or t == 'retry' then return 'idle' end
local n = redis.call('GET', KEYS[4]) or '0'
xadd(KEYS[1], 'NOMKSTREAM', '*', 't', 'retry', 'd',
           '{"attempt":' .. n .. ',"error":' .. ARGV[2] .. ',"delay_s":0}')
redis.call('SET', KEYS[2], 'reclaimed', 'KEEPTTL')
return 'voided'
""",
    allow_oom=True,
)

_APPEND = _script(
    """
-- KEYS: the stream of each entry. ARGV: id, type field, data field of each entry, in order.
-- Appends every entry (NOMKSTREAM) and returns two lists of 1-based positions: those Redis refused
-- (an id not above the stream's last one: a newer attempt, or the end, is there; or a stream that is
-- gone), and those it had no memory for.
local refused, full = {}, {}
for i = 1, #KEYS do
  local at = (i - 1) * 3
  local ok, id = pcall(xadd, KEYS[i], 'NOMKSTREAM', ARGV[at + 1], 't', ARGV[at + 2], 'd', ARGV[at + 3])
  if not ok and string.sub(tostring(id), 1, 3) == 'OOM' then
    full[#full + 1] = i
  elseif not ok or not id then
    refused[#refused + 1] = i
  end
end
return {refused, full}
"""
)
"""One script call appends a whole batch of entries: one command and one reply, not one per entry."""

Batch = list[tuple[DeltaEncoder, bytes, Fields]]
"""Entries to append: the attempt that writes each (its ``job_id``), the entry's id and its fields."""


def pack_append(script: Lua, batch: Batch) -> bytes:
    """The append script's call for ``batch``, packed here, each stream's key once per attempt
    (``DeltaEncoder.key_resp``): redis-py would encode each of the thousands of arguments in Python."""
    count = b"%d" % len(batch)
    parts = [
        b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$%d\r\n%b\r\n" % (3 + 4 * len(batch), script.sha, len(count), count)
    ]
    parts += [attempt.key_resp for attempt, _, _ in batch]
    for _, entry_id, fields in batch:
        kind, data = fields[T], fields[D]
        parts.append(
            b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(entry_id), entry_id, len(kind), kind, len(data), data)
        )
    return b"".join(parts)


class Appended(NamedTuple):
    """What ``StreamStore.append`` did: positions refused (fenced, or gone), positions Redis had no
    memory for, and the size of the command sent."""

    refused: list[int]
    full: list[int]
    size: int


class Start(NamedTuple):
    """What ``StreamStore.start`` found: ``status`` is ``started`` (with ``attempt`` and
    ``started_id``), ``exhausted`` (the attempt would be one too many), ``ended`` or ``cancel``."""

    status: str
    attempt: int
    started_id: str


class Wake:
    """A fan-out reader's wake-up stream, read beside the job streams it follows."""

    __slots__ = ("cursor", "key", "woken")

    def __init__(self, key: str) -> None:
        self.key = key
        self.cursor = "0-0"  # not "$": a wake written before the first XREAD must not be missed
        self.woken = False
        """A wake was written since the reader's current XREAD was sent: the next XREAD takes in every
        stream that joins meanwhile, so one wake is enough for them all."""


WAKE_TTL_S = 600
"""A wake-up stream outlives its gateway by at most this long (each wake renews it)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamStore:
    """The stream store's operations, bound to one Redis client.

    :param redis: a ``redis.asyncio.Redis`` (bytes responses).
    :param ttl_seconds: how long a finished job's keys stay readable.
    """

    def __init__(self, redis: Redis, *, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._calls = Calls(redis)
        self._appends = Line(redis)  # the writer's flushes: one at a time

    async def ping(self) -> None:
        await self.redis.ping()

    # The job's life ---------------------------------------------------------------------------------

    async def create(self, job_id: str, queued: dict[str, Any], *, tenant: str | None, ttl_seconds: int) -> bool:
        """Open the job's stream with its ``queued`` event, unless it exists; True if this call did."""
        created = await self._calls.run(
            _CREATE,
            keys=[keys.events(job_id), keys.tenant(job_id)],
            args=[jsonutil.dumps(queued), ttl_seconds, tenant or ""],
        )
        return bool(created)

    async def start(
        self, job_id: str, queued: dict[str, Any], *, tenant: str | None, ttl_seconds: int, max_attempts: int
    ) -> Start:
        """Open the job's next attempt: number it, append ``started``, make it the owner. A stream
        that does not exist yet is created as ``create`` would (``queued``, ``tenant``, ``ttl_seconds``)."""
        reply = await self._calls.run(
            _START,
            keys=[
                keys.events(job_id),
                keys.tenant(job_id),
                keys.cancel_flag(job_id),
                keys.owner(job_id),
                keys.attempts(job_id),
            ],
            args=[jsonutil.dumps(queued), ttl_seconds, tenant or "", max_attempts],
        )
        status = _text(reply[0])
        attempt = int(reply[1]) if len(reply) > 1 else 0
        started_id = _text(reply[2]) if len(reply) > 2 else ""
        return Start(status, attempt, started_id)

    async def end(
        self,
        job_id: str,
        type: str,
        data: Any,
        *,
        started_id: str | None = None,
        opening: tuple[dict[str, Any], str | None] | None = None,
    ) -> str | None:
        """Append the terminal event unless the job already has one; return its id or ``None``.
        Written even when Redis is out of memory.

        :param started_id: the ending attempt's ``started`` id: refused if another attempt owns the job.
        :param opening: ``(queued data, tenant)`` to open the stream with first if it does not exist (a
            job whose start Redis refused).
        """
        assert type in TERMINAL_TYPES, type
        result = await self._calls.run(
            _END,
            keys=[
                keys.events(job_id),
                keys.owner(job_id),
                keys.attempts(job_id),
                keys.tenant(job_id),
                keys.cancel_flag(job_id),
            ],
            args=[
                type,
                jsonutil.dumps(data),
                self.ttl_seconds,
                started_id or "",
                jsonutil.dumps(opening[0]) if opening else "",
                (opening[1] or "") if opening else "",
            ],
        )
        return _text(result) if result else None

    async def cancel(self, job_id: str) -> str:
        """Ask for the job's cancellation: ``cancelled`` (no attempt had started: it has ended),
        ``signal`` (an attempt holds it: its worker must be told), ``ended`` or ``unknown``."""
        result = await self._calls.run(
            _CANCEL,
            keys=[keys.events(job_id), keys.cancel_flag(job_id), keys.tenant(job_id)],
            args=[jsonutil.dumps({"partial": None}), self.ttl_seconds],
        )
        return _text(result)

    async def owner(self, job_id: str) -> str:
        """The ``started`` id of the attempt that owns the job ("" if none has started)."""
        value = await self.redis.get(keys.owner(job_id))
        return _text(value) if value else ""

    async def void(self, job_id: str, owner: str) -> str:
        """A lost worker's attempt is void: ``voided`` (``retry`` appended; it can no longer end the
        job), ``cancelled`` (a cancel was waiting), ``idle`` (no attempt was running), ``moved`` (another
        attempt owns the job now), ``ended`` or ``gone``.

        :param owner: what ``owner`` returned before the job went back to the queue.
        """
        error = make_error("worker_lost", "the worker running this job stopped renewing its lease")
        result = await self._calls.run(
            _VOID,
            keys=[
                keys.events(job_id),
                keys.owner(job_id),
                keys.cancel_flag(job_id),
                keys.attempts(job_id),
                keys.tenant(job_id),
            ],
            args=[owner, jsonutil.dumps(error), jsonutil.dumps({"partial": None}), self.ttl_seconds],
        )
        return _text(result)

    # Writing deltas (the worker's hot path) ----------------------------------------------------------

    async def append(self, batch: Batch) -> Appended:
        """Append a batch of entries in one script call (``pack_append``); return the 1-based positions
        Redis refused (the attempt is fenced or its stream gone), those it had no memory for, and the
        bytes sent."""
        payload = pack_append(_APPEND, batch)
        (reply,) = await self._appends.send_packed(payload, 1)
        if isinstance(reply, NoScriptError):
            await self.redis.script_load(_APPEND.source)  # Redis restarted and forgot it
            (reply,) = await self._appends.send_packed(payload, 1)
        if isinstance(reply, Exception):
            raise reply
        refused, full = reply
        return Appended([int(position) for position in refused], [int(position) for position in full], len(payload))

    async def has_entry(self, job_id: str, entry_id: bytes) -> bool:
        """Whether the stream holds this entry (a write replayed after a broken connection)."""
        return bool(await self.redis.xrange(keys.events(job_id), entry_id, entry_id))

    # Reading --------------------------------------------------------------------------------------------

    def reader(self, job_id: str) -> StreamReader:
        """A decoder of this job's entries for one reader."""
        return StreamReader(self, job_id)

    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(keys.events(job_id)))

    async def last(self, job_id: str) -> Entry | None:
        """The job's most recent event, or ``None`` when it has no stream."""
        entries = await self.redis.xrevrange(keys.events(job_id), count=1)
        if not entries:
            return None
        return (await self.reader(job_id).decode(entries))[0]

    async def range(
        self, job_id: str, after: str = "-", until: str = "+", *, count: int | None = None
    ) -> list[RawEntry]:
        """Entries after the id ``after`` (exclusive; ``"-"``: from the start) up to ``until`` (inclusive)."""
        start = after if after == "-" else f"({after}"
        entries: list[RawEntry] = await self.redis.xrange(keys.events(job_id), start, until, count=count)
        return entries

    async def latest(self, job_id: str, count: int) -> list[RawEntry]:
        """The last ``count`` entries, newest first."""
        entries: list[RawEntry] = await self.redis.xrevrange(keys.events(job_id), count=count)
        return entries

    def handle(self, job_id: str) -> str:
        """What ``follow`` knows a job's stream by."""
        return keys.events(job_id)

    async def follow(
        self, cursors: dict[str, str], *, wake: Wake, count: int, block_ms: int | None
    ) -> list[tuple[str, list[RawEntry]]]:
        """One blocked XREAD over many jobs' streams and a wake-up stream: ``(job id, entries)`` of the
        jobs that have new entries after their cursor. A write to ``wake`` ends the wait early.

        :param cursors: each stream's position, by its ``handle`` (a reader keeps this map as it
            goes: with thousands of streams, rebuilding it for every read would cost more than the read).
        """
        wake.woken = False  # before the request is built: a stream that joins after it wakes this read
        request: dict[Any, Any] = {**cursors, wake.key: wake.cursor}
        response = await self.redis.xread(request, count=count, block=block_ms)
        found: list[tuple[str, list[RawEntry]]] = []
        for raw_key, entries in response or ():
            if raw_key.decode() == wake.key:
                wake.cursor = entries[-1][0].decode()
            else:
                found.append((keys.job_of(raw_key), entries))
        return found

    def waker(self, gateway: str, index: int) -> Wake:
        return Wake(keys.wake(gateway, index))

    async def wake(self, wake: Wake, handle: str) -> None:
        """Wake the reader blocked on ``wake``: it now follows ``handle`` too. Once per read: a burst
        of subscribers joining costs one write, not one each."""
        if wake.woken:
            return
        wake.woken = True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(wake.key, {"w": "1"}, maxlen=1, approximate=False)
                pipe.expire(wake.key, WAKE_TTL_S)
                await pipe.execute()
        except BaseException:
            wake.woken = False  # the next joiner tries again; the read ends by its block time anyway
            raise

    async def drop_wakes(self, wakes: Iterable[Wake]) -> None:
        await self.redis.delete(*(wake.key for wake in wakes))

    async def which_exist(self, job_ids: list[str]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(keys.events(job_id))
            return [bool(found) for found in await pipe.execute()]

    async def tenant(self, job_id: str) -> str | None:
        """The tenant that submitted the job through the gateway, if any."""
        value = await self.redis.get(keys.tenant(job_id))
        return _text(value) if value else None

    async def attempts(self, job_id: str) -> int:
        """How many attempts the job has started."""
        value = await self.redis.get(keys.attempts(job_id))
        return int(value) if value else 0

    async def cancel_requested(self, job_ids: list[str]) -> list[bool]:
        """For each job, whether a cancel was asked for (one write and one read for them all: a
        worker asks this of every job it runs, every few seconds)."""
        if not job_ids:
            return []
        payload = b"".join(resp([b"EXISTS", keys.cancel_flag(job_id).encode()]) for job_id in job_ids)
        return [flag == 1 for flag in await send_packed(self.redis, payload, len(job_ids))]

    async def scan_open(self, cursor: int, *, count: int = 500) -> tuple[int, list[tuple[str, str]]]:
        """One SCAN step over the jobs' streams: the next cursor (0 at the end) and ``(job id, last
        event id)`` of the streams seen whose last event is not terminal."""
        cursor, found = await self.redis.scan(cursor, match=keys.EVENTS_PATTERN, count=count, _type="stream")
        job_ids = [keys.job_of(key) for key in found]
        lasts = await self.last_entries(job_ids)
        open_jobs = [
            (job_id, _text(last[0]))
            for job_id, last in zip(job_ids, lasts, strict=True)
            if last and not is_terminal(last[1])
        ]
        return cursor, open_jobs

    async def last_entries(self, job_ids: list[str]) -> list[RawEntry | None]:
        """Each job's last entry, raw (``None`` where it has no stream), in one round trip."""
        if not job_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.xrevrange(keys.events(job_id), count=1)
            lasts = await pipe.execute()
        return [last[0] if last else None for last in lasts]

    async def ended_at(self, job_id: str) -> str | None:
        """The id of the job's terminal event, ``None`` while it runs (or when it has no stream)."""
        last = (await self.last_entries([job_id]))[0]
        return last[0].decode() if last is not None and is_terminal(last[1]) else None

    async def length(self, job_id: str) -> int:
        """How many entries the job's stream holds."""
        return int(await self.redis.xlen(keys.events(job_id)))


class StreamReader:
    """Decodes one job's entries for one reader, fetching (once) a reference it joined too late to see."""

    def __init__(self, store: StreamStore, job_id: str) -> None:
        self._store = store
        self.job_id = job_id
        self._decoder = Decoder()

    async def decode(self, entries: list[RawEntry]) -> list[Entry]:
        missing = self._decoder.missing(entries)
        if missing:
            await self._fetch(missing)
        return self._decoder.decode(entries)

    async def _fetch(self, refs: set[Position]) -> None:
        stream = keys.events(self.job_id)
        async with self._store.redis.pipeline(transaction=False) as pipe:
            for ms, seq in sorted(refs):
                pipe.xrange(stream, f"{ms}-{seq}", f"{ms}-{seq}")
            for found in await pipe.execute():
                for entry_id, fields in found:
                    self._decoder.remember(_position(entry_id), fields[D])


def _position(entry_id: bytes) -> Position:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)
