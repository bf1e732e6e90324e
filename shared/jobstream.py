"""The job stream: how events are stored as Redis Stream entries, and the atomic steps that append them.

This is the only module that knows the raw entry layout. Every entry has exactly two fields, so that
Redis stores the field names once per stream node instead of once per entry:

    t  the event type (``queued``, ``started``, ``retry``, ``done``, ``error``, ``cancelled``), or, for a
       ``delta``, the attempt number in decimal (a one-byte integer inside Redis)
    d  for a delta, the upstream's JSON data exactly as it was sent; otherwise the event's data as JSON

Storing the upstream bytes as they came is what makes a delta lossless: unknown keys, key order and
every digit of every number survive, and the worker never re-serializes a chunk.

The steps that must not interleave with others (submit, start of an attempt, the terminal event,
cancel) are Lua scripts, each one round trip and atomic. They enforce the contract's central rule:
a job's stream ends with exactly one terminal event, and nothing is appended after it.
"""

from __future__ import annotations

from typing import Any, Final

from redis.asyncio import Redis

from . import jsonutil, keys
from .models import DELTA, TERMINAL_TYPES, Event

T: Final = b"t"
D: Final = b"d"

Fields = dict[bytes, bytes]


def encode(type: str, data: Any) -> Fields:
    """The entry fields of a non-delta event."""
    return {T: type.encode(), D: jsonutil.dumps(data)}


def encode_delta(attempt: int, chunk: bytes) -> Fields:
    """The entry fields of a delta: the attempt number and the upstream's JSON bytes untouched."""
    return {T: b"%d" % attempt, D: chunk}


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    """Turn one raw stream entry into an ``Event``."""
    event_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    kind = fields[T]
    if kind[:1].isdigit():
        return Event(event_id, DELTA, {"attempt": int(kind), "chunk": jsonutil.loads(fields[D])})
    return Event(event_id, kind.decode(), jsonutil.loads(fields[D]))


_TERMINAL_KINDS: Final = frozenset(kind.encode() for kind in TERMINAL_TYPES)


def is_terminal(fields: dict[bytes, bytes]) -> bool:
    """Whether a raw entry is a terminal event, without decoding its data."""
    return fields[T] in _TERMINAL_KINDS


# The Lua side of the same layout. An entry comes back from XREVRANGE as {id, {"t", type, "d", data}}.
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

# KEYS: events, arq job, arq queue, idempotency key or "" for none.
# ARGV: job id, queued data, arq job payload, arq job ttl ms, queue score ms, stream ttl s, idem ttl s.
_SUBMIT = """
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return existing end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[7])
end
redis.call('XADD', KEYS[1], '*', 't', 'queued', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return ARGV[1]
"""

# KEYS: events, cancel flag. ARGV: started data.
# Returns the entry id, or 'gone' (no stream), 'ended' (already terminal), 'cancel' (cancel requested).
_START = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if not t then return 'gone' end
if is_terminal(t) then return 'ended' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'cancel' end
return redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', 'started', 'd', ARGV[1])
"""
)

# KEYS: events. ARGV: type, data, ttl s. Returns the entry id, or false when the stream is gone or ended.
_TERMINAL = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if (not t) or is_terminal(t) then return false end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return id
"""
)

# KEYS: events, cancel flag, arq in-progress, arq job, arq queue.
# ARGV: job id, cancelled data, stream ttl s, cancel channel.
# A job no worker holds is taken off the queue and ends here; a running one is told over pub/sub
# (and by the flag, which a worker checks when it starts an attempt).
_CANCEL = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if not t then return 'unknown' end
if is_terminal(t) then return 'ended' end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('DEL', KEYS[4])
  redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', 'cancelled', 'd', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 'cancelled'
end
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 'signalled'
"""
)


class JobStream:
    """The atomic steps on job streams, bound to one Redis client.

    :param redis: a ``redis.asyncio.Redis`` (bytes responses).
    :param ttl_seconds: how long a finished job's stream stays readable.
    """

    def __init__(self, redis: Redis, *, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._submit = redis.register_script(_SUBMIT)
        self._start = redis.register_script(_START)
        self._terminal = redis.register_script(_TERMINAL)
        self._cancel = redis.register_script(_CANCEL)

    async def submit(
        self,
        job_id: str,
        queued: dict[str, Any],
        arq_payload: bytes,
        *,
        arq_ttl_ms: int,
        score_ms: int,
        queue_ttl_seconds: int,
        idempotency_key: str | None,
        idempotency_ttl_seconds: int,
    ) -> str:
        """Write ``queued`` and enqueue the arq job in one step; return the job id.

        With an idempotency key already used, nothing is written and the first job's id comes back.
        """
        result = await self._submit(
            keys=[
                keys.events(job_id),
                keys.arq_job(job_id),
                keys.QUEUE,
                keys.idempotency(idempotency_key) if idempotency_key else "",
            ],
            args=[
                job_id,
                jsonutil.dumps(queued),
                arq_payload,
                arq_ttl_ms,
                score_ms,
                queue_ttl_seconds,
                idempotency_ttl_seconds,
            ],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    async def start(self, job_id: str, attempt: int) -> str:
        """Append ``started``; return its id, or ``gone``, ``ended`` or ``cancel`` when it must not run."""
        result = await self._start(
            keys=[keys.events(job_id), keys.cancel_flag(job_id)],
            args=[jsonutil.dumps({"attempt": attempt})],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    async def end(self, job_id: str, type: str, data: Any) -> str | None:
        """Append the terminal event unless the job already has one; return its id or ``None``."""
        assert type in TERMINAL_TYPES, type
        result = await self._terminal(
            keys=[keys.events(job_id)], args=[type, jsonutil.dumps(data), self.ttl_seconds]
        )
        return result.decode() if result else None

    async def cancel(self, job_id: str) -> str:
        """Request cancellation: ``cancelled`` (it was queued and has ended), ``signalled`` (a worker
        holds it and will end it), ``ended`` (it had already ended) or ``unknown``."""
        result = await self._cancel(
            keys=[
                keys.events(job_id),
                keys.cancel_flag(job_id),
                keys.arq_in_progress(job_id),
                keys.arq_job(job_id),
                keys.QUEUE,
            ],
            args=[job_id, jsonutil.dumps({"partial": None}), self.ttl_seconds, keys.CANCEL_CHANNEL],
        )
        return result.decode() if isinstance(result, bytes) else str(result)
