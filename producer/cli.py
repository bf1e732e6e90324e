"""The ``streamfleet`` command line (the README's "Using it").

Exit codes of ``submit --follow``, ``tail`` and ``result``: 0 done, 1 error, 3 cancelled, 4 timed out
waiting; 2 for a usage, input or configuration error, with one line on stderr saying what is wrong.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
import uvloop

from shared import embedded, jsonutil, logs
from shared.accumulate import delta_text
from shared.errors import ConfigurationError, StreamfleetError
from shared.models import CANCELLED, DELTA, DONE, ERROR, RETRY, Event
from shared.settings import Settings, hide_password, load_settings
from shared.store import StoreError, Unavailable, parse_cursor

from . import launch
from .client import FleetClient

EXIT_CODES = {DONE: 0, ERROR: 1, CANCELLED: 3}
EXIT_USAGE = 2
EXIT_TIMEOUT = 4

app = typer.Typer(
    name="streamfleet",
    help="A streaming worker fleet for LLM generation: submit, tail, wait, cancel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
redis_app = typer.Typer(help="Manage the embedded Redis-protocol server.", no_args_is_help=True)
app.add_typer(redis_app, name="redis")

T = TypeVar("T")


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"streamfleet: {message}", err=True)
    return typer.Exit(code)


def settings() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as exc:
        raise fail(f"invalid settings: {exc}") from None


def run(work: Callable[[FleetClient], Awaitable[T]]) -> T:
    """Run ``work`` with a connected client; streamfleet's own errors and an unreachable Redis become
    exit code 2 with one line."""
    current = settings()

    async def main() -> T:
        async with FleetClient(current) as fleet:
            return await work(fleet)

    try:
        return uvloop.run(main())
    except StreamfleetError as exc:
        raise fail(str(exc)) from None
    except TimeoutError as exc:
        raise fail(str(exc), EXIT_TIMEOUT) from None
    except Unavailable as exc:
        raise fail(f"cannot reach Redis ({redacted(current)}): {exc}") from None
    except StoreError as exc:
        raise fail(f"Redis refused a command ({redacted(current)}): {exc}") from None


def redacted(current: Settings) -> str:
    """The Redis URLs of the settings, passwords hidden."""
    urls = [current.redis_url, *([current.stream_redis_url] if current.stream_redis_url else [])]
    return ", ".join(hide_password(url) for url in urls)


class TextPrinter:
    """Prints the text of a job's deltas as they come. A ``retry`` voids the text of its attempt:
    the terminal cannot take it back, so a note on stderr says that the text starts again."""

    def __init__(self) -> None:
        self.attempt_text = False

    def __call__(self, event: Event) -> None:
        if event.type == DELTA:
            text = delta_text(event.data["chunk"])
            if text:
                self.attempt_text = True
                sys.stdout.write(text)
                sys.stdout.flush()
        elif event.type == RETRY and self.attempt_text:
            error = event.data.get("error") or {}
            typer.echo(
                f"\n[attempt {event.data.get('attempt')} failed ({error.get('message')}); starting again]",
                err=True,
            )
            self.attempt_text = False
        elif event.terminal:
            if self.attempt_text:
                sys.stdout.write("\n")
            if event.type == ERROR:
                error = event.data.get("error") or {}
                typer.echo(f"streamfleet: job failed: {error.get('type')}: {error.get('message')}", err=True)
            elif event.type == CANCELLED:
                typer.echo("streamfleet: job cancelled", err=True)


def print_event(event: Event) -> None:
    sys.stdout.write(orjson.dumps(event.as_dict()).decode() + "\n")
    sys.stdout.flush()


async def follow(fleet: FleetClient, job_id: str, after: str, show: Callable[[Event], None]) -> int:
    async for event in fleet.tail(job_id, after=after):
        show(event)
        if event.terminal:
            return EXIT_CODES[event.type]
    return EXIT_CODES[ERROR]


def read_request(source: Path) -> Any:
    try:
        raw = sys.stdin.buffer.read() if str(source) == "-" else source.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {source}: {exc.strerror}") from None
    try:
        return jsonutil.loads(raw)
    except ValueError as exc:
        raise fail(f"{source} is not valid JSON: {exc}") from None


@app.command()
def submit(
    prompt: Annotated[str | None, typer.Argument(help="The user message.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (default gpt-4o-mini).")] = None,
    request: Annotated[
        Path | None,
        typer.Option("--request", help="A whole OpenAI request body: a JSON file, or - for stdin."),
    ] = None,
    endpoint: Annotated[str, typer.Option(help="chat.completions or responses.")] = "chat.completions",
    idempotency_key: Annotated[str | None, typer.Option(help="The same key returns the same job.")] = None,
    follow_: Annotated[bool, typer.Option("--follow", help="Print the text as it streams.")] = False,
) -> None:
    """Submit a generation; print its job id (or, with --follow, its text)."""
    if request is not None:
        body = read_request(request)
        if model is not None and isinstance(body, dict):
            body["model"] = model
    elif prompt is not None:
        if endpoint == "responses":
            body = {"model": model or "gpt-4o-mini", "input": prompt}
        else:
            body = {"model": model or "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    else:
        raise fail("give a PROMPT or --request FILE")

    async def work(fleet: FleetClient) -> int:
        job_id = await fleet.submit(body, endpoint=endpoint, idempotency_key=idempotency_key)
        if not follow_:
            typer.echo(job_id)
            return 0
        typer.echo(f"job {job_id}", err=True)
        return await follow(fleet, job_id, "0", TextPrinter())

    raise typer.Exit(run(work))


@app.command()
def tail(
    job: Annotated[str, typer.Argument(help="The job id.")],
    after: Annotated[str, typer.Option(help="Start after this event id.")] = "0",
    events: Annotated[bool, typer.Option("--events", help="One event per line, as JSON.")] = False,
) -> None:
    """Print a job's text as it arrives (or its events); end after the terminal event."""
    try:
        parse_cursor(after)
    except StreamfleetError as exc:
        raise fail(str(exc)) from None
    show: Callable[[Event], None] = print_event if events else TextPrinter()
    raise typer.Exit(run(lambda fleet: follow(fleet, job, after, show)))


