"""``make bench`` / ``python -m bench [scenario ...]``: run the scenarios, print one table, write JSON."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from . import cluster, fanin, gateway, jobs, memory, parse, streams, throughput, ttft
from .common import write_results

SCENARIOS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "ttft": ttft.run,
    "throughput": throughput.run,
    "streams": streams.run,
    "jobs": jobs.run,
    "memory": memory.run,
    "parse": parse.run,
    "gateway": gateway.run,
    "cluster": cluster.run,
    "fanin": fanin.run,
}


def _unit(key: str) -> str:
    return {"per_s": "/s", "us": "µs"}.get(key.split("_", 1)[1], key.split("_", 1)[1])


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(
            f"bench: unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    console = Console()
    table = Table(title="streamfleet benchmarks (each figure beside its baseline from the same run)")
    for column in ("scenario", "case", "fleet", "baseline", "ratio", "goal"):
        table.add_column(column)
    for name in names:
        rows = SCENARIOS[name]()
        write_results(name, rows)
        for row in rows:
            fleet = next(f"{v} {_unit(k)}" for k, v in row.items() if k.startswith("fleet_"))
            baseline = next(f"{v} {_unit(k)}" for k, v in row.items() if k.startswith("baseline_"))
            table.add_row(row["scenario"], row["case"], fleet, baseline, f"{row['ratio']}x", row["goal"])
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
