"""``streamfleet demo``: the whole path on one machine, shown live, then everything stopped again.

Starts the embedded server (unless one runs), the upstream simulator, a worker and the gateway;
submits one generation; shows it streaming to two subscribers side by side (one through the Python
client, one through the gateway's SSE); prints the result and the timing.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import uvloop
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from shared import embedded
from shared.accumulate import delta_text
from shared.models import DELTA, DONE, RETRY
from shared.ports import free_port, wait_for_port
from shared.settings import Settings

from . import launch
from .client import FleetClient

PROMPT = "Explain in one paragraph how a streaming worker fleet moves tokens."
TOKENS = 60
TPS = 40


@dataclass
class Subscriber:
    name: str
    text: str = ""
    first_token_at: float | None = None
    deltas: int = 0
    done: bool = False
    events: list[str] = field(default_factory=list)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _upstream_ttft(upstream_url: str, request: dict[str, Any]) -> float:
    """The simulator's own time to first text token (ms) for this request, asked directly: the
    baseline the fleet's figure is printed beside."""
    # Without TCP_NODELAY, httpx's headers and body go out as two segments and Nagle's algorithm
    # holds the second for the server's delayed ACK (~40 ms): that would be measuring TCP, not the upstream.
    nodelay = httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=upstream_url, timeout=30, transport=nodelay) as client,
        client.stream("POST", "/chat/completions", json={**request, "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {") and delta_text(orjson.loads(line[6:])):
                break
    return 1000 * (time.monotonic() - started)


async def _show(fleet: FleetClient, console: Console, gateway_url: str, upstream_url: str) -> int:
    deadline = time.monotonic() + 15
    while not (await fleet.status())["workers"]:
        if time.monotonic() > deadline:
            console.print("[red]the worker did not start[/red]")
            return 1
        await asyncio.sleep(0.05)

    request = {
        "model": "simulated-gpt",
        "messages": [{"role": "user", "content": PROMPT}],
        "simulator": {"tokens": TOKENS, "tps": TPS},
    }
    await _upstream_ttft(upstream_url, request)  # a process's first request is slow: not the baseline
    upstream_ms = await _upstream_ttft(upstream_url, request)
    # Built before the clock starts: an httpx client loads its TLS context (~20 ms of this loop's time).
    gateway = httpx.AsyncClient(base_url=gateway_url, timeout=30)
    submitted_at = time.monotonic()
    job_id = await fleet.submit(request)
    console.print(f"submitted job [bold]{job_id}[/bold]")
    subscribers = [Subscriber("A: Python client (XREAD)"), Subscriber("B: gateway SSE (HTTP)")]

    def render() -> Table:
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in subscribers:
            grid.add_column(ratio=1)
        grid.add_row(
            *(Panel(s.text or "[dim]waiting…[/dim]", title=f"{s.name} · {s.deltas} deltas") for s in subscribers)
        )
        return grid

    def take(subscriber: Subscriber, event_type: str, data: Any) -> None:
        if event_type == DELTA:
            text = delta_text(data["chunk"])
            if text and subscriber.first_token_at is None:
                subscriber.first_token_at = time.monotonic()
            subscriber.text += text
            subscriber.deltas += 1
        elif event_type == RETRY:
            subscriber.text = ""

    async def through_client(subscriber: Subscriber) -> None:
        async for event in fleet.tail(job_id):
            take(subscriber, event.type, event.data)

    async def through_gateway(subscriber: Subscriber) -> None:
        async with gateway.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            event_type = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event_type = line[7:]
                elif line.startswith("data: "):
                    take(subscriber, event_type, orjson.loads(line[6:]))

    async with gateway:
        with Live(render(), console=console, refresh_per_second=20) as live:
            tasks = [
                asyncio.create_task(through_client(subscribers[0])),
                asyncio.create_task(through_gateway(subscribers[1])),
            ]
            while not all(task.done() for task in tasks):
                live.update(render())
                await asyncio.sleep(0.05)
            live.update(render())
            for task in tasks:
                task.result()
    finished_at = time.monotonic()
    console.print()

    terminal = await fleet.wait(job_id, timeout=5)
    if terminal.type != DONE:
        console.print(f"[red]job ended in {terminal.type}: {terminal.data}[/red]")
        return 1
    result = terminal.data["result"]
    same = subscribers[0].text == subscribers[1].text == result["text"]
    console.print(Panel(result["text"], title=f"result ({result['finish_reason']}, usage {result['usage']})"))
    first = subscribers[0].first_token_at or finished_at
    tokens = subscribers[0].deltas
    console.print(
        f"time to first token {1000 * (first - submitted_at):.1f} ms (the simulator alone: {upstream_ms:.1f} ms) · "
        f"{tokens / max(finished_at - first, 1e-9):.1f} deltas/s · both subscribers saw the same text "
        f"as the result: {'yes' if same else 'NO'}"
    )
    return 0 if same else 1


def run_demo(settings: Settings) -> int:
    """Run the demo; return the exit code."""
    console = Console()
    started_embedded = settings.uses_embedded_redis and embedded.running(settings.state_dir) is None
    redis_url = embedded.ensure(settings.state_dir).url if settings.uses_embedded_redis else settings.redis_url
    port, gateway_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{port}/v1"
    env = {"STREAMFLEET_REDIS_URL": redis_url, "STREAMFLEET_UPSTREAM_BASE_URL": upstream_url}
    started = [launch.spawn("simulator", "--port", str(port), "--tps", str(TPS))]
    try:
        started.append(launch.spawn("worker", env=env))
        started.append(launch.spawn("producer.gateway", "--port", str(gateway_port), env=env))
        wait_for_port(port)
        wait_for_port(gateway_port)
        fleet_settings = settings.model_copy(update={"redis_url": redis_url})

        async def main() -> int:
            async with FleetClient(fleet_settings) as fleet:
                return await _show(fleet, console, f"http://127.0.0.1:{gateway_port}", upstream_url)

        return uvloop.run(main())
    finally:
        for process in reversed(started):
            _stop(process)
        if started_embedded:
            embedded.stop(settings.state_dir)
            console.print("stopped the embedded server this demo started")
