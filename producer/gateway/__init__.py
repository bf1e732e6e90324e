"""The HTTP gateway: the jobs API, OpenAI-compatible routes, one-connection fan-out."""

from __future__ import annotations

import ipaddress
import logging
import socket

import uvicorn

from shared.errors import ConfigurationError
from shared.settings import Settings

from .app import create_app
from .limits import bounded

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve"]


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the gateway on uvicorn with uvloop. Without API keys it binds loopback only."""
    if not settings.gateway_api_keys and not _is_loopback(host):
        raise ConfigurationError(
            f"refusing to bind {host} with no STREAMFLEET_GATEWAY_API_KEYS: anyone could read every job; "
            "set keys, or bind 127.0.0.1"
        )
    logger.info(
        "gateway: listening on http://%s:%d (%s)",
        host,
        port,
        "keys required" if settings.gateway_api_keys else "no keys",
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http=bounded(
            max_head_bytes=settings.gateway_max_header_bytes,
            max_headers=settings.gateway_max_headers,
            stall_seconds=settings.gateway_stall_seconds,
        ),
        log_level="warning",
        log_config=None,  # uvicorn's lines go through the process's own (JSON) logging
        access_log=False,
        timeout_graceful_shutdown=5,
    )
