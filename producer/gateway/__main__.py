"""``python -m producer.gateway [--host H] [--port P]``: the gateway as a process of its own."""

from __future__ import annotations

import argparse

from shared import logs
from shared.settings import Settings

from . import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="streamfleet gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = Settings()
    logs.configure(settings.log_format)
    serve(settings, host=args.host, port=args.port)
