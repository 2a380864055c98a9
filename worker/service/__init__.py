"""The worker service: consume commands and queries, own partitions, checkpoint, serve.

`Worker` is the entry point (`async with Worker(config) as w: await w.run()`); its parts
live beside it, one module each (see docs/ARCHITECTURE.md). `Worker` is imported on first
use, so a submodule (`worker.service.config`, say) imports without the whole service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.service.worker import Worker

__all__ = ["Worker"]


def __getattr__(name: str) -> Any:
    if name == "Worker":
        from worker.service.worker import Worker

        return Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
