"""What an operator sees: a worker's metrics and probes, its JSON log lines, the fleet's status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer import FleetClient
from shared.models import CANCELLED, DONE, ERROR
from shared.ports import free_port
from tests.conftest import GatewayFactory, WorkerFactory, cli, wait_until

pytestmark = pytest.mark.slow

SECRET_PROMPT = "prompt-text-that-must-never-reach-a-log"
FAST = {"STREAMFLEET_RETRY_BASE_SECONDS": "0.05", "STREAMFLEET_RETRY_MAX_SECONDS": "0.1"}


def chat(**simulator: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": [{"role": "user", "content": SECRET_PROMPT}], "simulator": simulator}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, keyed by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_worker_metrics_probes_and_logs_after_real_jobs(
    fleet: FleetClient, start_worker: WorkerFactory, fleet_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = start_worker(
            "--metrics-port",
            str(port),
            env={**FAST, "STREAMFLEET_MAX_ATTEMPTS": "2", "STREAMFLEET_SHUTDOWN_GRACE_SECONDS": "2"},
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"

    done = await fleet.submit(chat(tokens=80))
    failed = await fleet.submit(chat(fault="500"))  # every attempt answered 500: retried, then error
    slow = await fleet.submit(chat(tokens=500, tps=20))
    assert (await fleet.wait(done)).type == DONE
    assert (await fleet.wait(failed)).type == ERROR
    await fleet.cancel(slow)
    assert (await fleet.wait(slow)).type == CANCELLED

    async with httpx.AsyncClient(base_url=base) as http:
        wait_until(lambda: httpx.get(base + "/readyz").status_code == 200, what="the worker to be ready")
        live, ready = await http.get("/livez"), await http.get("/readyz")
        assert live.status_code == ready.status_code == 200
        assert ready.json()["ok"] is True and ready.json()["redis_seen_s_ago"] < 5
        assert (await http.get("/nowhere")).status_code == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n")  # over asyncio's 64 KiB line limit
        assert await reader.read() == b""  # closed without an answer, and the server goes on
        writer.close()
        page = await http.get("/metrics")
    assert page.headers["content-type"].startswith("text/plain")
    metrics = samples(page.text)

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    assert value("streamfleet_jobs_total", outcome="done") == 1
    assert value("streamfleet_jobs_total", outcome="error") == 1
    assert value("streamfleet_jobs_total", outcome="cancelled") == 1
    assert value("streamfleet_attempts_total") == 4  # the failed job ran twice
    assert value("streamfleet_upstream_errors_total", type="upstream_error") == 2
    assert value("streamfleet_queue_wait_seconds_count") == 3
    assert value("streamfleet_time_to_first_token_seconds_count") >= 2
    assert value("streamfleet_inter_token_seconds_count") >= 2  # one gap in 32 is observed
    assert value("streamfleet_deltas_total") >= 21
    assert value("streamfleet_published_bytes_total") > 1000
    assert value("streamfleet_open_streams") == 0
    assert value("streamfleet_worker_running_jobs") == 0
    assert ("streamfleet_queue_depth", ()) in metrics and ("streamfleet_fleet_running_jobs", ()) in metrics

    # Draining: not ready from the signal on, while a running job gets its grace period.
    long = await fleet.submit(chat(tokens=400, tps=20))
    wait_until(lambda: httpx.get(base + "/metrics").text.count("streamfleet_open_streams 1.0") == 1, what="a stream")
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(base + "/readyz").status_code == 503, what="the worker to report draining")
    worker.wait(timeout=60)
    assert (await fleet.last_event(long)).type in ("retry", DONE)

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, "the worker logs JSON lines when stderr is not a terminal"
    events = {(line.get("job"), line.get("event")) for line in lines}
    assert {(done, DONE), (failed, "retry"), (failed, ERROR), (slow, CANCELLED)} <= events
    finished = next(line for line in lines if line.get("job") == done and line.get("event") == DONE)
    assert finished["attempt"] == 1 and finished["worker"] and finished["deltas"] >= 20
    assert finished["elapsed_s"] > 0 and finished["ttft_s"] > 0 and finished["queue_wait_s"] >= 0
    assert (done, "started") not in events, "one line per job at INFO: its end"
    text = log_path.read_text()
    assert SECRET_PROMPT not in text and fleet_env["STREAMFLEET_UPSTREAM_API_KEY"] not in text


async def test_status_shows_workers_their_jobs_and_recent_failures(
    fleet: FleetClient, start_worker: WorkerFactory, fleet_env: dict[str, str]
) -> None:
    start_worker(env={**FAST, "STREAMFLEET_MAX_ATTEMPTS": "1"})
    failed = await fleet.submit(chat(fault="400"))
    assert (await fleet.wait(failed)).type == ERROR
    running = await fleet.submit(chat(tokens=400, tps=20))
    wait_until(lambda: cli("status", env=fleet_env).stdout.count(running) == 1, what="the job in status")

    state = json.loads(cli("status", env=fleet_env).stdout)
    assert state["running"] >= 1 and isinstance(state["queued"], int)
    assert any(running in worker["running"] for worker in state["workers"])
    failure = next(entry for entry in state["recent_failures"] if entry["id"] == failed)
    assert failure["type"] == "upstream_error" and "400" in failure["message"]

    # At a terminal: tables instead of JSON.
    primary, secondary = pty.openpty()
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "streamfleet"), "status"],
        env={**os.environ, **fleet_env, "COLUMNS": "250"},
        stdout=secondary,
        timeout=30,
    )
    os.close(secondary)
    screen = b""
    with contextlib.suppress(OSError):  # EIO once the pty has nothing left
        while chunk := os.read(primary, 65536):
            screen += chunk
    os.close(primary)
    assert shown.returncode == 0
    text = screen.decode()
    assert "live workers" in text and "recent failures" in text and failed in text and running in text
    await fleet.cancel(running)


async def test_gateway_metrics_count_subscribers(fleet: FleetClient, start_gateway: GatewayFactory) -> None:
    base = start_gateway()
    page = httpx.get(base + "/metrics").text
    names = {family.name for family in text_string_to_metric_families(page)}
    assert {"streamfleet_gateway_subscribers", "streamfleet_gateway_open_streams"} <= names
