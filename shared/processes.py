"""Helpers for a supervisor and its children (the worker pool and the multi-process gateway).

- ``available_cores``: how many processes "one per core" means in this container.
- ``end_with_parent``: a child is told to drain (SIGTERM) when its supervisor dies, even of a SIGKILL.
- ``metrics_directory`` / ``exposition`` / ``forget_dead``: Prometheus' multiprocess mode, so one
  port serves every child's series.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import signal
import tempfile
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
PR_SET_PDEATHSIG = 1
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def end_with_parent() -> None:
    """Linux: SIGTERM this process (it drains) when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def metrics_directory() -> Path:
    """A fresh directory for the children's series, named in the environment they inherit."""
    directory = Path(tempfile.mkdtemp(prefix="streamfleet-metrics-"))
    os.environ[MULTIPROCESS_ENV] = str(directory)
    return directory


def exposition() -> bytes:
    """The Prometheus text of this process or, under a supervisor, of all its children together."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def forget_dead() -> None:
    """Drop the live gauges (``livesum``, ``liveall``...) of children that are gone, so they leave the sums."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return
    for path in Path(directory).glob("gauge_live*_*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if match and not Path(f"/proc/{match[1]}").exists():
            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(int(match[1]), directory)  # type: ignore[no-untyped-call]
