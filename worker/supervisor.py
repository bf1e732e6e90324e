"""Watching the jobs a worker runs: cancel requests and timeouts stop them, from outside; and the
wake-up that lets an idle worker take a new job the moment it is submitted.

A cancel request sets the job's cancel flag and publishes its id (``producer.client.FleetClient.cancel``). The
supervisor listens on that channel and cancels the task of a job it runs at once. Pub/sub misses only
what is published while its connection is down, so the flags of every job it runs are checked each
time the listener (re)subscribes, and, as a backstop, every ``SWEEP_S``: one EXISTS per job, which at
2,000 jobs every 2 s was 2.5 % of the worker's CPU.

Timeouts are checked here too, every ``TICK_S``, instead of arming a timer per upstream read: a job
only stamps ``Watch.last_event`` as each event arrives. The reason a task was cancelled is left on
its ``Watch``; a task cancelled with no reason is being shut down.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.settings import Settings
from shared.store import Stores
from shared.tasks import Supervised

logger = logging.getLogger(__name__)

TICK_S = 0.25
SWEEP_S = 30.0

CANCEL = "cancel"
FIRST_BYTE = "first_byte"
IDLE = "idle"
DEADLINE = "deadline"


class Watch:
    """One running job, as the supervisor sees it."""

    __slots__ = ("deadline", "first_byte_by", "job_id", "last_event", "reason", "task")

    def __init__(self, job_id: str, task: asyncio.Task[object], deadline: float) -> None:
        self.job_id = job_id
        self.task = task
        self.deadline = deadline
        self.first_byte_by: float | None = None
        self.last_event: float | None = None
        self.reason: str | None = None

    def streaming(self, first_byte_timeout: float) -> None:
        """An attempt opens its upstream request: the first-byte and idle timeouts apply."""
        self.first_byte_by = time.monotonic() + first_byte_timeout
        self.last_event = None

    def waiting(self) -> None:
        """Between attempts: only the deadline applies."""
        self.first_byte_by = self.last_event = None

    def take_reason(self) -> str | None:
        reason, self.reason = self.reason, None
        return reason


class Supervisor:
    """The jobs this worker runs, and what stops them early."""

    def __init__(self, stores: Stores, settings: Settings) -> None:
        self._stores = stores
        self._settings = settings
        self._watches: dict[str, Watch] = {}
        self._missed = True  # the listener (re)subscribed: a cancel may have been published before
        self.wake = asyncio.Event()
        """Set when a job was submitted (and by the poll loop when one of ours ends): look at the queue now."""

    @property
    def running(self) -> list[str]:
        return list(self._watches)

    def watch(self, job_id: str, task: asyncio.Task[object]) -> Watch:
        watch = Watch(job_id, task, time.monotonic() + self._settings.job_deadline_seconds)
        self._watches[job_id] = watch
        return watch

    def release(self, job_id: str) -> None:
        self._watches.pop(job_id, None)

    def stop(self, job_id: str, reason: str) -> None:
        """Cancel a job's task, leaving ``reason`` for it to read."""
        watch = self._watches.get(job_id)
        if watch is not None and watch.reason is None and not watch.task.done():
            logger.info("job %s: stopping (%s)", job_id, reason)
            watch.reason = reason
            watch.task.cancel()

    def start(self, tasks: Supervised) -> None:
        """Run the cancel listener and the timeout ticker under ``tasks``."""
        tasks.start("cancel listener", self._listen)
        tasks.start("timeout ticker", self._tick)

    async def _tick(self) -> None:
        idle = self._settings.idle_timeout_seconds
        last_sweep = 0.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for watch in list(self._watches.values()):
                if now > watch.deadline:
                    self.stop(watch.job_id, DEADLINE)
                elif watch.last_event is None and watch.first_byte_by is not None and now > watch.first_byte_by:
                    self.stop(watch.job_id, FIRST_BYTE)
                elif watch.last_event is not None and now - watch.last_event > idle:
                    self.stop(watch.job_id, IDLE)
            if self._missed or now - last_sweep >= SWEEP_S:
                last_sweep, self._missed = now, False
                await self._sweep()

    async def _sweep(self) -> None:
        job_ids = list(self._watches)
        if not job_ids:
            return
        try:
            flags = await self._stores.streams.cancel_requested(job_ids)
        except Exception as exc:
            logger.warning("cancel sweep failed: %s", exc)
            return
        for job_id, flagged in zip(job_ids, flags, strict=True):
            if flagged:
                self.stop(job_id, CANCEL)

    async def _listen(self) -> None:
        delay = 0.05
        while True:
            try:
                async with self._stores.queue.notifications(queued=self._settings.wake_on_submit) as messages:
                    delay, self._missed = 0.05, True
                    while True:
                        message = await messages.next(timeout=5.0)
                        if message is None:
                            continue
                        kind, job_id = message
                        if kind == "queued":
                            self.wake.set()
                        else:
                            self.stop(job_id, CANCEL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("cancel listener lost Redis (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
