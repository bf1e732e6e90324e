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

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .runtime import Runtime

LIVE_S = 60.0
READ_TIMEOUT_S = 5.0


class HealthServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _probe(self, path: bytes) -> tuple[int, bytes, bytes]:
        runtime, now = self.runtime, time.monotonic()
        beat_every = runtime.settings.lease_seconds / 5
        state = {
            "worker": runtime.worker_id,
            "running": len(runtime.supervisor.running),
            "draining": runtime.draining,
            "redis_seen_s_ago": round(now - runtime.redis_seen, 3) if runtime.redis_seen else None,
            "loops_down": runtime.tasks.down,
            "loop_restarts": runtime.tasks.restarts,
        }
        if path == b"/livez":
            ok = now - max(runtime.started, runtime.beat_at) < LIVE_S
        else:
            ok = now - runtime.redis_seen < 2 * beat_every + 1 and not runtime.draining and runtime.tasks.healthy
        return (200 if ok else 503), b"application/json", orjson.dumps({"ok": ok, **state})

    def _route(self, path: bytes) -> tuple[int, bytes, bytes]:
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST.encode(), generate_latest()
        if path in (b"/livez", b"/readyz"):
            return self._probe(path)
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
