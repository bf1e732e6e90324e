"""Settings: read once, at each entry point, and passed down.

Every variable has the prefix ``STREAMFLEET_`` and may also come from a ``.env`` file. The names in
the README's settings table are fixed; the rest tune the worker and the client. No other module reads the
environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigurationError
from .urls import cluster_url, is_cluster_url, is_sentinel_url, sentinel_url

EMBEDDED = "embedded"


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "streamfleet"


class Settings(BaseSettings):
    """Everything a streamfleet process is told by its environment.

    Secrets are ``SecretStr``: they never show in a ``repr`` or a log line.
    """

    model_config = SettingsConfigDict(
        env_prefix="STREAMFLEET_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    redis_url: str = Field(
        default=EMBEDDED,
        description="Redis for the queue (and the job streams, unless stream_redis_url says otherwise); "
        "unset or 'embedded' for the embedded server.",
    )
    stream_redis_url: str | None = Field(
        default=None,
        description="Redis for the job streams; unset: the queue's.",
    )
    upstream_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=AliasChoices("STREAMFLEET_UPSTREAM_BASE_URL", "OPENAI_BASE_URL", "upstream_base_url"),
    )
    upstream_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("STREAMFLEET_UPSTREAM_API_KEY", "OPENAI_API_KEY", "upstream_api_key"),
    )
    gateway_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    stream_ttl_seconds: int = Field(default=3600, gt=0)

    state_dir: Path = Field(default_factory=_default_state_dir)
    """Where the embedded server keeps its pidfile, address and log."""

    # Worker tuning.
    concurrency: int = Field(default=200, gt=0)
    """Jobs one worker process runs at once."""
    worker_processes: int | None = Field(default=None, gt=0)
    """Worker processes ``streamfleet worker`` runs under one supervisor; unset: the cores it may use."""
    wake_on_submit: bool = True
    """Idle workers take a job the moment it is submitted (pub/sub); off: they find it at their next poll."""
    poll_delay_seconds: float = Field(default=0.5, gt=0)
    """How often an idle worker looks at the queue when nothing wakes it (a submit wakes it at once)."""
    max_attempts: int = Field(default=4, ge=1)
    """Attempts per job, counting retries after upstream failures and after lost workers."""
    job_deadline_seconds: float = Field(default=600, gt=0)
    """The whole deadline of one job, retries included: then it ends in a ``timeout`` error."""
    connect_timeout_seconds: float = Field(default=10, gt=0)
    first_byte_timeout_seconds: float = Field(default=120, gt=0)
    """Longest wait for the upstream's first event (models that think first need a long one)."""
    idle_timeout_seconds: float = Field(default=60, gt=0)
    """Longest silence allowed between two upstream events: longer is a stall, and is retried."""
    retry_base_seconds: float = Field(default=0.5, ge=0)
    """First retry delay; it doubles each attempt (with jitter), up to ``retry_max_seconds``."""
    retry_max_seconds: float = Field(default=10, ge=0)
    upstream_max_event_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Longest SSE line, and most data in one event, an upstream may send (past it: a final error)."""
    upstream_max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    """Most bytes an upstream's answer may take once decompressed, per attempt (past it: a final error):
    what bounds a compressed body of endless valid events. 64 MiB holds a 128k-token answer in
    OpenAI's chunks (~40 MB)."""
    upstream_max_header_bytes: int = Field(default=64 * 1024, ge=4096)
    """Most bytes an upstream's status line and headers may take, together."""
    max_stream_events: int = Field(default=200_000, gt=0)
    """A runaway stream ends in an error after this many upstream events."""
    lease_seconds: float = Field(default=5, gt=0)
    """A running job whose worker has not renewed its lease for this long is given to another worker."""
    orphan_sweep_seconds: float = Field(default=300, gt=0)
    """How often one worker of the fleet looks for job streams that the queue has lost (and ends
    them); a stream must have been still for this long to count."""
    claim_pause_seconds: float = Field(default=0, ge=0)
    """Test only: how long a worker waits between claiming a job and starting it."""
    shutdown_grace_seconds: float = Field(default=25, ge=0)
    """On SIGTERM, how long running jobs may go on before they are handed back (Kubernetes'
    terminationGracePeriodSeconds is 30 by default)."""

    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Where a worker serves /metrics, /livez and /readyz (``--metrics-port`` overrides); none when unset."""
    metrics_host: str = "0.0.0.0"
    """The address the worker's metrics and probes bind (a pod's probes and scrapes come from outside it)."""
    log_format: Literal["auto", "json", "text"] = "auto"
    """``auto``: JSON lines unless stderr is a terminal."""

    # Gateway tuning.
    gateway_ping_seconds: float = Field(default=15, gt=0)
    """How often an idle SSE response gets a ``: ping`` comment."""
    gateway_max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    """Largest request line and headers of one request, together (a 431 past it)."""
    gateway_max_headers: int = Field(default=100, ge=8)
    """Most headers one request may carry (a 431 past it)."""
    gateway_cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated origins a browser page may call the gateway from (CORS); none by default."""
    gateway_token_secret: SecretStr | None = None
    """Signs the job-scoped read tokens for browsers; unset: derived from the API keys."""
    gateway_token_ttl_seconds: int = Field(default=900, gt=0, le=3600)
    """How long a read token is good for, unless its request asks for less."""
    gateway_stall_seconds: float = Field(default=15, gt=0)
    """A client that has read nothing for this long while the gateway had more to send is let go."""
    gateway_workers: int = Field(default=1, gt=0)
    """Gateway processes on one port (``--workers``), each with its own fan-out; as uvicorn's default, one."""

    # Client tuning.
    max_request_bytes: int = Field(default=1_000_000, gt=0)
    """Largest request body accepted at submit."""

    @field_validator("gateway_api_keys", "gateway_cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _blank_is_embedded(cls, value: object) -> object:
        return value if value else EMBEDDED

    @field_validator("stream_redis_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return value if value else None

    @field_validator("redis_url")
    @classmethod
    def _queue_not_on_a_cluster(cls, value: str) -> str:
        if is_cluster_url(value):
            raise ValueError(
                "the queue needs one primary (or Sentinels): a Redis Cluster holds the job streams, "
                "STREAMFLEET_STREAM_REDIS_URL"
            )
        return value

    @field_validator("redis_url", "stream_redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value == EMBEDDED:
            return value
        if is_cluster_url(value):
            cluster_url(value)  # raises, saying what is wrong
            return value
        if is_sentinel_url(value):
            sentinel_url(value)  # raises, saying what is wrong
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            raise ValueError(
                "a Redis URL is redis://host:port, rediss://host:port, unix:///path or "
                f"redis+sentinel://host:port[,host:port...]/service, not {value!r}"
            )
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the upstream base URL must be http:// or https:// with a host, not {value!r}")
        return value

    @property
    def uses_embedded_redis(self) -> bool:
        return self.redis_url == EMBEDDED


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment (and ``.env``), or ``ConfigurationError`` naming the first
    variable that is wrong, in one line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "settings"
        variable = name if name.isupper() else "STREAMFLEET_" + name.upper()  # an alias is the variable itself
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigurationError(f"{variable}: {message}") from None


def hide_password(url: str) -> str:
    """A URL fit for a log line or an error message: its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
