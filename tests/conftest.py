"""Real parts only: a real Redis-protocol server, the real simulator over HTTP, real worker processes.

The server is the embedded Valkey binary, started once for the session as a subprocess on a free
port, unless ``STREAMFLEET_TEST_REDIS_URL`` names another. Every test starts on an empty database.
Every test runs on uvloop, as the workers do.

Tests marked ``split_roles`` run twice: with one server for both Redis roles, and with the stream
store on a second embedded server (``STREAMFLEET_TEST_STREAM_REDIS_URL`` names another), so that a
script or pipeline that spans the two roles fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
import redis
import uvloop

from producer import FleetClient
from shared.embedded import server_command
from shared.ports import free_port, port_open
from shared.settings import Settings
from shared.store import keys

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "upstream"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a cheap condition (a port, a key) until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory of the test session's own, so no test touches the user's embedded server."""
    return tmp_path_factory.mktemp("state")


def _server(variable: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get(variable)
    if configured:
        yield configured
        return
    port = free_port()
    data_dir = tmp_path_factory.mktemp("valkey")
    process = subprocess.Popen(
        server_command(port, data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), what="the Valkey server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the session's Redis-protocol server."""
    yield from _server("STREAMFLEET_TEST_REDIS_URL", tmp_path_factory)


@pytest.fixture(scope="session")
def second_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second server, for the stream store in the ``split`` topology (started on first use)."""
    yield from _server("STREAMFLEET_TEST_STREAM_REDIS_URL", tmp_path_factory)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "topology" in metafunc.fixturenames and metafunc.definition.get_closest_marker("split_roles"):
        metafunc.parametrize("topology", ["one", "split"], indirect=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> str:
    """``one``: both Redis roles on one server; ``split``: the stream store on a second one."""
    return str(getattr(request, "param", "one"))


def _flushed(url: str) -> str:
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def redis_url(redis_server: str, topology: str) -> str:
    """The queue's URL, with its database emptied for this test."""
    return _flushed(redis_server)


@pytest.fixture
def stream_redis_url(redis_url: str, topology: str, request: pytest.FixtureRequest) -> str:
    """The stream store's URL (emptied): the queue's, or in the ``split`` topology a second server's."""
    if topology == "one":
        return redis_url
    return _flushed(request.getfixturevalue("second_redis_server"))


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the queue's Redis."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def stream_redis(stream_redis_url: str) -> Iterator[redis.Redis]:
    """A client of the stream store's Redis."""
    client = redis.Redis.from_url(stream_redis_url)
    yield client
    client.close()


class Simulator:
    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(f"http://127.0.0.1:{self.port}/_simulator/stats").json()
        return stats


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    """The upstream simulator, a real HTTP server in its own process, replaying from tests/fixtures."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulator",
            "--port",
            str(port),
            "--tps",
            "200",
            "--ttft-ms",
            "5",
            "--replay-dir",
            str(FIXTURES),
        ],
    )
    try:
        wait_until(lambda: port_open(port), what="the simulator")
        yield Simulator(port)
    finally:
        stop_process(process)


@pytest.fixture
def fleet_env(redis_url: str, stream_redis_url: str, simulator: Simulator, state_dir: Path) -> dict[str, str]:
    """The environment of a fleet process in this test."""
    split = {"STREAMFLEET_STREAM_REDIS_URL": stream_redis_url} if stream_redis_url != redis_url else {}
    return {
        "STREAMFLEET_REDIS_URL": redis_url,
        **split,
        "STREAMFLEET_UPSTREAM_BASE_URL": simulator.base_url,
        "STREAMFLEET_UPSTREAM_API_KEY": "sk-test-never-logged",
        "STREAMFLEET_STATE_DIR": str(state_dir),
        "STREAMFLEET_POLL_DELAY_SECONDS": "0.01",
        "STREAMFLEET_WORKER_PROCESSES": "1",  # a test's worker is one process it can signal (the pool: test_pool)
    }


@pytest.fixture
def settings(fleet_env: dict[str, str]) -> Settings:
    return Settings(
        redis_url=fleet_env["STREAMFLEET_REDIS_URL"],
        stream_redis_url=fleet_env.get("STREAMFLEET_STREAM_REDIS_URL"),
        upstream_base_url=fleet_env["STREAMFLEET_UPSTREAM_BASE_URL"],
        state_dir=Path(fleet_env["STREAMFLEET_STATE_DIR"]),
    )


@pytest.fixture
async def fleet(settings: Settings) -> AsyncIterator[FleetClient]:
    async with FleetClient(settings) as client:
        yield client


WorkerFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start_worker(fleet_env: dict[str, str], sync_redis: redis.Redis) -> Iterator[WorkerFactory]:
    """Start worker processes (``python -m worker``); each is ready when its heartbeat shows."""
    processes: list[subprocess.Popen[bytes]] = []

    def heartbeat_of(pid: int) -> bool:
        for key in sync_redis.scan_iter(match=keys.WORKER_PREFIX + "*"):
            record = sync_redis.get(key)
            if record and json.loads(record).get("pid") == pid:
                return True
        return False

    def start(
        *args: str, env: dict[str, str] | None = None, wait: bool = True, stderr: IO[bytes] | None = None
    ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env={**os.environ, **fleet_env, **(env or {})},
            stderr=stderr,
        )
        processes.append(process)
        if wait:
            wait_until(lambda: heartbeat_of(process.pid), what="the worker's heartbeat")
        return process

    yield start
    for process in processes:
        stop_process(process)


def cli(
    *args: str, env: dict[str, str], input: bytes | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the ``streamfleet`` console script."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "streamfleet"), *args],
        env={**os.environ, **env},
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class GatewayURL(str):
    """A gateway's base URL, knowing its process."""

    process: subprocess.Popen[bytes]


GatewayFactory = Callable[..., GatewayURL]


@pytest.fixture
def start_gateway(fleet_env: dict[str, str]) -> Iterator[GatewayFactory]:
    """Start gateway processes (``streamfleet gateway``); returns the base URL once it answers."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> GatewayURL:
        port = free_port()
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "streamfleet"), "gateway", "--port", str(port), *args],
            env={**os.environ, **fleet_env, "STREAMFLEET_GATEWAY_PING_SECONDS": "0.5", **(env or {})},
        )
        processes.append(process)
        wait_until(lambda: port_open(port), what="the gateway")
        url = GatewayURL(f"http://127.0.0.1:{port}")
        url.process = process
        return url

    yield start
    for process in processes:
        stop_process(process)
