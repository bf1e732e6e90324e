"""Every Redis key and channel name streamfleet uses, by role. Nothing outside ``shared.store`` spells one.

Two roles, possibly two servers (``shared.store`` has the whole map):

- the **queue** (``STREAMFLEET_REDIS_URL``): arq's keys, and ours beside them: leases, worker
  heartbeats, idempotency keys, recent failures, the orphan sweep's lock, the pub/sub channels.
- the **stream store** (``STREAMFLEET_STREAM_REDIS_URL``): everything keyed by one job. Each such key
  carries the job id as a hash tag, ``sf:{<job_id>}:...``, so a job's keys share a Redis Cluster slot.
"""

from __future__ import annotations

from typing import Final

from arq.constants import abort_jobs_ss, default_queue_name, in_progress_key_prefix, job_key_prefix, retry_key_prefix

FORMAT: Final = 1
"""The version of the entry format (``shared.store.codec``). It is part of the stream's key
(``events``): a reader of one format never meets another's entries. ``docs/stream-format.md`` is its
specification."""

# The queue ------------------------------------------------------------------------------------------

QUEUE: Final = default_queue_name
"""arq's queue: a sorted set of the ids of waiting jobs, scored by the time (ms) they may start."""
ARQ_ABORT: Final = abort_jobs_ss
"""arq's set of jobs to abort (unused by the fleet, which cancels its own way; cleared as arq does)."""

RUNNING: Final = "sf:running"
"""Sorted set of the jobs workers hold (claimed, waiting to start, running, between attempts), scored
by when their lease ends (ms, the server's clock)."""
WORKER_PREFIX: Final = "sf:worker:"
FAILURES: Final = "sf:failures"
"""List of the latest jobs that ended in ``error`` (newest first), for ``streamfleet status``."""
FAILURES_KEPT: Final = 50
MODELS: Final = "sf:models"
"""The upstream's model list (JSON), as a worker last read it, for the gateway's ``/v1/models``."""
SWEEP_LOCK: Final = "sf:sweep"
"""Held (SET NX PX) by the one worker that sweeps the stream store for orphans."""

CANCEL_CHANNEL: Final = "sf:cancel"
"""Pub/sub channel on which a cancel request names its job id, so the worker that holds it acts at once."""
QUEUED_CHANNEL: Final = "sf:queued"
"""Pub/sub channel a submit publishes on, so an idle worker takes the job now, not at its next poll."""
WAKE_PENDING: Final = "sf:queued:pending"
"""Set (NX, with a short TTL) by the publish on ``QUEUED_CHANNEL``, deleted by every claim: while it
is there a wake is on its way and no claim has looked at the queue since, so a submit need not
publish again. One wake per claim instead of one per submit, each received by every worker."""


def arq_job(job_id: str) -> str:
    """arq's job entry: the function, its arguments and the enqueue time (JSON, see ``queue.payload``)."""
    return job_key_prefix + job_id


def arq_in_progress(job_id: str) -> str:
    """arq's claim marker: set while a worker holds the job."""
    return in_progress_key_prefix + job_id


def arq_retry(job_id: str) -> str:
    """arq's count of the times it ran the job function."""
    return retry_key_prefix + job_id


def worker(worker_id: str) -> str:
    """A live worker's heartbeat: expires when the worker stops refreshing it."""
    return WORKER_PREFIX + worker_id


def idempotency(key: str) -> str:
    """Maps a caller's idempotency key (prefixed by its tenant) to the job id it created."""
    return "sf:idem:" + key


# The stream store -----------------------------------------------------------------------------------

EVENTS_PATTERN: Final = f"sf:{{*}}:events:v{FORMAT}"
"""Matches every job's event stream (the orphan sweep's SCAN)."""


def events(job_id: str) -> str:
    """The job's event stream: every event of every attempt, in order, in entry format ``FORMAT``
    (the version is in the name, so a reader of one format never meets another's entries)."""
    return f"sf:{{{job_id}}}:events:v{FORMAT}"


LIVE_SUFFIX: Final = ":live"
"""On a Redis Cluster, the sharded pub/sub channel ``events(job_id) + LIVE_SUFFIX`` (in the job's slot)
announces each entry appended to the job's stream by its id (``shared.store.live``)."""


def live_channel(stream: str) -> str:
    """The live channel of a job's stream key."""
    return stream + LIVE_SUFFIX


def stream_of_channel(channel: str) -> str:
    """The stream key a live channel announces."""
    return channel.removesuffix(LIVE_SUFFIX)


def cancel_flag(job_id: str) -> str:
    """Set when a cancel is requested, so a worker that starts the job late still sees it."""
    return f"sf:{{{job_id}}}:cancel"


def owner(job_id: str) -> str:
    """The ``started`` id of the attempt that owns the job: only it may write the terminal event."""
    return f"sf:{{{job_id}}}:attempt"


def attempts(job_id: str) -> str:
    """How many attempts the job has started: numbers them across workers and bounds them."""
    return f"sf:{{{job_id}}}:attempts"


def tenant(job_id: str) -> str:
    """Which gateway tenant submitted the job (a hash of its key, never the key)."""
    return f"sf:{{{job_id}}}:tenant"


def job_keys(job_id: str) -> tuple[str, ...]:
    """Every stream-store key of one job."""
    return (events(job_id), cancel_flag(job_id), owner(job_id), attempts(job_id), tenant(job_id))


def job_of(events_key: bytes | str) -> str:
    """The job id inside an events key."""
    text = events_key.decode() if isinstance(events_key, bytes) else events_key
    return text[text.index("{") + 1 : text.rindex("}")]


def wake(gateway: str, index: int) -> str:
    """A fan-out reader's wake-up stream (a gateway's, or a client's: the prefix is historical):
    written when a stream joins its XREAD."""
    return f"sf:gateway:{gateway}:{index}"
