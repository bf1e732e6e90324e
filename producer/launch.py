"""The one seam through which the producer side starts the other parts of the fleet.

``producer`` never imports ``worker`` (nor the other way round): the CLI and the demo start a
worker, the simulator or the gateway as a process, by module name, with the same interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Literal, NoReturn

Part = Literal["worker", "simulator", "producer.gateway"]


def command(part: Part, *args: str) -> list[str]:
    """The argv that runs ``part`` with ``args``."""
    return [sys.executable, "-m", part, *args]


def exec_part(part: Part, *args: str) -> NoReturn:
    """Become ``part``: the process is replaced, so signals reach it directly."""
    argv = command(part, *args)
    os.execv(argv[0], argv)


def spawn(part: Part, *args: str, env: dict[str, str] | None = None, quiet: bool = True) -> subprocess.Popen[bytes]:
    """Start ``part`` as a child process."""
    output = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(
        command(part, *args),
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
    )
