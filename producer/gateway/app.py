"""The HTTP gateway (the README's "The HTTP gateway"): the jobs API, OpenAI-compatible routes, health and metrics.

One ``FleetClient`` and one ``FanOut`` per process, made in the lifespan. Errors are JSON in
OpenAI's shape, ``{"error": {"message", "type", "code"}}``: 4xx for what the caller sent wrong, 404
for an unknown job (or another tenant's), 5xx only for the fleet's own faults.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import processes
from shared.errors import InvalidRequest, JobEnded, StorageFull, UnknownJob
from shared.settings import Settings
from shared.store import OutOfMemory, StoreError
from shared.store.connect import BLOCK_MS

from ..client import FleetClient
from ..fanout import READERS
from . import jobs, metrics, openai
from .auth import Auth
from .state import Gateway

logger = logging.getLogger(__name__)


def error_body(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": status}}, status)


class BodyLimit:
    """Refuses a request body larger than the limit (413) before the application reads it all."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_body(413, f"the request body is over {self.limit} bytes", "invalid_request_error")(
                scope, receive, send
            )
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(settings: Settings) -> FastAPI:
    """The gateway as an ASGI app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A bounded pool: the fan-out readers' blocked XREADs plus a few for requests, however many
        # subscribers there are.
        async with FleetClient(settings, name="streamfleet-gateway", max_connections=READERS + 4) as fleet:
            # The client's shared readers, started here with the gateway's options: its SSE
            # subscribers and its waits for a result (non-streaming requests) take events from them.
            fanout = fleet.start_fanout(
                readers=READERS,
                ping_interval=settings.gateway_ping_seconds,
                sent=metrics.EVENTS_SENT.inc,
                block_ms=BLOCK_MS,
            )
            fanout.tasks.start("fan-out gauges", lambda: metrics.observe_fanout(fanout))
            app.state.gateway = Gateway(
                fleet=fleet,
                auth=Auth(settings),
                settings=settings,
            )
            processes.settle_garbage_collector()
            yield  # the client stops its fan-out as it closes

    app = FastAPI(
        title="streamfleet gateway",
        version="0.1.0",
        description="Jobs API with resumable SSE, and OpenAI-compatible chat completions and background "
        "responses, in front of a streamfleet fleet.",
        lifespan=lifespan,
    )
    app.add_middleware(metrics.RequestMetrics)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    if settings.gateway_cors_origins:
        # Browsers, opt-in: pages from these origins only; a page holds a job's read token, never a key.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.gateway_cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "last-event-id", "idempotency-key"],
            expose_headers=[openai.JOB_HEADER],
            max_age=600,
        )

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return error_body(400, str(exc), "invalid_request_error")

    @app.exception_handler(UnknownJob)
    async def unknown(request: Request, exc: UnknownJob) -> JSONResponse:
        return error_body(404, str(exc), "not_found_error")

    @app.exception_handler(JobEnded)
    async def ended(request: Request, exc: JobEnded) -> JSONResponse:
        return error_body(502, str(exc), "upstream_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Every error, routing's 404 and 405 included, in OpenAI's shape: SDKs and UIs read it.
        kinds = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}
        return error_body(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        return error_body(400, f"{where}: {first.get('msg')}", "invalid_request_error")

    @app.exception_handler(StorageFull)
    async def storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        return error_body(503, str(exc), "storage_full")

    @app.exception_handler(OutOfMemory)
    async def out_of_memory(request: Request, exc: OutOfMemory) -> JSONResponse:
        logger.warning("Redis is out of memory serving %s", request.url.path)
        return error_body(503, str(StorageFull("a write was refused")), "storage_full")

    @app.exception_handler(StoreError)
    async def redis_down(request: Request, exc: StoreError) -> JSONResponse:
        logger.warning("Redis error serving %s: %s", request.url.path, exc)
        return error_body(503, "the fleet's Redis is unreachable; try again", "service_unavailable")

    @app.get("/healthz", tags=["health"])
    async def healthz(request: Request) -> JSONResponse:
        """Liveness, with Redis reachability (both roles) and the gateway's shared readers."""
        gateway: Gateway = request.app.state.gateway
        try:
            await gateway.fleet.stores.queue.ping()
            await gateway.fleet.stores.streams.ping()
        except StoreError as exc:
            return JSONResponse({"status": "degraded", "redis": False, "error": str(exc)}, 503)
        tasks = gateway.fanout.tasks
        if not tasks.healthy:
            error = f"shared tasks down: {', '.join(tasks.down)}"
            return JSONResponse({"status": "degraded", "redis": True, "error": error}, 503)
        # The process: one of several with --workers.
        return JSONResponse({"status": "ok", "redis": True, "fanout_restarts": tasks.restarts, "pid": os.getpid()})

    @app.get("/metrics", tags=["health"])
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics."""
        gateway: Gateway = request.app.state.gateway
        gateway.auth.tenant(request)
        metrics.observe(gateway.fanout)
        return Response(processes.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(jobs.router)
    app.include_router(openai.router)
    return app
