"""``python -m simulator``: what ``streamfleet simulator`` runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from .app import SimulatorConfig, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="streamfleet simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tps", type=float, default=50.0, help="tokens per second (default 50)")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token (default 20 ms)")
    parser.add_argument("--replay-dir", type=Path, default=None, help="where recorded .sse files are")
    args = parser.parse_args(argv)
    config = SimulatorConfig(tps=args.tps, ttft_ms=args.ttft_ms, replay_dir=args.replay_dir)
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
