"""What the worker and the producer agree on: settings, models, key names, the job-stream format,
SSE parsing and accumulation. Imports neither ``worker`` nor ``producer``."""

from .errors import (
    ConfigurationError,
    InvalidRequest,
    JobCancelled,
    JobEnded,
    JobFailed,
    StorageFull,
    StreamfleetError,
    UnknownJob,
)
from .models import Event, Result
from .settings import Settings

__all__ = [
    "ConfigurationError",
    "Event",
    "InvalidRequest",
    "JobCancelled",
    "JobEnded",
    "JobFailed",
    "Result",
    "Settings",
    "StorageFull",
    "StreamfleetError",
    "UnknownJob",
]
