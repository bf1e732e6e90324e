"""The worker's HTTP face on ``--metrics-port``: Prometheus metrics and the probes.

    GET /metrics   Prometheus text (``worker.metrics``)
    GET /livez     200 while the heartbeat keeps ending its rounds (at least once a minute)
    GET /readyz    200 while Redis was reached within two heartbeats, every shared loop runs
                   (``shared.tasks``), and no shutdown has begun

It is served by the worker's own event loop, so an answer proves the loop turns: a loop blocked by
a bug never answers, and the probe's timeout catches it. Redis reachability is reported by both and
fails only readiness: a liveness probe tied to Redis would restart the whole fleet whenever Redis
restarts, and a restart cannot bring Redis back (the heartbeat's rounds end even when Redis fails).

Written on asyncio streams rather than a web framework: three fixed routes, and nothing that could
take over the worker's signal handling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from .runtime import Runtime

LIVE_S = 60.0
READ_TIMEOUT_S = 5.0


Probe = Callable[[], tuple[bool, dict[str, Any]]]
"""A probe: whether it passes, and the state to show with it."""


def worker_probes(runtime: Runtime) -> tuple[Probe, Probe]:
    """``/livez`` and ``/readyz`` of one worker process."""

    def state() -> dict[str, Any]:
        now = time.monotonic()
        return {
            "worker": runtime.worker_id,
            "running": len(runtime.supervisor.running),
            "draining": runtime.draining,
            "redis_seen_s_ago": round(now - runtime.redis_seen, 3) if runtime.redis_seen else None,
            "loops_down": runtime.tasks.down,
            "loop_restarts": runtime.tasks.restarts,
        }

    def live() -> tuple[bool, dict[str, Any]]:
        return time.monotonic() - max(runtime.started, runtime.beat_at) < LIVE_S, state()

    def ready() -> tuple[bool, dict[str, Any]]:
        beat_every = runtime.settings.lease_seconds / 5
        redis_ok = time.monotonic() - runtime.redis_seen < 2 * beat_every + 1
        return redis_ok and not runtime.draining and runtime.tasks.healthy, state()

    return live, ready


class HealthServer:
    """``/metrics``, ``/livez`` and ``/readyz``.

    :param live: the liveness probe; :param ready: the readiness probe.
    :param metrics: the Prometheus text (``shared.processes.exposition``).
    """

    def __init__(self, live: Probe, ready: Probe, metrics: Callable[[], bytes]) -> None:
        self._probes = {b"/livez": live, b"/readyz": ready}
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, path: bytes) -> tuple[int, bytes, bytes]:
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), self._metrics()
        probe = self._probes.get(path)
        if probe is not None:
            ok, state = probe()
            return (200 if ok else 503), b"application/json", orjson.dumps({"ok": ok, **state})
        return 404, b"text/plain", b"not found: /metrics, /livez and /readyz are served here\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request_line = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing here needs them
                parts = request_line.split()
                path = parts[1].split(b"?")[0] if len(parts) == 3 else b""
                status, content_type, body = self._route(path)
                reason = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}[status]
                writer.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (status, reason, content_type, len(body), body)
                )
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):  # slow, gone, or a line over 64 KiB
            pass
        finally:
            writer.close()
