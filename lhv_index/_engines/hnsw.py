"""hnswlib behind the `Engine` protocol.

hnswlib facts this wrapper handles (0.8.0): over `max_elements` a batch is half-applied,
so `Index` reserves capacity first; `add_items` with an existing label replaces its vector
(and revives it when deleted, since `allow_replace_deleted` stays off); `knn_query` raises
when fewer than k results are reachable, so the query is retried with a larger ef and then
reported as `ShortResult`; `set_ef` is index-wide, so queries with different ef never run
at the same time (`_EfGate`); its `RuntimeError`s become `EngineError`.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from lhv_index._capture import FilePiece
from lhv_index._distance import Metric, TopK
from lhv_index._engines.base import EngineCapture, ShortResult, capture_to_file, engine_library
from lhv_index._types import Labels, Vectors
from lhv_index.errors import EngineError, SnapshotError

__all__ = ["HnswEngine", "hnsw_errors", "read_hnsw_header"]

if TYPE_CHECKING:
    import hnswlib


# hnswlib's saveIndex header: offsetLevel0_, max_elements_, cur_element_count,
# size_data_per_element_, label_offset_, offsetData_ (size_t), maxlevel_ (int),
# enterpoint_node_ (uint32), maxM_, maxM0_, M_ (size_t), mult_ (double), ef_construction_
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


@contextmanager
def hnsw_errors() -> Iterator[None]:
    """Translate hnswlib's errors into `EngineError`, chained."""
    try:
        yield
    except (RuntimeError, ValueError, IndexError) as exc:
        raise EngineError(f"hnswlib: {exc}") from exc


def read_hnsw_header(head: bytes, file_size: int, dim: int) -> dict[str, int]:
    """Check a saved hnswlib index against `dim` and its own size before hnswlib sees it
    (hnswlib checks little and can crash on a bad file).

    Raises:
        SnapshotError: the bytes are not a saved hnswlib index of this dim.
    """
    if len(head) < _HEADER.size:
        raise SnapshotError("hnsw section is shorter than its header")
    (
        offset_level0,
        max_elements,
        count,
        size_per_element,
        label_offset,
        offset_data,
        _max_level,
        _enter,
        _max_m,
        max_m0,
        m,
        _mult,
        _efc,
    ) = _HEADER.unpack_from(head)
    if offset_level0 != 0 or count > max_elements:
        raise SnapshotError("hnsw section header is corrupt")
    if label_offset - offset_data != dim * 4:
        raise SnapshotError(
            f"hnsw section holds vectors of dim {(label_offset - offset_data) // 4}, expected {dim}"
        )
    if size_per_element != label_offset + 8 or max_m0 != 2 * m:
        raise SnapshotError("hnsw section header is corrupt")
    if _HEADER.size + count * size_per_element > file_size:
        raise SnapshotError("hnsw section is shorter than its header says")
    return {"max_elements": max_elements, "count": count, "M": m}


class _EfGate:
    """Queries with the same ef run together; a different ef waits for them to finish."""

    def __init__(self, index: hnswlib.Index, ef: int) -> None:
        self._index = index
        self._cond = threading.Condition()
        self._ef = ef
        self._active = 0
        self._waiting = 0

    @contextmanager
    def use(self, ef: int) -> Iterator[None]:
        with self._cond:
            if self._active and self._ef != ef:
                self._waiting += 1
                try:
                    while self._active and self._ef != ef:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            if self._ef != ef:
                self._index.set_ef(ef)
                self._ef = ef
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active and self._waiting:
                    self._cond.notify_all()


