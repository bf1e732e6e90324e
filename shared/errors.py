"""The exceptions a streamfleet user can meet.

    StreamfleetError
    ├── ConfigurationError      a setting is wrong, or the embedded server cannot start
    ├── InvalidRequest          the request was refused before anything was queued
    ├── StorageFull             Redis is out of memory: the job could not be queued
    ├── UnknownJob              no job has this id (never submitted, or expired)
    └── JobEnded                the job ended without a result; ``.data`` is its terminal event's data
        ├── JobFailed           it ended in ``error``; ``.error`` is the contract's Error object
        └── JobCancelled        it ended in ``cancelled``

``result(timeout=...)`` raises the built-in ``TimeoutError``.
"""

from __future__ import annotations

from typing import Any


class StreamfleetError(Exception):
    """Root of every streamfleet exception."""


class ConfigurationError(StreamfleetError):
    """A setting is wrong or a required service cannot be reached at start."""


class InvalidRequest(StreamfleetError, ValueError):
    """The request cannot be submitted; nothing was queued."""


class StorageFull(StreamfleetError):
    """Redis refused a write for lack of memory (``maxmemory`` reached under ``noeviction``)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"Redis is out of memory ({what}): free memory, raise maxmemory, or lower STREAMFLEET_STREAM_TTL_SECONDS"
        )


class UnknownJob(StreamfleetError, KeyError):
    """No job has this id: it was never submitted, or its retention time has passed."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"unknown job id {self.job_id!r}: never submitted, or expired after its retention time"


class JobEnded(StreamfleetError):
    """The job ended without a result."""

    def __init__(self, job_id: str, data: dict[str, Any]) -> None:
        self.job_id = job_id
        self.data = data
        super().__init__(self._describe())

    def _describe(self) -> str:
        return f"job {self.job_id} ended without a result"


class JobFailed(JobEnded):
    """The job ended in an ``error`` event."""

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.data.get("error") or {}
        return error

    def _describe(self) -> str:
        error = self.data.get("error") or {}
        return f"job {self.job_id} failed: {error.get('type')}: {error.get('message')}"


class JobCancelled(JobEnded):
    """The job ended in a ``cancelled`` event."""

    def _describe(self) -> str:
        return f"job {self.job_id} was cancelled"
