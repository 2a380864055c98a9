"""Brute force over a label-indexed numpy matrix: exact results, and the oracle in tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from lhv_index._distance import Metric, TopK, merge_topk, topk
from lhv_index._engines.base import EngineCapture, capture_to_file
from lhv_index._types import Labels, Vectors
from lhv_index.errors import SnapshotError

__all__ = ["ExactEngine"]

#: query rows are scored against this many stored vectors at a time
_CHUNK = 65_536


class ExactEngine:
    """Vectors in a (capacity, dim) float32 matrix, row = label, with a live mask."""

    #: replacing a vector is one row write
    replace_in_place = True

    def __init__(self, *, metric: Metric, dim: int, capacity: int) -> None:
        self.metric: Metric = metric
        self.dim = dim
        self._data: Vectors = np.zeros((max(capacity, 1), dim), dtype=np.float32)
        self._live: npt.NDArray[np.bool_] = np.zeros(max(capacity, 1), dtype=np.bool_)
        self._slots = 0

    @property
    def capacity(self) -> int:
        return int(self._data.shape[0])

    def slots(self) -> int:
        return self._slots

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        data = np.zeros((capacity, self.dim), dtype=np.float32)
        data[: self._slots] = self._data[: self._slots]
        live = np.zeros(capacity, dtype=np.bool_)
        live[: self._slots] = self._live[: self._slots]
        self._data, self._live = data, live

    def add(self, labels: Labels, vectors: Vectors) -> None:
        if labels.size == 0:
            return
        idx = labels.astype(np.intp)
        self._data[idx] = vectors
        self._live[idx] = True
        self._slots = max(self._slots, int(idx.max()) + 1)

    def mark_deleted(self, labels: Labels) -> None:
        self._live[labels.astype(np.intp)] = False

    def get(self, labels: Labels) -> Vectors:
        return self._data[labels.astype(np.intp)].copy()

    def query(self, queries: Vectors, k: int, *, ef: int) -> TopK:
        labels = np.flatnonzero(self._live[: self._slots]).astype(np.uint64)
        return self.query_labels(queries, k, labels)

    def query_labels(self, queries: Vectors, k: int, labels: Labels) -> TopK:
        """Exact top-k among `labels` only."""
        best: TopK | None = None
        for start in range(0, max(labels.size, 1), _CHUNK):
            part = labels[start : start + _CHUNK]
            got = topk(self.metric, queries, self._data[part.astype(np.intp)], part, k)
            best = got if best is None else merge_topk(best, got, k)
        assert best is not None
        return best

    def capture(self) -> EngineCapture:
        """`dump` to an anonymous temporary file (`capture_to_file`): no second copy of the
        matrix in memory."""
        return capture_to_file(self)

    def dump(self, path: str) -> dict[str, Any]:
        with open(path, "wb") as f:
            self._data[: self._slots].tofile(f)
        return {"slots": self._slots}

    @classmethod
    def load(
        cls, path: str, *, metric: Metric, dim: int, slots: int, deleted: Labels
    ) -> ExactEngine:
        """Load what `dump` wrote; `deleted` are the labels below `slots` that are not live."""
        data = np.fromfile(path, dtype=np.float32)
        if data.size != slots * dim:
            raise SnapshotError(f"exact section holds {data.size} floats, expected {slots} x {dim}")
        engine = cls(metric=metric, dim=dim, capacity=max(slots, 1))
        engine._data[:slots] = data.reshape(slots, dim)
        engine._live[:slots] = True
        engine._live[deleted.astype(np.intp)] = False
        engine._slots = slots
        return engine
