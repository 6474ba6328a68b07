"""One scheduler for every FineTuneJob: a due-time queue and a small, bounded
pool of workers, instead of a task per job.

Watch events and finished storage reads `wake` a job; a reconcile's answer
(`seconds until the next look`) schedules its next run. A job is never run by
two workers at once: a wake that arrives while it runs makes it run once more
right after. Memory per job is one dict entry and one heap entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from typing import Optional

log = logging.getLogger("kubetune.operator")

RunFn = Callable[[str], Awaitable[Optional[float]]]


class Scheduler:
    def __init__(self, run: RunFn, workers: int = 8):
        """`run(uid)` reconciles one job and returns the delay of its next run
        (None: do not schedule it again until woken)."""
        self._run = run
        self._workers = workers
        self._due: dict[str, float] = {}  # uid -> loop time it is due
        self._heap: list[tuple[float, str]] = []  # may hold stale entries (see _pop)
        self._running: set[str] = set()
        self._again: set[str] = set()  # woken while running
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._work(), name=f"kubetune-reconcile-{i}")
            for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self, uid: str) -> None:
        self.after(uid, 0.0)

    def after(self, uid: str, delay: float) -> None:
        """Run `uid` in `delay` seconds, or sooner if it is already due sooner."""
        if uid in self._running:
            if delay <= 0:
                self._again.add(uid)
            return  # the worker running it schedules its next run
        when = asyncio.get_running_loop().time() + max(delay, 0.0)
        due = self._due.get(uid)
        if due is not None and due <= when:
            return
        self._due[uid] = when
        heapq.heappush(self._heap, (when, uid))
        self._changed.set()

    async def run_now(self, uid: str) -> None:
        """Run `uid` in the caller's task, now (a new job's first reconcile, from
        its watch event: no hand-over to a worker, and kopf's own write for the
        event waits until the RayJob's create is sent). If it is running
        already, it runs once more right after instead."""
        if uid in self._running:
            self._again.add(uid)
            return
        self._due.pop(uid, None)  # its heap entry goes stale
        await self._run_one(uid)

    def forget(self, uid: str) -> None:
        self._due.pop(uid, None)
        self._again.discard(uid)

    def pending(self) -> int:
        return len(self._due)

    def running(self) -> int:
        """Reconciles in progress (workers' and `run_now`'s)."""
        return len(self._running)

    def _pop(self) -> tuple[Optional[str], Optional[float]]:
        """The next due job, or (None, seconds until one is due / None)."""
        now = asyncio.get_running_loop().time()
        while self._heap:
            when, uid = self._heap[0]
            if self._due.get(uid) != when:  # rescheduled or forgotten since
                heapq.heappop(self._heap)
                continue
            if when > now:
                return None, when - now
            heapq.heappop(self._heap)
            del self._due[uid]
            return uid, None
        return None, None

    async def _work(self) -> None:
        while True:
            uid, wait = self._pop()
            if uid is None:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=wait)
                continue
            await self._run_one(uid)

    async def _run_one(self, uid: str) -> None:
        self._running.add(uid)
        delay: Optional[float] = None
        try:
            delay = await self._run(uid)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - run() handles its own; a worker must not die
            log.exception("reconcile of %s failed", uid)
            delay = 1.0
        finally:
            self._running.discard(uid)
        if uid in self._again:
            self._again.discard(uid)
            delay = 0.0
        if delay is not None:
            self.after(uid, delay)
