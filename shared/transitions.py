"""The atomic steps of a job's life, as Lua scripts: submit, start an attempt, end, cancel.

Each is one round trip and cannot interleave with another. Together they keep the contract's
central rule: a job's stream ends with exactly one terminal event, and nothing is appended after it.
The scripts read an entry's ``t`` field, the type, as ``shared.jobstream`` lays it out.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from redis.asyncio import Redis

from . import jsonutil, keys
from .models import ERROR, TERMINAL_TYPES, make_error

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
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""

# KEYS: events, arq job, arq queue, idempotency key or "", tenant.
# ARGV: job id, queued data, arq job payload, arq job ttl ms, queue score ms, stream ttl s, idem ttl s,
# tenant or "", the channel that wakes idle workers.
_SUBMIT = """
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return existing end
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[7])
end
redis.call('XADD', KEYS[1], '*', 't', 'queued', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[8] ~= '' then redis.call('SET', KEYS[5], ARGV[8], 'EX', ARGV[6]) end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('PUBLISH', ARGV[9], ARGV[1])
return ARGV[1]
"""

# KEYS: events, cancel flag, owner, attempts, running. ARGV: job id, lease ms, max attempts.
# Returns {'started', attempt, id}, {'exhausted', attempt}, or {'gone'} (no stream), {'ended'}
# (terminal), {'cancel'} (cancel requested). The owner key names the attempt that may end the job;
# the running set holds its lease.
_START = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if not t then return {'gone'} end
if is_terminal(t) then return {'ended'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancel'} end
local ttl = redis.call('TTL', KEYS[1])
local n = redis.call('INCR', KEYS[4])
if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
if t ~= 'queued' and t ~= 'retry' then
  -- The previous attempt ended without a word (its worker was lost): void it before the next.
  redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', 'retry', 'd', '{"attempt":' .. (n - 1) ..
    ',"error":{"type":"worker_lost","message":"the attempt ended without a word: its worker was lost",' ..
    '"status":null,"upstream":null},"delay_s":0}')
end
if n > tonumber(ARGV[3]) then return {'exhausted', n} end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', 'started', 'd', '{"attempt":' .. n .. '}')
redis.call('SET', KEYS[3], id)
if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
redis.call('ZADD', KEYS[5], now_ms() + tonumber(ARGV[2]), ARGV[1])
return {'started', n, id}
"""
)

# KEYS: events, owner, attempts, running, tenant. ARGV: type, data, ttl s, the ending attempt's started id
# or "", job id. Returns the entry id, or false when the stream is gone, has ended, or belongs to
# another attempt.
_TERMINAL = (
    _LAST_TYPE
    + """
local t = last_type(KEYS[1])
if (not t) or is_terminal(t) then return false end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return false end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', 't', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[5])
if ARGV[6] ~= '' then
  redis.call('LPUSH', KEYS[6], ARGV[6])
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[7]) - 1)
end
return id
"""
)

# KEYS: running, events, owner, attempts, arq in-progress, arq job, arq queue.
# ARGV: job id, worker_lost error JSON, ttl s.
# A job whose lease has lapsed: its worker is gone. It goes back to the queue, announced by a
# `retry` (unless its worker already handed it back), and its lost attempt may no longer end it.
# If arq no longer has the job, it can never run again: it ends in `error` here.
_RECLAIM = (
    _LAST_TYPE
    + """
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) > now then return 'alive' end
redis.call('ZREM', KEYS[1], ARGV[1])
local t = last_type(KEYS[2])
if not t then return 'gone' end
if is_terminal(t) then return 'ended' end
if redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', 't', 'error', 'd', '{"error":' .. ARGV[2] .. ',"partial":null}')
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 'lost'
end
if t ~= 'retry' then
  local n = redis.call('GET', KEYS[4]) or '0'
  redis.call('XADD', KEYS[2], 'NOMKSTREAM', '*', 't', 'retry', 'd',
             '{"attempt":' .. n .. ',"error":' .. ARGV[2] .. ',"delay_s":0}')
end
redis.call('SET', KEYS[3], 'reclaimed', 'KEEPTTL')
redis.call('DEL', KEYS[5])
redis.call('ZADD', KEYS[7], now, ARGV[1])
return 'requeued'
"""
)

# Leases use the server's clock, so the workers' clocks need not agree.
# KEYS: running. ARGV: lease ms, job ids. Renews the leases of jobs still running (XX: never revives
# one that ended or was reclaimed).
_RENEW = (
    _LAST_TYPE
    + """
local lease_end = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', lease_end, ARGV[i]) end
return #ARGV - 1
"""
)

