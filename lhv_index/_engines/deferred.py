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

Memory: the buffer is kept in blocks of about `BLOCK_BYTES`, filled in order and settled
from the last, so growing it copies nothing and each block is freed as soon as its items
are in the engine: while a restore's chain is inserted, the engine's growth and the
buffer's shrinking keep pace instead of the whole buffer outliving its last insert.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import numpy as np
import numpy.typing as npt

from lhv_index._distance import TopK, merge_topk, topk
from lhv_index._engines.base import Engine, EngineCapture
from lhv_index._types import Labels, Vectors
from lhv_index.errors import EngineError

__all__ = ["BLOCK_BYTES", "DeferredEngine"]

#: the buffer grows and shrinks by blocks of about this many bytes of vectors
BLOCK_BYTES = 8 * 1024 * 1024


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
        # are exactly 0 .. slots-1) and those added to it since (`_above[label - _below]`,
        # a byte per label: labels are handed out densely)
        self._below = inner.slots()
        self._above = np.zeros(0, dtype=np.bool_)
        self._rows: dict[int, int] = {}
        """label -> row; rows are 0 .. len-1, row r in block r // `_block`"""
        self._block = max(64, BLOCK_BYTES // (4 * max(inner.dim, 1)))
        self._labels: list[npt.NDArray[np.uint64]] = []
        self._vectors: list[Vectors] = []

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
        self._hide(new)
        rows = np.fromiter((self._rows[lb] for lb in labels.tolist()), np.intp, labels.size)
        self._write(rows, labels, vectors)

    def mark_deleted(self, labels: Labels) -> None:
        """Buffered labels leave the buffer. Every label an index hands out must stay in
        the inner engine, live or deleted (a snapshot's engine holds all its slots, and
        the index hands the label out again later), so a buffered label the inner
        engine never held goes in now, with its buffered vector, to be marked deleted
        there with the labels the buffer did not hold."""
        listed = labels.tolist()
        rest = [lb for lb in listed if lb not in self._rows]
        unheld = [lb for lb in dict.fromkeys(listed) if lb in self._rows and not self._holds(lb)]
        if unheld:
            rows = np.array([self._rows[lb] for lb in unheld], dtype=np.intp)
            self._add_inner(np.array(unheld, dtype=np.uint64), self._read(rows))
        self._forget(labels)
        dead = rest + unheld
        if dead:
            self.inner.mark_deleted(np.array(dead, dtype=np.uint64))

    def get(self, labels: Labels) -> Vectors:
        if not self._rows:
            return self.inner.get(labels)
        listed = labels.tolist()
        mine = np.array([lb in self._rows for lb in listed], dtype=np.bool_)
        out = np.empty((labels.size, self.dim), dtype=np.float32)
        if mine.any():
            rows = [self._rows[lb] for lb, m in zip(listed, mine.tolist(), strict=True) if m]
            out[mine] = self._read(np.array(rows, dtype=np.intp))
        if not mine.all():
            out[~mine] = self.inner.get(labels[~mine])
        return out

    def query(self, queries: Vectors, k: int, *, ef: int) -> TopK:
        """The inner engine's top k merged with an exact top k of the buffer. Raises the
        inner engine's `ShortResult` when it cannot return k (the index then answers by
        brute force over every live label, buffer included)."""
        found = self.inner.query(queries, k, ef=ef)
        if k <= 0:
            return found
        for labels, vectors in self._filled():
            exact = topk(self.metric, queries, vectors, labels, min(k, labels.size))
            found = merge_topk(found, exact, k)
        return found

    def settle(self, max_items: int) -> int:
        """Move up to `max_items` buffered items into the inner engine (one add); returns
        the items still buffered."""
        n = len(self._rows)
        take = min(max(max_items, 0), n)
        if take:
            labels, vectors = self._tail(n - take, n)
            self._add_inner(labels, vectors)
            for label in labels.tolist():
                del self._rows[label]
            self._shrink(n - take)
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
        """Blocks enough for `rows` rows (appended: nothing is copied)."""
        while len(self._labels) * self._block < rows:
            self._labels.append(np.empty(self._block, dtype=np.uint64))
            self._vectors.append(np.empty((self._block, self.dim), dtype=np.float32))

    def _shrink(self, rows: int) -> None:
        """Free the blocks past those `rows` rows need."""
        keep = -(-rows // self._block)
        del self._labels[keep:], self._vectors[keep:]

    def _filled(self) -> list[tuple[Labels, Vectors]]:
        """The filled part of each block, in row order."""
        n, size = len(self._rows), self._block
        return [
            (labels[: min(size, n - i * size)], vectors[: min(size, n - i * size)])
            for i, (labels, vectors) in enumerate(zip(self._labels, self._vectors, strict=True))
            if i * size < n
        ]

    def _write(self, rows: npt.NDArray[np.intp], labels: Labels, vectors: Vectors) -> None:
        """Row `rows[j]` holds `labels[j]`, `vectors[j]`."""
        blocks, offsets = np.divmod(rows, self._block)
        for b in np.unique(blocks).tolist():
            pick = blocks == b
            self._labels[b][offsets[pick]] = labels[pick]
            self._vectors[b][offsets[pick]] = vectors[pick]

    def _read(self, rows: npt.NDArray[np.intp]) -> Vectors:
        """The vectors of `rows` (a copy)."""
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        blocks, offsets = np.divmod(rows, self._block)
        for b in np.unique(blocks).tolist():
            pick = blocks == b
            out[pick] = self._vectors[b][offsets[pick]]
        return out

    def _tail(self, start: int, end: int) -> tuple[Labels, Vectors]:
        """Copies of rows `start .. end-1` (start < end)."""
        size = self._block
        parts = [
            (
                self._labels[b][max(start - b * size, 0) : end - b * size],
                self._vectors[b][max(start - b * size, 0) : end - b * size],
            )
            for b in range(start // size, -(-end // size))
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _forget(self, labels: Labels) -> None:
        """Drop `labels` from the buffer (the last row fills each hole)."""
        for label in labels.tolist():
            row = self._rows.pop(label, None)
            if row is None:
                continue
            last = len(self._rows)
            if row != last:
                lb, lo = divmod(last, self._block)
                moved = int(self._labels[lb][lo])
                rb, ro = divmod(row, self._block)
                self._labels[rb][ro] = moved
                self._vectors[rb][ro] = self._vectors[lb][lo]
                self._rows[moved] = row
        self._shrink(len(self._rows))

    def _add_inner(self, labels: Labels, vectors: Vectors) -> None:
        self.inner.add(labels, vectors)
        up = labels[labels >= self._below].astype(np.intp) - self._below
        if up.size:
            need = int(up.max()) + 1
            if need > self._above.size:
                grown = np.zeros(max(need, 2 * self._above.size), dtype=np.bool_)
                grown[: self._above.size] = self._above
                self._above = grown
            self._above[up] = True

    def _holds(self, label: int) -> bool:
        """Whether the inner engine holds `label` (live or deleted)."""
        up = label - self._below
        return up < 0 or (up < self._above.size and bool(self._above[up]))

    def _hide(self, labels: list[int]) -> None:
        """Mark deleted in the inner engine those of `labels` live there (the others are
        new to it, or deleted already)."""
        for label in labels:
            if not self._holds(label):
                continue  # never added to the inner engine
            with suppress(EngineError):  # deleted there already: nothing to hide
                self.inner.mark_deleted(np.array([label], dtype=np.uint64))
