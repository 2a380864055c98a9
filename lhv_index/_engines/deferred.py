"""Deferred inserts: an engine's adds held in a buffer that is searched exactly, and
moved into the engine later, a chunk at a time.

A restore applies delta segments and then replays the log's tail; each of their items
costs an HNSW insert (an insert rewires neighbours all over the graph, so no cheaper
form of it can be stored). Deferred, an add costs a row copy: the item is searchable at
once, by an exact scan of the buffer merged with the engine's own top k, and the inserts
run afterwards (`Index.settle`), while the index answers. Results are exact over the
buffer and as good as the engine's over the rest.

`DeferredEngine` wraps the engine while `Index.defer_inserts` is on or the buffer is not
empty; the index unwraps it once both are over. The buffer's labels are never live in
the inner engine: a live label added to the buffer is first marked deleted there, and
settling it adds it back (an hnswlib add of a deleted label replaces and revives it).
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import numpy as np

from lhv_index._distance import TopK, merge_topk, topk
from lhv_index._engines.base import Engine, EngineCapture
from lhv_index._types import Labels, Vectors
from lhv_index.errors import EngineError

__all__ = ["DeferredEngine"]


class DeferredEngine:
    """`inner` plus a buffer of deferred adds (see the module docstring). Calls follow
    the `Engine` protocol's locking: the index holds its exclusive lock for writes,
    `settle`, `capture` and `dump`."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.metric = inner.metric
        self.dim = inner.dim
        self.replace_in_place = inner.replace_in_place
        self.deferring = True
        """whether adds go to the buffer (else to the inner engine, as without a wrapper)"""
        # the labels the inner engine holds (live or deleted): every label below
        # `_below` (an index adds each label it hands out at once, so at the wrap those
        # are exactly 0 .. slots-1) and those added to it since (`_above`)
        self._below = inner.slots()
        self._above: set[int] = set()
        self._rows: dict[int, int] = {}
        self._labels = np.empty(0, dtype=np.uint64)
        self._vectors = np.empty((0, inner.dim), dtype=np.float32)

    def __len__(self) -> int:
        """Items in the buffer."""
        return len(self._rows)

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    def reserve(self, capacity: int) -> None:
        self.inner.reserve(capacity)

    def slots(self) -> int:
        return self.inner.slots()

    def add(self, labels: Labels, vectors: Vectors) -> None:
        if not labels.size:
            return
        if not self.deferring:
            self._forget(labels)
            self._add_inner(labels, vectors)
            return
        n = len(self._rows)
        new = [lb for lb in labels.tolist() if lb not in self._rows]
        self._grow(n + len(new))
        for row, label in enumerate(new, start=n):
            self._rows[label] = row
            self._labels[row] = label
        self._hide(new)
        rows = np.fromiter((self._rows[lb] for lb in labels.tolist()), np.intp, labels.size)
        self._vectors[rows] = vectors

    def mark_deleted(self, labels: Labels) -> None:
        rest = [lb for lb in labels.tolist() if lb not in self._rows]
        self._forget(labels)
        if rest:
            self.inner.mark_deleted(np.array(rest, dtype=np.uint64))

    def get(self, labels: Labels) -> Vectors:
        if not self._rows:
            return self.inner.get(labels)
        listed = labels.tolist()
        mine = np.array([lb in self._rows for lb in listed], dtype=np.bool_)
        out = np.empty((labels.size, self.dim), dtype=np.float32)
        if mine.any():
            rows = [self._rows[lb] for lb, m in zip(listed, mine.tolist(), strict=True) if m]
            out[mine] = self._vectors[np.array(rows, dtype=np.intp)]
        if not mine.all():
            out[~mine] = self.inner.get(labels[~mine])
        return out

    def query(self, queries: Vectors, k: int, *, ef: int) -> TopK:
        """The inner engine's top k merged with an exact top k of the buffer. Raises the
        inner engine's `ShortResult` when it cannot return k (the index then answers by
        brute force over every live label, buffer included)."""
        found = self.inner.query(queries, k, ef=ef)
        n = len(self._rows)
        if n == 0 or k <= 0:
            return found
        exact = topk(self.metric, queries, self._vectors[:n], self._labels[:n], min(k, n))
        return merge_topk(found, exact, k)

    def settle(self, max_items: int) -> int:
        """Move up to `max_items` buffered items into the inner engine (one add); returns
        the items still buffered."""
        n = len(self._rows)
        take = min(max(max_items, 0), n)
        if take:
            start = n - take
            labels = self._labels[start:n].copy()
            self._add_inner(labels, np.ascontiguousarray(self._vectors[start:n]))
            for label in labels.tolist():
                del self._rows[label]
        return n - take

    def dump(self, path: str) -> dict[str, Any]:
        self.settle(len(self._rows))
        return self.inner.dump(path)

    def capture(self) -> EngineCapture:
        """Settles every buffered item first (the engine's bytes must hold them)."""
        self.settle(len(self._rows))
        return self.inner.capture()

    # -- the buffer ---------------------------------------------------------------------

    def _grow(self, rows: int) -> None:
        if rows <= self._labels.size:
            return
        size = max(rows, 2 * self._labels.size, 1024)
        labels = np.empty(size, dtype=np.uint64)
        vectors = np.empty((size, self.dim), dtype=np.float32)
        n = len(self._rows)
        labels[:n] = self._labels[:n]
        vectors[:n] = self._vectors[:n]
        self._labels, self._vectors = labels, vectors

    def _forget(self, labels: Labels) -> None:
        """Drop `labels` from the buffer (the last row fills each hole)."""
        for label in labels.tolist():
            row = self._rows.pop(label, None)
            if row is None:
                continue
            last = len(self._rows)
            if row != last:
                moved = int(self._labels[last])
                self._labels[row] = moved
                self._vectors[row] = self._vectors[last]
                self._rows[moved] = row

    def _add_inner(self, labels: Labels, vectors: Vectors) -> None:
        self.inner.add(labels, vectors)
        self._above.update(lb for lb in labels.tolist() if lb >= self._below)

    def _hide(self, labels: list[int]) -> None:
        """Mark deleted in the inner engine those of `labels` live there (the others are
        new to it, or deleted already)."""
        below, above = self._below, self._above
        for label in labels:
            if label >= below and label not in above:
                continue  # never added to the inner engine
            with suppress(EngineError):  # deleted there already: nothing to hide
                self.inner.mark_deleted(np.array([label], dtype=np.uint64))
