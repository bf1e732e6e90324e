"""``python -m worker``: what ``streamfleet worker`` runs."""

from __future__ import annotations

import argparse
import sys

from shared import logs
from shared.errors import ConfigurationError
from shared.settings import load_settings

from .main import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="streamfleet worker")
    parser.add_argument("--concurrency", type=int, default=None, help="jobs run at once (default: setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /livez, /readyz here")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"streamfleet: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_format)
    run(
        settings,
        concurrency=args.concurrency,
        burst=args.burst,
        metrics_port=args.metrics_port or settings.metrics_port,
    )


if __name__ == "__main__":
    main()