class HnswEngine:
    """An hnswlib index; labels are the index's labels."""

    #: replacing a live label re-links its node: slower than inserting a new one
    replace_in_place = False

    def __init__(
        self,
        *,
        metric: Metric,
        dim: int,
        M: int,
        ef_construction: int,
        ef_search: int,
        capacity: int,
        index: hnswlib.Index | None = None,
    ) -> None:
        self.metric: Metric = metric
        self.dim = dim
        self.ef_search = ef_search
        if index is None:
            index = engine_library("hnswlib", "hnsw").Index(space=metric, dim=dim)
            with hnsw_errors():
                index.init_index(
                    max_elements=max(capacity, 1), M=M, ef_construction=ef_construction
                )
        index.set_ef(ef_search)
        self._index = index
        self._gate = _EfGate(index, ef_search)

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    @property
    def raw(self) -> hnswlib.Index:
        """The hnswlib object (benchmarks and tests only)."""
        return self._index

    def slots(self) -> int:
        return int(self._index.element_count)

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            with hnsw_errors():
                self._index.resize_index(capacity)

    def add(self, labels: Labels, vectors: Vectors) -> None:
        if labels.size:
            with hnsw_errors():
                self._index.add_items(vectors, labels)

    def mark_deleted(self, labels: Labels) -> None:
        with hnsw_errors():
            for label in labels.tolist():
                self._index.mark_deleted(label)

    def get(self, labels: Labels) -> Vectors:
        if labels.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        with hnsw_errors():
            out = self._index.get_items(labels, return_type="numpy")
        return np.ascontiguousarray(out, dtype=np.float32)

    def query(self, queries: Vectors, k: int, *, ef: int) -> TopK:
        n = queries.shape[0]
        if k <= 0 or n == 0:
            return np.empty((n, 0), dtype=np.uint64), np.empty((n, 0), dtype=np.float32)
        ef = max(ef, k)
        for attempt_ef in (ef, max(4 * ef, 2 * k + 16), max(16 * ef, 8 * k + 64)):
            with self._gate.use(attempt_ef):
                try:
                    labels, dists = self._index.knn_query(queries, k=k)
                except RuntimeError as exc:
                    if "contiguous 2D array" not in str(exc):
                        raise EngineError(f"hnswlib: {exc}") from exc
                    continue
            return labels.astype(np.uint64, copy=False), dists.astype(np.float32, copy=False)
        raise ShortResult(f"hnswlib returned fewer than {k} results")

    def capture(self) -> EngineCapture:
        """hnswlib's own `save_index`, written to an anonymous temporary file
        (`capture_to_file`): no copy of the graph in memory, and the lock is held for about
        as long as a copy would take (a write to the page cache). Its header is checked, as
        hnswlib reports no failed write.

        Raises:
            EngineError: the file could not be written, or came out short.
        """
        state, sections = capture_to_file(self)
        piece = sections[0][1][0]
        assert isinstance(piece, FilePiece)
        try:
            read_hnsw_header(os.pread(piece.file.fileno(), _HEADER.size, 0), piece.length, self.dim)
        except (OSError, SnapshotError) as exc:
            piece.close()
            raise EngineError(f"hnswlib wrote an unusable index: {exc}") from exc
        return state, sections

    def dump(self, path: str) -> dict[str, Any]:
        with hnsw_errors():
            self._index.save_index(path)
        return {"hnswlib_space": self.metric, "allow_replace_deleted": False}

    @classmethod
    def load(
        cls, path: str, *, metric: Metric, dim: int, M: int, ef_construction: int, ef_search: int
    ) -> HnswEngine:
        """Load what `dump` wrote (or hnswlib's `save_index`); check the header first."""
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            f.seek(0, 2)
            size = f.tell()
        header = read_hnsw_header(head, size, dim)
        if header["M"] != M:
            raise SnapshotError(f"hnsw section was built with M={header['M']}, params say {M}")
        index = engine_library("hnswlib", "hnsw").Index(space=metric, dim=dim)
        try:
            index.load_index(path, allow_replace_deleted=False)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise SnapshotError(f"hnswlib could not load the index: {exc}") from exc
        return cls(
            metric=metric,
            dim=dim,
            M=M,
            ef_construction=ef_construction,
            ef_search=ef_search,
            capacity=0,
            index=index,
        )
