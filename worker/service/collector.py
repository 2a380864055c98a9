"""Python's cyclic garbage collector in a worker process: what it leaves out, how often.

A worker allocates container objects by the million and frees them by reference
counting: the dicts `orjson` makes for a record's items, the writes, outcomes and lists
of a batch. Almost none are in cycles, yet each allocation counts towards a collection:
with CPython's default thresholds (700, 10, 10) the young generation is traversed every
700 allocations and, as batches survive into the older generations, a full collection
traverses every tracked object again, the interpreter's and the libraries' included (the
modules, botocore's service models, aiokafka's client). Measured on a 300 000 x 128
ingest: 9% of the samples of the worker's Python threads were in the collector.

`settle_collector` runs once the worker has started: it moves the objects alive then (the
service itself, its clients and their models) out of the collector's reach with
`gc.freeze` and sets a young-generation threshold of `GEN0_THRESHOLD` allocations (the
older generations keep CPython's ratios of 10, so a full collection still comes every
`GEN0_THRESHOLD` x 100 allocations, a few seconds of ingest: garbage in cycles that holds
a large buffer, an HTTP response's, is not kept for long). Objects made after the start
are collected as before.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["GEN0_THRESHOLD", "settle_collector"]

log = logging.getLogger(__name__)

#: allocations of container objects between two collections of the young generation
GEN0_THRESHOLD = 10_000
#: collections of a generation between two collections of the next (CPython's own)
OLDER_THRESHOLDS = (10, 10)


def settle_collector() -> int:
    """Collect once, freeze what is alive, raise the thresholds (module docstring).
    Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *OLDER_THRESHOLDS)
    frozen = gc.get_freeze_count()
    log.info("gc: %d objects frozen at start, thresholds %s", frozen, gc.get_threshold())
    return frozen
