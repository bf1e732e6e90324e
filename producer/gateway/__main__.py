"""``python -m producer.gateway [--host H] [--port P]``: the gateway as a process of its own."""

from __future__ import annotations

import argparse
import sys

from shared import logs
from shared.errors import ConfigurationError
from shared.settings import load_settings

from . import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="streamfleet gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None, help="processes on the port (default: setting, else 1)")
    args = parser.parse_args()
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"streamfleet: invalid settings: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_format)
    try:
        serve(settings, host=args.host, port=args.port, workers=args.workers)
    except ConfigurationError as exc:
        print(f"streamfleet: {exc}", file=sys.stderr)
        sys.exit(2)
