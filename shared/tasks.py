"""Long-lived shared tasks, supervised: the loops that serve many jobs or subscribers at once (the
gateway's fan-out readers and pinger, the worker's heartbeat, orphan sweep, cancel listener and
timeout ticker).

A loop that dies of an unexpected error is logged with its traceback and started again after a
pause; it is never left dead and silent. ``healthy`` is False while any of them is down (waiting to
restart): the health probes report it, and ``restarts`` counts what happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)

RESTART_AFTER_S = 0.5


class Supervised:
    """A set of named long-lived tasks, each restarted when it dies of an unexpected error."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()
        self.restarts = 0

    def start(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``loop()`` as ``name`` until it returns (or ``aclose``), restarting it after an error."""
        self._tasks[name] = asyncio.create_task(self._run(name, loop), name=name)

    async def _run(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.restarts += 1
                self._down.add(name)
                logger.exception("%s died; restarting it in %.1f s", name, RESTART_AFTER_S)
                await asyncio.sleep(RESTART_AFTER_S)
                self._down.discard(name)

    @property
    def healthy(self) -> bool:
        """Every task is running (none has ended, none waits to restart)."""
        return not self._down and not any(task.done() for task in self._tasks.values())

    @property
    def down(self) -> list[str]:
        return sorted(self._down | {name for name, task in self._tasks.items() if task.done()})

    async def aclose(self, timeout: float = 5.0) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout)
