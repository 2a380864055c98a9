"""The worker's background tasks, owned explicitly: none fails unseen.

Two kinds (the `Worker` docstring lists which task is which):

- long-lived (`start`): a partition runner, a restore, the search offset commits, the
  merge sweeper. Cancelling one is normal (a revoke); any other end with an exception is
  fatal: it is logged, kept, and `failed()` returns it, so `Worker.run()` ends with that
  error and the process exits non-zero (the supervisor restarts it). A long-lived task
  that returns normally is simply done.
- best effort (`spawn`): a step whose failure loses nothing that a later step or a
  replay does not redo (garbage collection, a step run after a checkpoint, a wake-up).
  Its failure is logged with its traceback and counted in
  `lhv_background_failures_total{task}`.

`close()` cancels everything still running and waits for it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

from worker.telemetry.metrics import Metrics

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)


def _kind(name: str) -> str:
    """A task's kind, for the metric label: its name without the partition or offset."""
    return name.split("-", 1)[0] if name[:1].isalpha() else "task"


class Supervisor:
    """Owns the worker's background tasks (module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._closed = False

    def start(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run a long-lived task; its crash is fatal (see `failed`). Returns the task, which
        the caller may cancel."""
        task = self._track(coro, name)
        task.add_done_callback(self._long_lived_done)
        return task

    def spawn(self, coro: Awaitable[Any], *, name: str) -> None:
        """Run a best-effort step; its failure is logged and counted."""
        task = self._track(coro, name)
        task.add_done_callback(self._step_done)

    def _track(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            if inspect.iscoroutine(coro):
                coro.close()
            raise RuntimeError(f"background task {name!r} started after close")
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        return task

    def _long_lived_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self._metrics.background_failed(_kind(task.get_name()))
        log.error("background task %s crashed", task.get_name(), exc_info=exc)
        if self._failure is None:
            self._failure = exc
            self._failed.set()

    def _step_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._metrics.background_failed(_kind(task.get_name()))
            log.warning("background step %s failed", task.get_name(), exc_info=exc)

    @property
    def failure(self) -> BaseException | None:
        """The error of the first long-lived task that crashed, if any."""
        return self._failure

    def raise_failure(self) -> None:
        """Raise the error of the first long-lived task that crashed, if any."""
        if self._failure is not None:
            raise self._failure

    async def failed(self) -> None:
        """Wait until a long-lived task crashes, then raise its error."""
        await self._failed.wait()
        self.raise_failure()

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task still running and wait for them. Idempotent."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
