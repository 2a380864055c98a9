"""What the worker publishes about its indexes: sizes, and drift of vectors and distances.

`IndexObserver` keeps one `DriftMonitor` per index and sets the index gauges of
`Metrics`; the runner feeds it upserted vectors (in apply threads), the search server
the distances it answered, and `stats` reads its report. Cheap, thread-safe enough for
statistics (a monitor is created once per index).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from lhv_index._drift import DriftMonitor
from worker.service.partition import Partition
from worker.telemetry.metrics import Metrics

__all__ = ["IndexObserver"]


class IndexObserver:
    """Index sizes and drift, published to `metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._drift: dict[str, DriftMonitor] = {}

    def observe_indexes(self, partition: Partition, names: Iterable[str] | None = None) -> None:
        """Publish size and drift of `names` (default: all) of `partition`; a name no
        longer there was dropped, and its series go. Called from apply threads."""
        for name in sorted(names if names is not None else partition.indexes):
            index = partition.indexes.get(name)
            if index is None:
                self.forget_index(name)
                continue
            stats = index.stats()
            self._metrics.set_index_size(name, stats["count"], stats["deleted"])
            self.drift_report(name)

    def forget_index(self, name: str) -> None:
        """The index is gone from this worker (dropped, or its partition revoked)."""
        self._drift.pop(name, None)
        self._metrics.forget_index(name)

    def _drift_of(self, index: str) -> DriftMonitor:
        monitor = self._drift.get(index)
        if monitor is None:
            monitor = self._drift.setdefault(index, DriftMonitor())
        return monitor

    def observe_norms(self, index: str, norms: np.ndarray) -> None:
        """Feed the norms of upserted vectors to the index's drift monitor (called in apply
        threads, with the norms the index's validation computed)."""
        if norms.size:
            self._drift_of(index).observe_norms(norms)

    def observe_distances(self, index: str, distances: np.ndarray) -> None:
        """Feed the nearest distances of answered queries."""
        if distances.size:
            self._drift_of(index).observe_distances(distances)

    def drift_report(self, index: str) -> dict[str, Any] | None:
        """The index's drift report (also published as metrics); None before any data."""
        monitor = self._drift.get(index)
        if monitor is None:
            return None
        report = monitor.report()
        self._metrics.set_drift(index, report)
        return report
