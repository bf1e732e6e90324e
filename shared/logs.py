"""Logging for every process: JSON lines when stderr is not a terminal, readable text when it is.

A JSON line carries ``ts``, ``level``, ``logger``, ``msg`` and whatever the call passed in ``extra``
(for job lines: ``job``, ``attempt``, ``worker``, ``event`` and timings). Nothing logs request bodies
or keys: settings hold secrets as ``SecretStr``, and arq's job lines (which print job arguments) are
kept to warnings by the worker.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import orjson

LogFormat = Literal["auto", "json", "text"]
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update((key, value) for key, value in record.__dict__.items() if key not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Set up the root logger for a process (once, at its entry point)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json" or (log_format == "auto" and not sys.stderr.isatty()):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
