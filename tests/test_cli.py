"""The ``streamfleet`` command line, run as a real process: output and exit codes (the README's "Using it")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator import expected_text
from tests.conftest import WorkerFactory, cli

pytestmark = pytest.mark.slow


def test_submit_tail_result_and_exit_codes(fleet_env: dict[str, str], start_worker: WorkerFactory) -> None:
    start_worker()
    submitted = cli("submit", "hello from the cli", "--model", "sim", env=fleet_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("job_") and "\n" not in job_id

    request = {"model": "sim", "messages": [{"role": "user", "content": "hello from the cli"}]}
    result = cli("result", job_id, "--timeout", "20", env=fleet_env)
    assert (result.returncode, result.stdout) == (0, expected_text(request) + "\n")

    tail = cli("tail", job_id, env=fleet_env)
    assert (tail.returncode, tail.stdout) == (0, expected_text(request) + "\n")

    events = [json.loads(line) for line in cli("tail", job_id, "--events", env=fleet_env).stdout.splitlines()]
    assert [e["type"] for e in events][:2] == ["queued", "started"] and events[-1]["type"] == "done"
    after = cli("tail", job_id, "--events", "--after", events[-2]["id"], env=fleet_env)
    assert [json.loads(line)["type"] for line in after.stdout.splitlines()] == ["done"]

    as_json = cli("result", job_id, "--json", env=fleet_env)
    assert json.loads(as_json.stdout)["result"]["text"] == expected_text(request)

    status = cli("status", job_id, env=fleet_env)
    assert json.loads(status.stdout)["status"] == "done"


def test_submit_follow_with_a_request_file(
    fleet_env: dict[str, str], start_worker: WorkerFactory, tmp_path: Path
) -> None:
    start_worker()
    request = {
        "model": "sim",
        "messages": [{"role": "user", "content": "from a file"}],
        "simulator": {"tokens": 9},
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    followed = cli("submit", "--request", str(path), "--follow", env=fleet_env)
    assert (followed.returncode, followed.stdout) == (0, expected_text(request) + "\n")
    from_stdin = cli("submit", "--request", "-", "--follow", env=fleet_env, input=json.dumps(request).encode())
    assert (from_stdin.returncode, from_stdin.stdout) == (0, expected_text(request) + "\n")


def test_cancelled_job_exits_3_and_timeout_exits_4(fleet_env: dict[str, str]) -> None:
    job_id = cli("submit", "nobody runs this", env=fleet_env).stdout.strip()
    waited = cli("result", job_id, "--timeout", "0.3", env=fleet_env)
    assert waited.returncode == 4 and "did not end" in waited.stderr
    assert cli("cancel", job_id, env=fleet_env).stdout.strip() == "cancelled"
    assert cli("cancel", job_id, env=fleet_env).stdout.strip() == "ended"
    assert cli("result", job_id, env=fleet_env).returncode == 3
    assert cli("tail", job_id, env=fleet_env).returncode == 3


def test_errors_exit_2_with_one_line(fleet_env: dict[str, str], tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    for args in (
        ("result", "job_unknown"),
        ("tail", "job_unknown"),
        ("cancel", "job_unknown"),
        ("submit", "--request", str(bad_json)),
        ("submit", "--request", str(tmp_path / "missing.json")),
        ("submit", "hi", "--endpoint", "embeddings"),
        ("submit",),
        ("tail", "job_x", "--after", "yesterday"),
        ("tail", "job_x", "--after", "99999999999999999999999"),  # past 2**64: Redis would refuse it
        ("tail", "job_x", "--after", "\u0661"),  # a digit, but not an ASCII one
        ("tail", "job_x", "--after", "5\n"),
        ("submit", "hi", "--idempotency-key", "a\tb"),  # control characters (a NUL cannot be an argument)
    ):
        ran = cli(*args, env=fleet_env)
        assert ran.returncode == 2, (args, ran.stdout, ran.stderr)
        assert ran.stderr.strip().count("\n") == 0 and ran.stderr.startswith("streamfleet: "), (
            args,
            ran.stderr,
        )


@pytest.mark.parametrize(
    ("variables", "args", "says"),
    [
        ({"STREAMFLEET_REDIS_URL": "redis://127.0.0.1:1/0"}, ("status",), "cannot reach Redis"),
        ({"STREAMFLEET_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}, ("submit", "hi"), "cannot reach Redis"),
        ({"STREAMFLEET_REDIS_URL": "http://redis:6379"}, ("status",), "STREAMFLEET_REDIS_URL"),
        ({"STREAMFLEET_UPSTREAM_BASE_URL": "ftp://x"}, ("worker",), "STREAMFLEET_UPSTREAM_BASE_URL"),
        ({"STREAMFLEET_UPSTREAM_BASE_URL": "ftp://x"}, ("gateway", "--port", "1"), "STREAMFLEET_UPSTREAM_BASE_URL"),
        ({}, ("result", "job_x", "--timeout", "-5"), "timeout"),
    ],
)
def test_configuration_errors_exit_2_with_one_line(
    variables: dict[str, str], args: tuple[str, ...], says: str, fleet_env: dict[str, str]
) -> None:
    ran = cli(*args, env={**fleet_env, **variables})
    assert ran.returncode == 2, (args, ran.stderr)
    assert says in ran.stderr and "Traceback" not in ran.stderr and "hunter2" not in ran.stderr


def test_failed_job_exits_1(fleet_env: dict[str, str], start_worker: WorkerFactory) -> None:
    start_worker(env={"STREAMFLEET_UPSTREAM_BASE_URL": fleet_env["STREAMFLEET_UPSTREAM_BASE_URL"] + "/nowhere"})
    followed = cli("submit", "fails", "--follow", env=fleet_env)
    assert followed.returncode == 1 and "upstream answered 404" in followed.stderr


def test_fleet_status_and_redis_url(fleet_env: dict[str, str], start_worker: WorkerFactory) -> None:
    start_worker()
    status = json.loads(cli("status", env=fleet_env).stdout)
    assert len(status["workers"]) == 1 and status["queued"] == 0
    assert cli("redis", "url", env=fleet_env).stdout.strip() == fleet_env["STREAMFLEET_REDIS_URL"]
