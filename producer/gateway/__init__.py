"""The HTTP gateway: the jobs API, OpenAI-compatible routes, one-connection fan-out."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
from typing import Any

import uvicorn

from shared import processes
from shared.errors import ConfigurationError
from shared.settings import Settings

from .app import create_app
from .limits import bounded_by

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve"]


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, workers: int | None = None) -> None:
    """Run the gateway on uvicorn with uvloop. Without API keys it binds loopback only.

    :param workers: processes on the one port (default: ``STREAMFLEET_GATEWAY_WORKERS``): uvicorn's
        supervisor starts them, restarts one that dies and stops them all on SIGTERM; each has its own
        fan-out and loads ``producer.gateway.asgi``; ``/metrics`` adds up all of them.
    """
    workers = workers or settings.gateway_workers
    if not settings.gateway_api_keys and not _is_loopback(host):
        raise ConfigurationError(
            f"refusing to bind {host} with no STREAMFLEET_GATEWAY_API_KEYS: anyone could read every job; "
            "set keys, or bind 127.0.0.1"
        )
    logger.info(
        "gateway: listening on http://%s:%d (%s; %d %s)",
        host,
        port,
        "keys required" if settings.gateway_api_keys else "no keys",
        workers,
        "process" if workers == 1 else "processes",
    )
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "log_level": "warning",
        "log_config": None,  # uvicorn's lines go through the process's own (JSON) logging
        "access_log": False,
        "timeout_graceful_shutdown": 5,
    }
    if workers == 1:
        uvicorn.run(create_app(settings), http=bounded_by(settings), **options)
        return
    # uvicorn starts each process afresh and imports the app and the protocol by name.
    series = processes.metrics_directory()
    try:
        uvicorn.run("producer.gateway.asgi:app", http="producer.gateway.asgi:Protocol", workers=workers, **options)
    finally:
        shutil.rmtree(series, ignore_errors=True)
