"""Every core of a pod: ``streamfleet worker --processes N`` (``worker.pool``) and ``streamfleet gateway
--workers N`` (uvicorn's supervisor, ``producer.gateway.asgi``): one supervisor, N children, one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer import FleetClient
from shared.ports import free_port
from simulator import expected_text
from tests.conftest import GatewayFactory, WorkerFactory, stop_process, wait_until
from tests.test_gateway import delta_text, read_events


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""  # gone


async def worker_pids(fleet: FleetClient) -> set[int]:
    return {int(worker["pid"]) for worker in (await fleet.status())["workers"]}


def request(prompt: str, tokens: int, tps: int = 200) -> dict[str, Any]:
    return {
        "model": "sim",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "simulator": {"tokens": tokens, "tps": tps},
    }


def sample(metrics: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))


async def test_a_pool_runs_jobs_restarts_a_killed_child_and_drains_on_sigterm(
    start_worker: WorkerFactory, fleet: FleetClient
) -> None:
    """Two children under one supervisor: each a worker (two heartbeats); jobs run on both; one
    /metrics adds up their series; a SIGKILLed child is started again and its job still ends once,
    with its whole text; SIGTERM drains both and the pool exits 0."""
    port = free_port()
    pool = start_worker("--processes", "2", "--metrics-port", str(port), wait=False)
    wait_until(lambda: len(children_of(pool.pid)) == 2, what="two worker children")
    first = children_of(pool.pid)
    for _ in range(500):
        if await worker_pids(fleet) == first:
            break
        await asyncio.sleep(0.02)
    assert await worker_pids(fleet) == first  # the children are the workers; the supervisor is not one
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(500):
            ready = await http.get("/readyz")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert ready.status_code == 200 and ready.json()["children_ready"] == 2, ready.text

        short = [request(f"pool short {i}", tokens=10) for i in range(20)]
        ids = [await fleet.submit(body) for body in short]
        results = [await fleet.result(job_id, timeout=30) for job_id in ids]
        assert [r["text"] for r in results] == [expected_text(body) for body in short]
        metrics = (await http.get("/metrics")).text
        assert sample(metrics, 'streamfleet_jobs_total{outcome="done"}') == 20, metrics
        assert sample(metrics, "streamfleet_deltas_total") >= 20 * 10

        # A long job on each child; kill the child that holds the first.
        long = [request(f"pool long {i}", tokens=200, tps=50) for i in range(2)]
        long_ids = [await fleet.submit(body) for body in long]
        for job_id in long_ids:
            async for event in fleet.tail(job_id):
                if event.type == "delta":
                    break
        holder = None
        for _ in range(500):  # the heartbeat (every second here) says who holds it
            workers = (await fleet.status())["workers"]
            holder = next((int(w["pid"]) for w in workers if long_ids[0] in w["running"]), None)
            if holder:
                break
            await asyncio.sleep(0.02)
        assert holder in first
        os.kill(holder, signal.SIGKILL)
        wait_until(lambda: len(children_of(pool.pid) - {holder}) == 2, what="the killed child's replacement")
        for job_id, body in zip(long_ids, long, strict=True):
            assert (await fleet.result(job_id, timeout=60))["text"] == expected_text(body)
        live = (await http.get("/livez")).json()
        assert live["ok"] and live["restarts"] == 1, live

    children = children_of(pool.pid)
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(timeout=20) == 0
    assert not any(alive(pid) for pid in children)


async def test_children_end_with_their_supervisor_even_on_sigkill(
    fleet_env: dict[str, str], fleet: FleetClient
) -> None:
    """SIGKILL the supervisor: its children are told to drain (SIGTERM) and end; none runs on orphaned."""
    pool = subprocess.Popen([sys.executable, "-m", "worker", "--processes", "2"], env={**os.environ, **fleet_env})
    try:
        wait_until(lambda: len(children_of(pool.pid)) == 2, what="two worker children")
        children = children_of(pool.pid)
        for _ in range(500):
            if await worker_pids(fleet) == children:
                break
            await asyncio.sleep(0.02)
        pool.kill()
        pool.wait()
        wait_until(lambda: not any(alive(pid) for pid in children), timeout=15, what="the children to end")
    finally:
        stop_process(pool)


@pytest.mark.parametrize("processes", ["0", "-1"])
def test_a_pool_of_no_processes_is_refused(fleet_env: dict[str, str], processes: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "worker"],
        env={**os.environ, **fleet_env, "STREAMFLEET_WORKER_PROCESSES": processes},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "STREAMFLEET_WORKER_PROCESSES" in run.stderr, run.stderr


async def test_a_gateway_of_two_processes_serves_one_port_restarts_and_stops(
    start_gateway: GatewayFactory, start_worker: WorkerFactory
) -> None:
    """Two gateway processes on one port: connections land on both; subscribers on either get the same
    events; one /metrics adds up both; a SIGKILLed process is replaced while the other serves; SIGTERM
    stops them all."""
    start_worker()
    gateway = start_gateway("--workers", "2")
    supervisor = gateway.process.pid

    def serving() -> set[int]:  # uvicorn's children, without multiprocessing's resource tracker
        return {pid for pid in children_of(supervisor) if b"spawn_main" in cmdline(pid)}

    wait_until(lambda: len(serving()) == 2, what="two gateway processes")
    pids: set[int] = set()
    asked = 0
    for _ in range(400):  # a fresh connection each: the kernel hands it to either process
        async with httpx.AsyncClient(base_url=gateway) as fresh:
            pids.add((await fresh.get("/healthz")).json()["pid"])
        asked += 1
        if len(pids) == 2 and asked >= 20:
            break
    assert pids == serving()

    body = request("two gateway processes", tokens=60, tps=100)
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        job = (await client.post("/v1/jobs", json={"request": body})).json()
    clients = [httpx.AsyncClient(base_url=gateway, timeout=30) for _ in range(20)]
    try:
        streams = await asyncio.gather(*(c.get("/healthz") for c in clients))  # one connection each
        assert {r.json()["pid"] for r in streams} <= pids
        events = await asyncio.gather(*(read_events(c, job["events_url"]) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    assert all(stream == events[0] for stream in events)
    text = "".join(delta_text(json.loads(e["data"])["chunk"]) for e in events[0] if e["event"] == "delta")
    assert text == expected_text(body) and events[0][-1]["event"] == "done"

    async with httpx.AsyncClient(base_url=gateway) as http:
        metrics = (await http.get("/metrics")).text
    assert sample(metrics, 'streamfleet_gateway_requests_total{route="/healthz",status="200"}') == asked + 20, metrics
    assert sample(metrics, 'streamfleet_gateway_requests_total{route="/v1/jobs/{job_id}/events"') == 20

    killed = min(pids)
    os.kill(killed, signal.SIGKILL)
    async with httpx.AsyncClient(base_url=gateway) as http:
        assert (await http.get("/healthz")).status_code == 200  # the other one serves meanwhile
    wait_until(lambda: len(serving() - {killed}) == 2, timeout=20, what="a process in place of the killed one")

    children = serving()
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=20) == 0
    assert not any(alive(pid) for pid in children)
