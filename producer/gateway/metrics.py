"""The gateway's Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ..fanout import FanOut  # which counts its events here

REQUESTS = Counter(
    "streamfleet_gateway_requests_total", "HTTP requests answered, by route and status", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "streamfleet_gateway_request_duration_seconds", "Time to the response's first byte, by route", ["route"]
)
# multiprocess_mode: how the processes of a multi-process gateway add up; ignored in one process.
OPEN_STREAMS = Gauge("streamfleet_gateway_open_streams", "SSE responses open now", multiprocess_mode="livesum")
SUBSCRIBERS = Gauge(
    "streamfleet_gateway_subscribers", "Subscribers fed by the fan-out readers", multiprocess_mode="livesum"
)
FOLLOWED_STREAMS = Gauge(
    "streamfleet_gateway_followed_streams", "Job streams the fan-out readers follow", multiprocess_mode="livesum"
)
FANOUT_EVERY_S = 1.0
EVENTS_SENT = Counter("streamfleet_gateway_events_sent_total", "Events written to SSE subscribers")
SLOW_SUBSCRIBERS = Counter(
    "streamfleet_gateway_slow_subscribers_total", "Subscribers cut off for falling too far behind"
)


class RequestMetrics:
    """Counts requests by route template (not raw path: job ids would explode the label set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                name = getattr(route, "path", "unmatched")
                REQUESTS.labels(name, str(message["status"])).inc()
                REQUEST_SECONDS.labels(name).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observed)


def observe(fanout: FanOut) -> None:
    SUBSCRIBERS.set(fanout.subscribers)
    FOLLOWED_STREAMS.set(fanout.followed)


async def observe_fanout(fanout: FanOut) -> None:
    """Run until cancelled: the fan-out's gauges, for a scrape that another process answers."""
    while True:
        observe(fanout)
        await asyncio.sleep(FANOUT_EVERY_S)
