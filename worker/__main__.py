"""``python -m worker``: what ``streamfleet worker`` runs."""

from __future__ import annotations

import argparse
import logging

from shared.settings import Settings

from .main import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="streamfleet worker")
    parser.add_argument("--concurrency", type=int, default=None, help="jobs run at once (default: setting)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(Settings(), concurrency=args.concurrency, burst=args.burst)


if __name__ == "__main__":
    main()
