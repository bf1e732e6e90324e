"""Every Redis key streamfleet uses, in one place.

A job's own keys carry its id as a hash tag (``sf:{<job_id>}:...``) so they share a Redis Cluster
slot. arq's keys (``arq:queue``, ``arq:job:<id>``, ``arq:in-progress:<id>``) are arq's and are named
here only so that nothing else spells them.
"""

from __future__ import annotations

from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix

QUEUE = default_queue_name
"""arq's queue: a sorted set of job ids scored by the time they may start."""

CANCEL_CHANNEL = "sf:cancel"
"""Pub/sub channel on which a cancel request names its job id, so a running worker acts at once."""

QUEUED_CHANNEL = "sf:queued"
"""Pub/sub channel a submit publishes on, so an idle worker takes the job now, not at its next poll."""

WORKER_PREFIX = "sf:worker:"

FAILURES = "sf:failures"
"""List of the latest jobs that ended in ``error`` (newest first), for ``streamfleet status``."""
FAILURES_KEPT = 50

RUNNING = "sf:running"
"""Sorted set of running job ids, scored by when their lease ends (ms): a job whose worker stops
renewing it is given to another worker."""


def events(job_id: str) -> str:
    """The job's event stream: every event of every attempt, in order."""
    return f"sf:{{{job_id}}}:events"


def cancel_flag(job_id: str) -> str:
    """Set when a cancel is requested, so a worker that starts the job late still sees it."""
    return f"sf:{{{job_id}}}:cancel"


def attempt(job_id: str) -> str:
    """The ``started`` id of the attempt that owns the job: only it may write the terminal event."""
    return f"sf:{{{job_id}}}:attempt"


def attempts(job_id: str) -> str:
    """How many attempts the job has started: numbers them across workers and bounds them."""
    return f"sf:{{{job_id}}}:attempts"


def tenant(job_id: str) -> str:
    """Which gateway tenant submitted the job (a hash of its key, never the key)."""
    return f"sf:{{{job_id}}}:tenant"


def idempotency(key: str) -> str:
    """Maps a caller's idempotency key to the job id it created."""
    return f"sf:idem:{key}"


def worker(worker_id: str) -> str:
    """A live worker's heartbeat: expires when the worker stops refreshing it."""
    return f"{WORKER_PREFIX}{worker_id}"


def arq_job(job_id: str) -> str:
    return job_key_prefix + job_id


def arq_in_progress(job_id: str) -> str:
    return in_progress_key_prefix + job_id
