"""A pool of worker processes: every core of a pod, behind one process and one metrics port.

``streamfleet worker --processes N`` (default: the cores the container may use) runs N ordinary
worker processes under this supervisor. It forwards SIGTERM and SIGINT to them (each drains as a
single worker does) and exits when they all have; it restarts a child that dies (a SIGKILL, an OOM
kill) after a pause that doubles while it keeps dying, and logs it; a child that ends by itself
(``--burst``: the queue is empty) is not restarted. Each child is a worker of its own (its own
heartbeat, leases and jobs): a child that dies loses nothing, its jobs' leases lapse and another
worker takes them, as for any lost worker.

On ``--metrics-port`` the supervisor serves ``/metrics`` for all the children together (Prometheus'
multiprocess mode: each child writes its series to a shared directory) and the probes: ``/livez``
while no child is dying over and over, ``/readyz`` while every child says it is ready (each writes
its probes to a status file every heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from shared import processes

from .health import HealthServer

logger = logging.getLogger(__name__)

RESTART_AFTER_S = 1.0
RESTART_AT_MOST_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long before dying starts its pauses over
PR_SET_PDEATHSIG = 1


class _Child:
    def __init__(self, slot: int, status: Path) -> None:
        self.slot = slot
        self.status = status
        self.process: asyncio.subprocess.Process | None = None
        self.failures = 0


class Pool:
    """``count`` worker children started with ``args``, supervised.

    :param directory: the pool's own: the children's status files.
    :param status_fresh_s: a child whose status file is older than this is not ready.
    """

    def __init__(self, count: int, args: list[str], *, directory: Path, status_fresh_s: float) -> None:
        self.args = args
        self.directory = directory
        self.status_fresh_s = status_fresh_s
        self.children = [_Child(slot, directory / f"status-{slot}.json") for slot in range(count)]
        self.stopping = False
        self.restarts = 0

    async def _start(self, child: _Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            *("--processes", "1", "--status-file", str(child.status), *self.args),
            preexec_fn=processes.end_with_parent,
        )

    async def watch(self, child: _Child) -> None:
        """Run one slot: start its child, and again after it dies, until the pool stops."""
        while True:
            await self._start(child)
            assert child.process is not None
            started = time.monotonic()
            code = await child.process.wait()
            processes.forget_dead()  # its live gauges leave the sums
            if self.stopping or code == 0:
                return  # drained on a signal, or done (--burst)
            if time.monotonic() - started > HEALTHY_AFTER_S:
                child.failures = 0
            child.failures += 1
            self.restarts += 1
            pause = min(RESTART_AFTER_S * 2 ** (child.failures - 1), RESTART_AT_MOST_S)
            logger.error("worker child %d died (exit %s); starting it again in %.0f s", child.slot, code, pause)
            await asyncio.sleep(pause)
            if self.stopping:
                return

    def stop(self, signum: int) -> None:
        """Forward a shutdown signal to every child; each drains as a single worker does."""
        self.stopping = True
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

    def live(self) -> tuple[bool, dict[str, Any]]:
        dying = [child.slot for child in self.children if child.failures >= 3]
        return not dying, {"children": len(self.children), "restarts": self.restarts, "dying": dying}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        now, ready = time.time(), []
        for child in self.children:
            try:
                status = orjson.loads(child.status.read_bytes())
            except (OSError, ValueError):
                status = {}
            ready.append(bool(status.get("ready")) and now - float(status.get("at", 0)) < self.status_fresh_s)
        return all(ready) and not self.stopping, {"children_ready": sum(ready), "children": len(self.children)}


async def supervise(
    count: int, args: list[str], *, status_every_s: float, metrics_host: str, metrics_port: int | None
) -> int:
    """Run ``count`` worker children until they have all ended; the pool's exit code.

    :param status_every_s: how often each child writes its status file (its heartbeat).
    """
    directory = Path(tempfile.mkdtemp(prefix="streamfleet-pool-"))
    series = processes.metrics_directory()  # the children inherit it
    pool = Pool(count, args, directory=directory, status_fresh_s=2 * status_every_s + 1)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, pool.stop, signum)
    health = HealthServer(pool.live, pool.ready, processes.exposition)
    if metrics_port is not None:
        await health.start(metrics_host, metrics_port)
    logger.info("worker pool: %d processes", count)
    try:
        await asyncio.gather(*(pool.watch(child) for child in pool.children))
    finally:
        await health.aclose()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(series, ignore_errors=True)
    logger.info("worker pool: stopped")
    return 0
