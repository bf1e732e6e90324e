"""The atomic steps of a job's life, as Lua scripts: submit, start an attempt, end, cancel.

Each is one round trip and cannot interleave with another. Together they keep the contract's
central rule: a job's stream ends with exactly one terminal event, and nothing is appended after it.
The scripts read an entry's ``t`` field, the type, as ``shared.jobstream`` lays it out.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from . import jsonutil, keys
from .models import TERMINAL_TYPES

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

# KEYS: events, cancel flag, current attempt. ARGV: started data.
# Returns the started entry's id, or 'gone' (no stream), 'ended' (terminal), 'cancel' (cancel requested).
# The current-attempt key names the attempt that owns the stream: only it may end the job.
_START = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if not t then return 'gone' end
if is_terminal(t) then return 'ended' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'cancel' end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', 'started', 'd', ARGV[1])
redis.call('SET', KEYS[3], id)
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
return id
"""
)

# KEYS: events, current attempt. ARGV: type, data, ttl s, the ending attempt's started id or "".
# Returns the entry id, or false when the stream is gone, has ended, or belongs to a newer attempt.
_TERMINAL = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if (not t) or is_terminal(t) then return false end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return false end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return id
"""
)

# KEYS: events, cancel flag, arq in-progress, arq job, arq queue.
# ARGV: job id, cancelled data, stream ttl s, cancel channel.
# A job no worker holds is taken off the queue and ends here; a running one is told over pub/sub
# (and by the flag, which a worker checks when it starts an attempt and every second while it runs).
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


def _text(result: Any) -> str:
    return result.decode() if isinstance(result, bytes) else str(result)


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
        return _text(result)

    async def start(self, job_id: str, attempt: int) -> str:
        """Append ``started``; return its id, or ``gone``, ``ended`` or ``cancel`` when it must not run."""
        result = await self._start(
            keys=[keys.events(job_id), keys.cancel_flag(job_id), keys.attempt(job_id)],
            args=[jsonutil.dumps({"attempt": attempt})],
        )
        return _text(result)

    async def end(self, job_id: str, type: str, data: Any, *, started_id: str | None = None) -> str | None:
        """Append the terminal event unless the job already has one; return its id or ``None``.

        :param started_id: the ending attempt's ``started`` id: refused if a newer attempt owns the job.
        """
        assert type in TERMINAL_TYPES, type
        result = await self._terminal(
            keys=[keys.events(job_id), keys.attempt(job_id)],
            args=[type, jsonutil.dumps(data), self.ttl_seconds, started_id or ""],
        )
        return _text(result) if result else None

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
        return _text(result)