@app.command()
def result(
    job: Annotated[str, typer.Argument(help="The job id.")],
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.", min=0)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the terminal event's data as JSON.")] = False,
) -> None:
    """Wait for a job to end; print its text (or, with --json, the terminal event's data)."""
    event = run(lambda fleet: fleet.wait(job, timeout=timeout))
    if json_:
        typer.echo(orjson.dumps(event.data, option=orjson.OPT_INDENT_2).decode())
    elif event.type == DONE:
        typer.echo(event.data["result"]["text"])
    else:
        TextPrinter()(event)
    raise typer.Exit(EXIT_CODES[event.type])


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="The job id.")]) -> None:
    """Cancel a job; idempotent. `cancelled` follows on its stream within a second."""
    typer.echo(run(lambda fleet: fleet.cancel(job)))


@app.command()
def status(
    job: Annotated[str | None, typer.Argument(help="A job id; the fleet's status without.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON even on a terminal (the default elsewhere).")] = False,
) -> None:
    """A job's state, or the fleet's: queue depth, live workers with their running jobs, recent failures."""
    state = run(lambda fleet: fleet.status(job))
    if job is None and not as_json and sys.stdout.isatty():
        _print_fleet(state)
    else:
        typer.echo(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode())


def _print_fleet(state: dict[str, Any]) -> None:
    """The fleet's status as tables, for a person at a terminal."""
    import time

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"queued [bold]{state['queued']}[/]   running [bold]{state['running']}[/]")
    for role, memory in state.get("memory", {}).items():
        bound = f" of {memory['max_bytes'] / 2**20:.0f} MiB" if memory["max_bytes"] else ""
        full = "  [bold red]FULL: jobs end in storage_full[/]" if memory["full"] else ""
        console.print(f"{role} memory {memory['used_bytes'] / 2**20:.1f} MiB{bound}{full}")
    workers = Table("worker", "pid", "up", "running jobs", "entries written", title="live workers")
    for worker in state["workers"]:
        running = worker.get("running", [])
        shown = ", ".join(running[:3]) + (f" (+{len(running) - 3})" if len(running) > 3 else "")
        up = f"{time.time() - worker.get('started', time.time()):.0f} s"
        workers.add_row(worker["id"], str(worker.get("pid")), up, shown or "-", str(worker.get("entries_written")))
    console.print(workers)
    failures = Table("job", "ago", "type", "message", title="recent failures")
    for failure in state["recent_failures"]:
        failures.add_row(failure["id"], f"{time.time() - failure['at']:.0f} s", failure["type"], failure["message"])
    console.print(failures)


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Jobs run at once, per process.")] = None,
    processes: Annotated[
        int | None, typer.Option(help="Worker processes under one supervisor (default: the cores it may use).", min=1)
    ] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit when the queue is empty.")] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve /metrics, /livez and /readyz on this port.", min=1, max=65535)
    ] = None,
) -> None:
    """Run uvloop arq workers: one process per core by default, under one supervisor."""
    args = (["--concurrency", str(concurrency)] if concurrency else []) + (["--burst"] if burst else [])
    args += ["--processes", str(processes)] if processes else []
    args += ["--metrics-port", str(metrics_port)] if metrics_port else []
    launch.exec_part("worker", *args)


