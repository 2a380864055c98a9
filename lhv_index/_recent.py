"""The vectors given to the engine since the last capture, kept for the next delta.

A delta holds the vector of every id written since the previous capture. Reading them
back from hnswlib (`get_items`) builds a Python float per component under the GIL: about
8 us an item, 0.4 s for a 50 000-item delta, all of it with the index's lock held and the
partition's writes waiting. `RecentVectors` keeps a copy of what each write gave the
engine instead, so `Index.capture_delta` copies rows. It is bounded by `max_bytes`: past
it the oldest writes are forgotten, and a capture reads those ids from the engine. An
index whose engine reads vectors back cheaply (exact, annoy: a slice of their matrix)
keeps none (`max_bytes` 0), so its writes copy nothing more.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

from lhv_index._types import Labels, Vectors

__all__ = ["RECENT_MAX_BYTES", "RecentVectors"]

#: vectors kept for the next delta, at most (the oldest writes go first)
RECENT_MAX_BYTES = 64 * 1024 * 1024


class RecentVectors:
    """Labels and the vectors the engine was given for them, in write order."""

    def __init__(self, dim: int, max_bytes: int = RECENT_MAX_BYTES) -> None:
        self.dim = dim
        self.max_bytes = max_bytes
        self._chunks: deque[tuple[Labels, Vectors]] = deque()
        self._bytes = 0

    def record(self, labels: Labels, vectors: Vectors) -> None:
        """`labels` were given `vectors` (as the engine holds them), after every earlier
        record."""
        if not labels.size or self.max_bytes <= 0:
            return
        vectors = np.array(vectors, dtype=np.float32, copy=True)
        self._chunks.append((labels.astype(np.uint64, copy=True), vectors))
        self._bytes += vectors.nbytes
        while self._bytes > self.max_bytes and self._chunks:
            _, old = self._chunks.popleft()
            self._bytes -= old.nbytes

    def clear(self) -> None:
        """Forget everything (a capture took it, or labels changed meaning)."""
        self._chunks.clear()
        self._bytes = 0

    def take(self, labels: Labels) -> tuple[npt.NDArray[np.bool_], Vectors]:
        """For each of `labels`, whether its newest vector is kept, and those vectors
        (in the order of `labels`, found ones only: (found, dim)). The rows are copied
        from each kept chunk into the result: no copy of everything kept is made."""
        if not self._chunks or not labels.size:
            empty = np.empty((0, self.dim), dtype=np.float32)
            return np.zeros(labels.size, dtype=np.bool_), empty
        kept = np.concatenate([lb for lb, _ in self._chunks])
        # the newest row of each label: its first occurrence in the reversed order
        uniq, first = np.unique(kept[::-1], return_index=True)
        newest = kept.size - 1 - first
        pos = np.minimum(np.searchsorted(uniq, labels), uniq.size - 1)
        found = uniq[pos] == labels
        rows = newest[pos[found]]
        # rows by chunk: chunk i holds rows starts[i] .. starts[i + 1] - 1
        starts = np.cumsum([0, *(v.shape[0] for _, v in self._chunks)])
        order = np.argsort(rows, kind="stable")
        by_row = rows[order]
        bounds = np.searchsorted(by_row, starts)
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        for i, (_, vectors) in enumerate(self._chunks):
            lo, hi = bounds[i], bounds[i + 1]
            if lo < hi:
                out[order[lo:hi]] = vectors[by_row[lo:hi] - starts[i]]
        return found, out
