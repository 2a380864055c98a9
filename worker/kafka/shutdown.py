"""Stopping an aiokafka consumer whose `stop()` raises a `CancelledError` of its own.

`AIOKafkaConsumer.stop()` (aiokafka 0.14.0) awaits tasks it has just cancelled, and two of
them let the `CancelledError` out (aio-libs/aiokafka#647):

- a group-less consumer's coordinator task, cancelled before it first ran;
- a fetch that failed against an unreachable broker and sleeps out its retry backoff,
  outside the `except CancelledError` that covers its request: a worker told to stop
  (SIGTERM) while its broker was down ended with a traceback.

Either way `stop()` ends early, leaving the fetcher's tasks and the client's connections
open. `stop_consumer` tells that `CancelledError` from a cancellation of the calling task
(`Task.cancelling()`), which it passes on, and finishes the stop: the fetcher's tasks
cancelled, the client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer

__all__ = ["stop_consumer"]

log = logging.getLogger(__name__)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()`, finished when aiokafka's own fetch cancellation cuts it short
    (module docstring). A cancellation of the calling task is raised as usual."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("Kafka consumer's stop cut short by its own cancellation; finishing it")
        fetcher = getattr(consumer, "_fetcher", None)
        tasks = [getattr(fetcher, "_fetch_task", None), *getattr(fetcher, "_pending_tasks", ())]
        pending = [t for t in tasks if isinstance(t, asyncio.Task) and not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client = getattr(consumer, "_client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
