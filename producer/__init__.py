"""Everything a backend service uses: submitting, tailing, waiting, cancelling; the CLI."""

from shared.errors import (
    ConfigurationError,
    InvalidRequest,
    JobCancelled,
    JobEnded,
    JobFailed,
    StorageFull,
    StreamfleetError,
    UnknownJob,
)
from shared.models import Event, Result
from shared.settings import Settings

from .client import FleetClient

__all__ = [
    "ConfigurationError",
    "Event",
    "FleetClient",
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
