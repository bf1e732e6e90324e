"""``python -m worker``: what ``streamfleet worker`` runs."""

from __future__ import annotations

import argparse
import sys

import uvloop

from shared import logs, processes
from shared.errors import ConfigurationError
from shared.settings import load_settings

from .main import run
from .pool import supervise


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="streamfleet worker")
    parser.add_argument("--concurrency", type=positive, default=None, help="jobs run at once (default: setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /livez, /readyz here")
    parser.add_argument(
        "--processes", type=positive, default=None, help="worker processes (default: setting, else the cores)"
    )
    parser.add_argument("--status-file", default=None, help=argparse.SUPPRESS)  # a pool's child writes its probes here
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"streamfleet: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_format)
    metrics_port = args.metrics_port or settings.metrics_port
    count = args.processes or settings.worker_processes or processes.available_cores()
    if count > 1:
        child_args = [
            *(["--concurrency", str(args.concurrency)] if args.concurrency else []),
            *(["--burst"] if args.burst else []),
        ]
        sys.exit(
            uvloop.run(
                supervise(
                    count,
                    child_args,
                    status_every_s=settings.lease_seconds / 5,
                    metrics_host=settings.metrics_host,
                    metrics_port=metrics_port,
                )
            )
        )
    run(
        settings,
        concurrency=args.concurrency,
        burst=args.burst,
        metrics_port=metrics_port,
        status_file=args.status_file,
    )


if __name__ == "__main__":
    main()
