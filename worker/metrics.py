"""The worker's Prometheus metrics, served with its health on ``--metrics-port`` (``worker.health``).

Per-delta work is two cheap calls (a counter and a histogram bucket); bytes are counted per write
batch. The fleet-wide gauges (queue depth, running jobs) are read by every worker's heartbeat, so an
autoscaler can scale on them from any one worker (``max`` over the workers' series).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from shared.models import TERMINAL_TYPES

disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``_created`` series beside every counter and histogram

JOBS = Counter("streamfleet_jobs_total", "Jobs this worker ended, by outcome (done, error, cancelled)", ["outcome"])
ATTEMPTS = Counter("streamfleet_attempts_total", "Attempts this worker started (a retried job counts each)")
HANDED_BACK = Counter("streamfleet_jobs_handed_back_total", "Jobs given back to the queue at shutdown")
QUEUE_WAIT = Histogram(
    "streamfleet_queue_wait_seconds",
    "From submit to the start of the job's first attempt",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "streamfleet_time_to_first_token_seconds",
    "From the start of an attempt to its first delta (the upstream's own time to first token included)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
INTER_TOKEN = Histogram(
    "streamfleet_inter_token_seconds",
    "Between two consecutive deltas of one attempt (one gap in 32 is observed)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DELTAS = Counter("streamfleet_deltas_total", "Deltas published to job streams")
STORAGE_FULL = Counter("streamfleet_storage_full_total", "Writes Redis refused for lack of memory (maxmemory reached)")
PUBLISHED_BYTES = Counter("streamfleet_published_bytes_total", "Bytes of stream entries written to Redis")
UPSTREAM_ERRORS = Counter(
    "streamfleet_upstream_errors_total",
    "Failed upstream attempts, by the error's type (upstream_error, upstream_unreachable, timeout)",
    ["type"],
)
# multiprocess_mode: how a pool's children add up (``worker.pool``); ignored in a single process.
OPEN_STREAMS = Gauge(
    "streamfleet_open_streams", "Upstream streams this worker has open now", multiprocess_mode="livesum"
)
RUNNING_JOBS = Gauge(
    "streamfleet_worker_running_jobs",
    "Jobs this worker holds (streaming, between attempts, or claimed), as of its last heartbeat",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "streamfleet_queue_depth", "Jobs waiting for a worker, fleet-wide (read at each heartbeat)", multiprocess_mode="max"
)
FLEET_RUNNING = Gauge(
    "streamfleet_fleet_running_jobs", "Jobs running, fleet-wide (read at each heartbeat)", multiprocess_mode="max"
)

# Every label value from the start, so a rate over a series that has not happened yet is 0, not absent.
for _outcome in TERMINAL_TYPES:
    JOBS.labels(_outcome)
for _type in ("upstream_error", "upstream_unreachable", "timeout"):
    UPSTREAM_ERRORS.labels(_type)
