"""``python -m worker``: what ``streamfleet worker`` runs."""

from __future__ import annotations

import argparse

from shared import logs
from shared.settings import Settings

from .main import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="streamfleet worker")
    parser.add_argument("--concurrency", type=int, default=None, help="jobs run at once (default: setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /livez, /readyz here")
    args = parser.parse_args(argv)
    settings = Settings()
    logs.configure(settings.log_format)
    run(
        settings,
        concurrency=args.concurrency,
        burst=args.burst,
        metrics_port=args.metrics_port or settings.metrics_port,
    )


if __name__ == "__main__":
    main()
