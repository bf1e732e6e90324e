"""The embedded server: one per user, shared by processes started at the same moment, stopped by pid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from shared import embedded
from tests.conftest import cli

pytestmark = pytest.mark.slow

ENSURE = (
    "import sys; from pathlib import Path; from shared import embedded; "
    "s = embedded.ensure(Path(sys.argv[1])); print(s.url, s.pid, s.started)"
)


def test_processes_started_together_share_one_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    processes = [
        subprocess.Popen([sys.executable, "-c", ENSURE, str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    try:
        outputs = [process.communicate(timeout=30) for process in processes]
        lines = [out.decode().split() for out, _ in outputs]
        assert len({(url, pid) for url, pid, _ in lines}) == 1
        assert sorted(started for _, _, started in lines) == ["False", "False", "False", "True"]
        assert all(b"using the embedded Valkey server" in err and b"STREAMFLEET_REDIS_URL" in err for _, err in outputs)
        url, pid = lines[0][0], int(lines[0][1])
        assert redis.Redis.from_url(url).ping()
    finally:
        assert embedded.stop(state)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert embedded.running(state) is None
    assert not embedded.stop(state)


def test_redis_commands(tmp_path: Path) -> None:
    env = {"STREAMFLEET_STATE_DIR": str(tmp_path / "state"), "STREAMFLEET_REDIS_URL": ""}
    assert cli("redis", "url", env=env).returncode == 1
    url = cli("redis", "start", env=env).stdout.strip()
    try:
        assert url.startswith("redis://127.0.0.1:")
        assert cli("redis", "url", env=env).stdout.strip() == url
        assert cli("redis", "start", env=env).stdout.strip() == url
    finally:
        assert cli("redis", "stop", env=env).stdout.strip() == "stopped"
    assert cli("redis", "stop", env=env).stdout.strip() == "not running"


def test_demo_runs_and_stops_what_it_started(tmp_path: Path) -> None:
    """`make demo` is `streamfleet demo` in the project's venv: run it as a user would."""
    env = {
        **os.environ,
        "STREAMFLEET_STATE_DIR": str(tmp_path / "state"),
        "STREAMFLEET_REDIS_URL": "",
        "COLUMNS": "120",
    }
    demo = subprocess.run(
        [str(Path(sys.executable).parent / "streamfleet"), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "both subscribers saw the same text as the result: yes" in " ".join(demo.stdout.split())
    assert "stopped the embedded server this demo started" in demo.stdout
    assert embedded.running(tmp_path / "state") is None