# KEYS: running, arq in-progress, arq queue. ARGV: job id.
# A worker shutting down gives a running job back: runnable at once by another worker.
_HAND_BACK = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], 'NX', redis.call('TIME')[1] * 1000, ARGV[1])
return 1
"""

# KEYS: arq queue, then each job's arq in-progress key. ARGV: in-progress ms, then the job ids.
# arq's own claim, for a batch in one call: a job is taken if it is due and no worker holds it.
# Returns id, score pairs of the jobs taken.
_CLAIM = """
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local taken = {}
for i = 2, #KEYS do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now and redis.call('SET', KEYS[i], '1', 'PX', ARGV[1], 'NX') then
    taken[#taken + 1] = id
    taken[#taken + 1] = score
  end
end
return taken
"""

# KEYS: running. ARGV: how many. The jobs whose lease has lapsed.
_LAPSED = (
    _LAST_TYPE
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

# KEYS: events, cancel flag, arq in-progress, arq job, arq queue, tenant.
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
  redis.call('EXPIRE', KEYS[6], ARGV[3])
  return 'cancelled'
end
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 'signalled'
"""
)


class Start(NamedTuple):
    """What ``JobStream.start`` found: ``status`` is ``started`` (with ``attempt`` and ``started_id``),
    ``exhausted`` (the attempt would be one too many), ``gone``, ``ended`` or ``cancel``."""

    status: str
    attempt: int
    started_id: str


def _text(result: Any) -> str:
    return result.decode() if isinstance(result, bytes) else str(result)


def _failure(job_id: str, error: Any) -> bytes:
    """A job's entry in the list of recent failures (``keys.FAILURES``)."""
    record = {"id": job_id, "at": round(time.time(), 3), "type": error.get("type"), "message": error.get("message")}
    return jsonutil.dumps(record)


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
        self._reclaim = redis.register_script(_RECLAIM)
        self._renew = redis.register_script(_RENEW)
        self._lapsed = redis.register_script(_LAPSED)
        self._hand_back = redis.register_script(_HAND_BACK)
        self._claim = redis.register_script(_CLAIM)

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
        tenant: str | None = None,
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
                keys.tenant(job_id),
            ],
            args=[
                job_id,
                jsonutil.dumps(queued),
                arq_payload,
                arq_ttl_ms,
                score_ms,
                queue_ttl_seconds,
                idempotency_ttl_seconds,
                tenant or "",
                keys.QUEUED_CHANNEL,
            ],
        )
        return _text(result)

    async def start(self, job_id: str, *, lease_ms: int, max_attempts: int) -> Start:
        """Open the job's next attempt: number it, append ``started``, take its lease."""
        reply = await self._start(
            keys=[
                keys.events(job_id),
                keys.cancel_flag(job_id),
                keys.attempt(job_id),
                keys.attempts(job_id),
                keys.RUNNING,
            ],
            args=[job_id, lease_ms, max_attempts],
        )
        status = _text(reply[0])
        attempt = int(reply[1]) if len(reply) > 1 else 0
        started_id = _text(reply[2]) if len(reply) > 2 else ""
        return Start(status, attempt, started_id)

    async def end(self, job_id: str, type: str, data: Any, *, started_id: str | None = None) -> str | None:
        """Append the terminal event unless the job already has one; return its id or ``None``.

        :param started_id: the ending attempt's ``started`` id: refused if another attempt owns the job.
        """
        assert type in TERMINAL_TYPES, type
        failure = _failure(job_id, data.get("error") or {}) if type == ERROR else b""
        result = await self._terminal(
            keys=[
                keys.events(job_id),
                keys.attempt(job_id),
                keys.attempts(job_id),
                keys.RUNNING,
                keys.tenant(job_id),
                keys.FAILURES,
            ],
            args=[type, jsonutil.dumps(data), self.ttl_seconds, started_id or "", job_id, failure, keys.FAILURES_KEPT],
        )
        return _text(result) if result else None

    async def claim(self, job_ids: list[str], *, in_progress_ms: int) -> list[tuple[str, int]]:
        """Take the due jobs among ``job_ids`` from arq's queue for this worker, as arq's own claim
        does one job at a time (WATCH, EXISTS, ZSCORE, MULTI): ``(job id, score)`` of those taken."""
        reply = await self._claim(
            keys=[keys.QUEUE, *(keys.arq_in_progress(job_id) for job_id in job_ids)], args=[in_progress_ms, *job_ids]
        )
        return [(_text(job_id), int(float(score))) for job_id, score in zip(reply[::2], reply[1::2], strict=True)]

    async def renew(self, job_ids: list[str], *, lease_ms: int) -> None:
        """Renew the leases of the jobs this worker runs."""
        if job_ids:
            await self._renew(keys=[keys.RUNNING], args=[lease_ms, *job_ids])

    async def lapsed(self, *, limit: int = 100) -> list[str]:
        """Running jobs whose lease has lapsed."""
        return [_text(job_id) for job_id in await self._lapsed(keys=[keys.RUNNING], args=[limit])]

    async def hand_back(self, job_id: str) -> None:
        """Give a running job back to the queue (its worker is shutting down): drop its lease and
        arq's in-progress mark, so another worker takes it now."""
        await self._hand_back(keys=[keys.RUNNING, keys.arq_in_progress(job_id), keys.QUEUE], args=[job_id])

    async def reclaim(self, job_id: str) -> str:
        """Give a job whose lease lapsed to another worker: ``requeued``, ``lost`` (ended in error),
        ``ended``, ``gone``, or ``alive`` (its lease was renewed meanwhile)."""
        error = make_error("worker_lost", "the worker running this job stopped renewing its lease")
        result = await self._reclaim(
            keys=[
                keys.RUNNING,
                keys.events(job_id),
                keys.attempt(job_id),
                keys.attempts(job_id),
                keys.arq_in_progress(job_id),
                keys.arq_job(job_id),
                keys.QUEUE,
            ],
            args=[job_id, jsonutil.dumps(error), self.ttl_seconds],
        )
        outcome = _text(result)
        if outcome == "lost":
            pipe = self.redis.pipeline(transaction=False)
            pipe.lpush(keys.FAILURES, _failure(job_id, error))
            pipe.ltrim(keys.FAILURES, 0, keys.FAILURES_KEPT - 1)
            await pipe.execute()
        return outcome

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
                keys.tenant(job_id),
            ],
            args=[job_id, jsonutil.dumps({"partial": None}), self.ttl_seconds, keys.CANCEL_CHANNEL],
        )
        return _text(result)