@app.command()
def gateway(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[
        int | None, typer.Option(help="Processes on the port, each with its own fan-out (default: 1).", min=1)
    ] = None,
) -> None:
    """Run the HTTP gateway (jobs API, OpenAI-compatible routes)."""
    from .gateway import serve

    current = settings()
    logs.configure(current.log_format)
    try:
        serve(current, host=host, port=port, workers=workers)
    except StreamfleetError as exc:
        raise fail(str(exc)) from None


@app.command()
def simulator(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 9000,
    tps: Annotated[float, typer.Option(help="Tokens per second.")] = 50.0,
    ttft_ms: Annotated[float, typer.Option(help="Time to first token, ms.")] = 20.0,
    replay_dir: Annotated[Path | None, typer.Option(help="Directory of recorded .sse files.")] = None,
) -> None:
    """Run the upstream simulator (an OpenAI-compatible server)."""
    args = ["--host", host, "--port", str(port), "--tps", str(tps), "--ttft-ms", str(ttft_ms)]
    launch.exec_part("simulator", *args, *(["--replay-dir", str(replay_dir)] if replay_dir else []))


@app.command()
def demo() -> None:
    """Start everything, stream one generation to two subscribers, print the result, stop."""
    from .demo import run_demo

    try:
        raise typer.Exit(run_demo(settings()))
    except StreamfleetError as exc:
        raise fail(str(exc)) from None


@redis_app.command("start")
def redis_start() -> None:
    """Start the embedded server (or find the running one); print its URL."""
    try:
        typer.echo(embedded.ensure(settings().state_dir).url)
    except StreamfleetError as exc:
        raise fail(str(exc)) from None


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded server."""
    typer.echo("stopped" if embedded.stop(settings().state_dir) else "not running")


@redis_app.command("url")
def redis_url() -> None:
    """Print the Redis URL this machine's streamfleet uses."""
    current = settings()
    if not current.uses_embedded_redis:
        typer.echo(current.redis_url)
        return
    server = embedded.running(current.state_dir)
    if server is None:
        raise fail("the embedded server is not running: streamfleet redis start", 1)
    typer.echo(server.url)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="streamfleet: %(message)s")
    app()
