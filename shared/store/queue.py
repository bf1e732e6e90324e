"""The queue: arq's keys and ours beside them, and the one module that knows arq's internals.

arq owns this Redis: its queue (``arq:queue``, a sorted set of waiting job ids scored by when they may
start), its job entries (``arq:job:<id>``) and its claim markers (``arq:in-progress:<id>``). The fleet
adds leases (``sf:running``), worker heartbeats, idempotency keys, recent failures and two pub/sub
channels. Everything that depends on arq's key layout, its job payload or a non-public part of its
``Worker`` is here, and ``ARQ_SURFACE`` pins it: ``tests/test_arq_fence.py`` fails, naming what
changed, when an arq release moves any of it.

**How a job is held.** A worker claims jobs in one script: it takes up to its free slots of due ids
off the queue, marks them in progress as arq does, and leases each in ``sf:running`` in the same
step. From then until arq finishes the job (``FencedWorker.finish_job``, which drops the lease in the
same step as arq's own clean-up), the job is in exactly one of two places: waiting in ``arq:queue``,
or held under a lease. A worker renews the leases of what it holds; a lease that lapses (its worker
died) sends the job back to the queue (``requeue_lapsed``). Since held jobs are not in the queue,
the due range holds only jobs that can be claimed: no worker reads past running jobs to find them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from signal import Signals
from typing import Any, Final, NamedTuple

import arq
from arq.connections import ArqRedis
from arq.jobs import serialize_job
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import jsonutil
from . import keys
from .calls import Calls, Lua

logger = logging.getLogger(__name__)

FUNCTION: Final = "generate"
"""The arq function name every job is queued under."""
QUEUE_TTL_SECONDS: Final = 86_400
"""A job that waits in the queue longer than this expires (arq's default)."""
IDEMPOTENCY_TTL_SECONDS: Final = 86_400

_ALLOW_OOM = "#!lua flags=allow-oom\n"
"""Opens the scripts that move or drop what is there (claims, leases, finishing, requeuing): they run
even when Redis is full, so that held jobs keep their leases and end. Only a submit is refused."""

_NOW_MS = """
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
"""

WAKE_PENDING_MS: Final = 1000
"""How long a wake published stops the next ones (``keys.WAKE_PENDING``) if no claim follows it: all
workers busy or gone, or the message lost (an idle worker's own poll, every ``poll_delay_seconds``,
claims meanwhile)."""

# Publishes a job id on the channel that wakes idle workers, unless a wake is already on its way
# and no claim has looked at the queue since it left (the claim deletes the pending key first).
_WAKE = f"""
local function wake(pending, channel, id)
  if redis.call('SET', pending, '1', 'NX', 'PX', {WAKE_PENDING_MS}) then redis.call('PUBLISH', channel, id) end
end
"""

# KEYS: idempotency key or "", arq job, arq queue, wake pending. ARGV: job id, payload, job ttl ms,
# score ms, idempotency ttl s, the channel that wakes idle workers, arq's job key prefix.
# Returns {job id, 1 if arq still has the job}: a key used before returns the first job's id.
_ENQUEUE = Lua(
    _WAKE
    + """
if KEYS[1] ~= '' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {existing, redis.call('EXISTS', ARGV[7] .. existing)} end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
wake(KEYS[4], ARGV[6], ARGV[1])
return {ARGV[1], 1}
"""
)

# KEYS: arq queue, leases, wake pending. ARGV: how many, lease ms, in-progress ms, arq's prefixes of
# in-progress, job and try-counter keys, the counter's TTL (s).
# Takes the first due jobs off the queue, marks them in progress (arq's marker) and leases them, in
# one step; and reads and counts what arq's run_job would read and count as each starts (its entry,
# its try), so that starting it costs no round trip of its own (``FencedWorker``). Returns id, score,
# entry (or false), tries, for each job. (The keys of each job are derived here, undeclared: the queue
# lives on one primary, never on a cluster.)
_CLAIM = Lua(
    _ALLOW_OOM
    + _NOW_MS
    + """
local now = now_ms()
redis.call('DEL', KEYS[3])  -- the queue is looked at: a submit from now on wakes the workers again
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local lease_end = now + tonumber(ARGV[2])
local taken = {}
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZREM', KEYS[1], id)
  redis.call('SET', ARGV[4] .. id, '1', 'PX', ARGV[3])
  redis.call('ZADD', KEYS[2], lease_end, id)
  local tries = redis.call('INCR', ARGV[6] .. id)
  redis.call('EXPIRE', ARGV[6] .. id, ARGV[7])
  taken[#taken + 1] = id
  taken[#taken + 1] = due[i + 1]
  taken[#taken + 1] = redis.call('GET', ARGV[5] .. id)
  taken[#taken + 1] = tries
end
return taken
"""
)

# Leases use the server's clock, so the workers' clocks need not agree.
# KEYS: leases. ARGV: lease ms, job ids. Renews leases still held (XX: never revives one let go).
_RENEW = (
    _ALLOW_OOM
    + _NOW_MS
    + """
local lease_end = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', lease_end, ARGV[i]) end
return #ARGV - 1
"""
)

# KEYS: leases. ARGV: how many. The jobs whose lease has lapsed.
_LAPSED = Lua(
    _ALLOW_OOM
    + _NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

# KEYS: leases, arq queue, arq job, arq in-progress, wake pending. ARGV: job id, the channel that wakes
# idle workers.
# A held job whose lease lapsed goes back to the queue, due now (and idle workers are woken):
# 'requeued'; 'alive' if the lease was renewed meanwhile; 'lost' if arq no longer has the job (it
# can never run: the caller ends it).
_REQUEUE = Lua(
    _ALLOW_OOM
    + _NOW_MS
    + _WAKE
    + """
local now = now_ms()
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not lease) or tonumber(lease) > now then return 'alive' end
if redis.call('EXISTS', KEYS[3]) == 0 then return 'lost' end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('ZADD', KEYS[2], now, ARGV[1])
wake(KEYS[5], ARGV[2], ARGV[1])
return 'requeued'
"""
)

# KEYS: arq in-progress, arq job, arq retry, arq queue, leases, arq abort, wake pending. ARGV: job id,
# when to run it again (ms; "now"; or "" when it is finished), the channel that wakes idle workers.
# arq's finish_job (a MULTI of the same commands), and the lease goes in the same step.
_FINISH = Lua(
    _ALLOW_OOM
    + _NOW_MS
    + _WAKE
    + """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[2] == '' then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
else
  local at = ARGV[2] == 'now' and now_ms() or tonumber(ARGV[2])
  redis.call('ZADD', KEYS[4], at, ARGV[1])
  wake(KEYS[7], ARGV[3], ARGV[1])
end
return 1
"""
)

# KEYS: arq queue, leases, arq job. ARGV: job id.
# A cancelled job that no worker holds leaves the queue; a held one is left to its worker (it finds
# the job ended when it starts it, and arq finishes it as usual).
_DEQUEUE = Lua(
    _ALLOW_OOM
    + """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 'held' end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return 'removed'
"""
)


def payload(*, endpoint: str, request: dict[str, Any], tenant: str | None, enqueue_time_ms: int) -> bytes:
    """arq's job entry for one generation: JSON, not arq's default pickle (a queue should not execute
    what it reads). It carries the request body and the tenant, nothing secret."""
    data: bytes = serialize_job(
        FUNCTION,
        (),
        {"endpoint": endpoint, "request": request, "tenant": tenant},
        None,
        enqueue_time_ms,
        serializer=serialize,
    )
    return data


def serialize(value: dict[str, Any]) -> bytes:
    return jsonutil.dumps(value)


def deserialize(raw: bytes) -> dict[str, Any]:
    value: dict[str, Any] = jsonutil.loads(raw)
    kwargs = value.get("k")
    if isinstance(kwargs, dict) and isinstance(kwargs.get("request"), dict):
        kwargs["request"] = _Request(kwargs["request"])
    return value


class _Request(dict[str, Any]):
    """A job's request body as arq hands it to the job function. arq's run_job formats every job's
    arguments for a log line (``args_to_string``: the repr of the whole body, then cut to 80
    characters) even when that line is not logged: ~100 µs for a 50 KB chat history, on every job."""

    def __repr__(self) -> str:
        return f"<request: {len(self)} fields>"


def connect(pool: Any) -> ArqRedis:
    """The queue's client: arq's ``ArqRedis`` (a ``redis.asyncio.Redis``) with the fleet's serializer."""
    return ArqRedis(pool_or_conn=pool, job_serializer=serialize, job_deserializer=deserialize)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


ARQ_TRY_TTL_S: Final = 88_400
"""The TTL arq's run_job gives a job's try counter (``arq:retry:<id>``)."""


class Claimed(NamedTuple):
    """A job a claim took: its id, its score (when it was due, ms), its arq entry (None: it expired)
    and its try, counted."""

    job_id: str
    score: int
    entry: bytes | None
    tries: int


class QueueStore:
    """The queue's operations, bound to one client.

    :param redis: the queue's ``ArqRedis``.
    """

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self._calls = Calls(redis)
        self._renew = redis.register_script(_RENEW)  # rides in the heartbeat's pipeline

    async def ping(self) -> None:
        await self.redis.ping()

    async def enqueue(
        self, job_id: str, payload: bytes, *, score_ms: int, idempotency_key: str | None
    ) -> tuple[str, bool]:
        """Queue the job (step one of a submit); return its id and whether arq still has it.

        With an idempotency key already used, nothing is written and the first job's id comes back.
        """
        reply = await self._calls.run(
            _ENQUEUE,
            keys=[
                keys.idempotency(idempotency_key) if idempotency_key else "",
                keys.arq_job(job_id),
                keys.QUEUE,
                keys.WAKE_PENDING,
            ],
            args=[
                job_id,
                payload,
                QUEUE_TTL_SECONDS * 1000,
                score_ms,
                IDEMPOTENCY_TTL_SECONDS,
                keys.QUEUED_CHANNEL,
                keys.arq_job(""),
            ],
        )
        return _text(reply[0]), bool(reply[1])

    async def claim(self, limit: int, *, lease_ms: int, in_progress_ms: int) -> list[Claimed]:
        """Take up to ``limit`` due jobs for this worker, leased, each with its try counted."""
        reply = await self._calls.run(
            _CLAIM,
            keys=[keys.QUEUE, keys.RUNNING, keys.WAKE_PENDING],
            args=[
                limit,
                lease_ms,
                in_progress_ms,
                keys.arq_in_progress(""),
                keys.arq_job(""),
                keys.arq_retry(""),
                ARQ_TRY_TTL_S,
            ],
        )
        return [
            Claimed(_text(reply[i]), int(float(reply[i + 1])), reply[i + 2], int(reply[i + 3]))
            for i in range(0, len(reply), 4)
        ]

    async def lapsed(self, *, limit: int = 100) -> list[str]:
        """Held jobs whose lease has lapsed."""
        return [_text(job_id) for job_id in await self._calls.run(_LAPSED, keys=[keys.RUNNING], args=[limit])]

    async def requeue_lapsed(self, job_id: str) -> str:
        """Send a job whose lease lapsed back to the queue: ``requeued``, ``alive`` or ``lost``."""
        result = await self._calls.run(
            _REQUEUE,
            keys=[keys.RUNNING, keys.QUEUE, keys.arq_job(job_id), keys.arq_in_progress(job_id), keys.WAKE_PENDING],
            args=[job_id, keys.QUEUED_CHANNEL],
        )
        return _text(result)

    async def finish(self, job_id: str, *, again_at_ms: int | str | None) -> None:
        """Let go of a held job: finished (``again_at_ms`` None: arq's keys go), or back in the queue
        at that time (ms, or ``"now"``). Its lease goes either way."""
        await self._calls.run(
            _FINISH,
            keys=[
                keys.arq_in_progress(job_id),
                keys.arq_job(job_id),
                keys.arq_retry(job_id),
                keys.QUEUE,
                keys.RUNNING,
                keys.ARQ_ABORT,
                keys.WAKE_PENDING,
            ],
            args=[job_id, "" if again_at_ms is None else again_at_ms, keys.QUEUED_CHANNEL],
        )

    async def dequeue(self, job_id: str) -> str:
        """Take a cancelled job off the queue: ``removed``, or ``held`` (a worker has it)."""
        result = await self._calls.run(_DEQUEUE, keys=[keys.QUEUE, keys.RUNNING, keys.arq_job(job_id)], args=[job_id])
        return _text(result)

    async def publish_cancel(self, job_id: str) -> None:
        """Tell the worker that holds the job to cancel it."""
        await self.redis.publish(keys.CANCEL_CHANNEL, job_id)

    async def has_job(self, job_id: str) -> bool:
        """Whether arq still has the job's entry."""
        return bool(await self.redis.exists(keys.arq_job(job_id)))

    async def known(self, job_ids: list[str]) -> list[bool]:
        """For each job, whether the queue has it at all: waiting, held, or its arq entry."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.zscore(keys.QUEUE, job_id)
                pipe.zscore(keys.RUNNING, job_id)
                pipe.exists(keys.arq_job(job_id))
            found = await pipe.execute()
        return [any(found[i : i + 3]) for i in range(0, len(found), 3)]

    # Workers -----------------------------------------------------------------------------------------

    async def beat(
        self, worker_id: str, record: dict[str, Any], *, ttl_s: int, held: list[str], lease_ms: int
    ) -> tuple[int, int]:
        """One heartbeat round trip: renew the leases of ``held``, refresh the worker's record; return
        the queue's depth (waiting jobs) and how many jobs the fleet holds."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if held:
                await self._renew(keys=[keys.RUNNING], args=[lease_ms, *held], client=pipe)
            pipe.set(keys.worker(worker_id), jsonutil.dumps(record), ex=ttl_s)
            pipe.zcard(keys.QUEUE)
            pipe.zcard(keys.RUNNING)
            replies = await pipe.execute(raise_on_error=False)
        # The record may be refused (Redis full) where the leases were not: the leases matter.
        for position, reply in enumerate(replies):
            if isinstance(reply, Exception) and ((position == 0 and held) or not isinstance(reply, OutOfMemoryError)):
                raise reply
        if isinstance(replies[-3], OutOfMemoryError):
            logger.warning("worker %s: Redis is out of memory; its heartbeat record was not written", worker_id)
        return int(replies[-2]), int(replies[-1])

    async def forget_worker(self, worker_id: str) -> None:
        await self.redis.delete(keys.worker(worker_id))

    async def workers(self) -> list[dict[str, Any]]:
        """The live workers' heartbeat records."""
        records = []
        async for key in self.redis.scan_iter(match=keys.WORKER_PREFIX + "*", count=1000):
            raw = await self.redis.get(key)
            if raw:
                records.append(jsonutil.loads(raw))
        return records

    async def depth(self) -> int:
        """Jobs waiting in the queue."""
        return int(await self.redis.zcard(keys.QUEUE))

    async def held(self) -> int:
        """Jobs the fleet's workers hold (claimed, running, or between attempts)."""
        return int(await self.redis.zcard(keys.RUNNING))

    async def record_failure(self, job_id: str, error: dict[str, Any]) -> None:
        """Keep the job among the latest failures (``streamfleet status``)."""
        entry = {"id": job_id, "at": round(time.time(), 3), "type": error.get("type"), "message": error.get("message")}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(keys.FAILURES, jsonutil.dumps(entry))
            pipe.ltrim(keys.FAILURES, 0, keys.FAILURES_KEPT - 1)
            await pipe.execute()

    async def failures(self, count: int) -> list[dict[str, Any]]:
        raw: list[bytes] = await self.redis.lrange(keys.FAILURES, 0, count - 1)  # type: ignore[misc]
        return [jsonutil.loads(entry) for entry in raw]

    async def set_models(self, models: list[dict[str, Any]], *, ttl_s: int) -> None:
        """Keep the upstream's model list for the gateways."""
        await self.redis.set(keys.MODELS, jsonutil.dumps(models), ex=ttl_s)

    async def models(self) -> list[dict[str, Any]] | None:
        """The upstream's model list as a worker last read it, ``None`` if none has lately."""
        raw = await self.redis.get(keys.MODELS)
        if raw is None:
            return None
        models: list[dict[str, Any]] = jsonutil.loads(raw)
        return models

    async def take_sweep(self, worker_id: str, *, for_ms: int) -> bool:
        """Whether this worker may sweep for orphans now (one worker per period)."""
        return bool(await self.redis.set(keys.SWEEP_LOCK, worker_id, nx=True, px=for_ms))

    @contextlib.asynccontextmanager
    async def notifications(self, *, queued: bool) -> AsyncIterator[Notifications]:
        """Subscribe to cancel requests (and, with ``queued``, to submits)."""
        async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            channels = [keys.CANCEL_CHANNEL, *([keys.QUEUED_CHANNEL] if queued else [])]
            await pubsub.subscribe(*channels)
            yield Notifications(pubsub)


class Notifications:
    """Messages on the queue's channels: ``("cancel", job id)`` or ``("queued", job id)``."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub

    async def next(self, timeout: float) -> tuple[str, str] | None:
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        if not message or message.get("type") != "message":
            return None
        kind = "queued" if message["channel"] == keys.QUEUED_CHANNEL.encode() else "cancel"
        return kind, _text(message["data"])


# The arq fence ------------------------------------------------------------------------------------

ARQ_VERSION: Final = "0.28."
ARQ_SURFACE: Final[dict[str, str]] = {
    # What FencedWorker replaces or relies on, by the sha256 (first 16 hex digits) of arq's source.
    # Replaced: claiming (our script, leased), waiting (woken by submits), finishing (drops the lease).
    "Worker._poll_iteration": "f8d39d823a0a59f2",
    "Worker.finish_job": "903f09c92830d3fd",
    "Worker.finish_failed_job": "3e16087f318a7acf",
    # Relied on: main() polls through _poll_iteration; run_job reads arq:job:<id>, calls the function
    # with ctx job_id/enqueue_time/score, and ends through finish_job / finish_failed_job; the signal
    # handlers cancel `tasks` and stop picking jobs; heart_beat writes arq's health line each poll.
    "Worker.main": "45ca1591c9717466",
    "Worker.heart_beat": "2e9959bea66dc551",
    "Worker.run_job": "589a19059ff84ee7",
    "Worker.handle_sig": "985ff7ba01aa8f04",
    "Worker.handle_sig_wait_for_completion": "8f161d86834cc74e",
    "serialize_job": "1fc854cc50e16e5c",
}
"""Pinned by ``tests/test_arq_fence.py``."""
ARQ_ATTRIBUTES: Final = ("tasks", "allow_pick_jobs", "max_jobs", "burst", "loop", "in_progress_timeout_s", "_pool")
"""The attributes of arq's Worker that FencedWorker reads (and ``_pool``, its client, which it sets)."""


def arq_source_hash(name: str) -> str:
    """The sha256 (16 hex digits) of the source of an ``ARQ_SURFACE`` entry in the installed arq."""
    target: Any = arq.worker if name.startswith("Worker.") else arq.jobs
    for part in name.split("."):
        target = getattr(target, part)
    return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]


_UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
"""The queue's Redis cannot be reached (``stores.Unavailable`` less the cluster's errors: the queue is
never on a cluster): the poll and the finish wait and try again."""
FINISH_RETRY_S: Final = 15.0
"""How long finishing a job is tried again while the queue cannot be reached (a failover takes a few
seconds)."""
CLAIM_BATCH: Final = 16
"""The most jobs one poll claims. A burst is shared out: every woken worker claims a batch, starts
it, and claims again at once while jobs wait, and a busier worker comes back more slowly. Claiming
all its free slots at once, the first worker to wake took a whole burst of 200 and started them one
after another while the others idled (time to first token p99 ~200 ms against ~50 ms direct)."""


class _RunJobTransaction:
    """The transaction arq's ``run_job`` opens as a job starts (``ARQ_SURFACE`` pins it): GET its
    entry, INCR its try counter, EXPIRE the counter. The claim that took the job did just that
    (``QueueStore.claim``), so this one answers from the claim, with no round trip: through redis-py
    it cost ~130 µs of CPU and five replies read one by one (5 % of a worker at 2,000 streams), and
    one more wait before the upstream request. Any other transaction fails loudly: arq changed."""

    def __init__(self, claimed: dict[str, Claimed]) -> None:
        self._claimed = claimed
        self._commands: list[tuple[str, tuple[Any, ...]]] = []

    async def __aenter__(self) -> _RunJobTransaction:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._commands.clear()

    def get(self, key: str) -> None:
        self._commands.append(("get", (key,)))

    def incr(self, key: str) -> None:
        self._commands.append(("incr", (key,)))

    def expire(self, key: str, seconds: int) -> None:
        self._commands.append(("expire", (key, seconds)))

    async def execute(self) -> list[Any]:
        match self._commands:
            case [("get", (str(entry),)), ("incr", (counter,)), ("expire", (expiring, ttl))] if ttl == ARQ_TRY_TTL_S:
                job_id = entry.removeprefix(keys.arq_job(""))
                claim = self._claimed.pop(job_id, None) if counter == expiring == keys.arq_retry(job_id) else None
                if claim is not None:
                    return [claim.entry, claim.tries, True]
        raise RuntimeError(f"arq's run_job sent a transaction the fence does not know: {self._commands}")


class _WorkerPool:
    """arq's Redis client as ``FencedWorker`` hands it to arq: the queue's, but for the transactions,
    which only ``run_job`` opens (``_RunJobTransaction``)."""

    def __init__(self, queue: QueueStore, claimed: dict[str, Claimed]) -> None:
        self._queue = queue
        self._claimed = claimed

    def pipeline(self, transaction: bool = True) -> Any:
        # Without a transaction: arq's start-up reads INFO in a plain pipeline.
        return _RunJobTransaction(self._claimed) if transaction else self._queue.redis.pipeline(transaction=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue.redis, name)


class FencedWorker(Worker):
    """arq's ``Worker``, with claiming, waiting and finishing replaced (``ARQ_SURFACE``).

    - Claims in one script, up to its free slots, leased at once (``QueueStore.claim``), where arq
      claims one job per WATCH/MULTI and leaves a claimed job unguarded until it ends.
    - The transaction arq opens to start each job is answered from the claim (``_RunJobTransaction``).
    - Idle, it waits for ``wake`` (set on a submit and when a job ends) or ``poll_delay_s``.
    - Finishing a job drops its lease in the same step as arq's clean-up; a job arq gives up on
      (expired in the queue, unreadable) is first handed to ``on_given_up`` to be ended.
    - A Redis that blinks, or a job task that fails, does not end the poll loop.

    :param queue: the queue store.
    :param lease_ms: the lease a claim takes.
    :param wake: set by whoever knows there is work: the poll looks at the queue at once.
    :param poll_delay_s: the longest idle wait.
    :param on_signal: called when a shutdown signal arrives (before arq's own handling).
    :param on_given_up: ``(job id, expired)``: arq will not run the job; end it.
    :param kwargs: arq's ``Worker`` options.
    """

    def __init__(
        self,
        queue: QueueStore,
        *,
        lease_ms: int,
        wake: asyncio.Event,
        poll_delay_s: float,
        on_signal: Callable[[], None],
        on_given_up: Callable[[str, bool], Awaitable[None]],
        **kwargs: Any,
    ) -> None:
        super().__init__(redis_pool=queue.redis, poll_delay=0, **kwargs)
        self._claimed: dict[str, Claimed] = {}
        """Jobs claimed whose run_job has not read its claim yet (``_RunJobTransaction``)."""
        self._pool = _WorkerPool(queue, self._claimed)  # type: ignore[assignment]  # arq's client, less its transaction
        self.queue = queue
        self._lease_ms = lease_ms
        self._wake = wake
        self._poll_delay_s = poll_delay_s
        self._on_signal = on_signal
        self._on_given_up = on_given_up
        self._scores: dict[str, int] = {}
        self._finished: list[asyncio.Task[None]] = []
        """Job tasks done since the last poll, which takes them out of ``tasks``."""
        self._poll_failures = 0
        self._drained = False

    @property
    def held(self) -> list[str]:
        """The jobs this worker holds (claimed and not yet finished): their leases are renewed."""
        return [job_id for job_id, task in self.tasks.items() if not task.done()]

    async def _poll_iteration(self) -> None:
        self._wake.clear()  # before looking at the queue: a submit from now on sets it again
        finished, self._finished = self._finished, []  # not a walk over every running job, as arq's
        for task in finished:
            job_id = task.get_name()
            if self.tasks.get(job_id) is task:
                del self.tasks[job_id]
                self._scores.pop(job_id, None)
            if not task.cancelled() and task.exception() is not None:
                # arq would re-raise it here and end the worker; the job's lease lapses instead.
                logger.error("job %s: arq's run_job failed", job_id, exc_info=task.exception())
        taken: list[Claimed] = []
        wanted = min(self.max_jobs - len(self.tasks), CLAIM_BATCH)
        self._drained = False
        if self.allow_pick_jobs and wanted > 0:
            try:
                taken = await self.queue.claim(
                    wanted, lease_ms=self._lease_ms, in_progress_ms=int(self.in_progress_timeout_s * 1000)
                )
                self._poll_failures = 0
                # Fewer than asked: the queue is empty. A job's end then frees a slot with nothing to
                # fill it, and needs no claim: a submit (or a requeue) wakes the loop again.
                self._drained = len(taken) < wanted
            except _UNREACHABLE as exc:
                self._poll_failures += 1
                delay = min(0.05 * 2**self._poll_failures, 2.0)
                logger.warning("polling the queue failed (%s); again in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                return
        for claim in taken:
            job_id = claim.job_id
            self._scores[job_id], self._claimed[job_id] = claim.score, claim
            task = self.loop.create_task(self.run_job(job_id, claim.score), name=job_id)
            task.add_done_callback(self._slot_free)
            self.tasks[job_id] = task
        await self.heart_beat()
        if not taken and not self.burst:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_delay_s)

    def _slot_free(self, task: asyncio.Task[None]) -> None:
        self._finished.append(task)
        self._claimed.pop(task.get_name(), None)  # a task cancelled before it started
        if not self._drained:
            self._wake.set()  # jobs may be waiting for this slot: look at the queue now

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        # The fleet keeps no arq results (keep_result=0) and runs no cron jobs (keep_in_progress).
        score = self._scores.pop(job_id, None)
        again_at: int | str | None = None
        if not finish:
            # arq would ZINCRBY the job's score (still in its queue) by incr_score; ours left the queue
            # at the claim, so it goes back at that same time.
            again_at = score + incr_score if incr_score and score is not None else "now"
        # Through a Redis that blinks or fails over, the finish is tried again for a while; past that
        # the job's lease lapses and the reaper lets go of it (its stream has ended: nothing runs again).
        delay, give_up = 0.05, time.monotonic() + FINISH_RETRY_S
        while True:
            try:
                await self.queue.finish(job_id, again_at_ms=again_at)
                return
            except _UNREACHABLE as exc:
                if time.monotonic() > give_up:
                    logger.warning(
                        "job %s: the queue could not be told it finished (%s); its lease will lapse", job_id, exc
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        expired = not await self.queue.has_job(job_id)
        await self._on_given_up(job_id, expired)  # the job's end first, then the queue lets go of it
        self._scores.pop(job_id, None)
        await self.queue.finish(job_id, again_at_ms=None)

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        self._on_signal()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: Signals) -> None:
        self._on_signal()
        super().handle_sig(signum)
