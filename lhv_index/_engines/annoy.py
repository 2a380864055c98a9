"""annoy behind the `Engine` protocol, for read-mostly indexes.

An annoy forest is immutable once built, so the engine serves three parts together:

- the *forest*: an annoy index over the labels that were live when it was cut, each at its
  vector of that moment (annoy item `i` is label `forest.labels[i]`);
- the *delta*: live labels written since the cut, searched exactly;
- the *stale* forest entries: a forest hit is used only when its label is live and was not
  written since the cut (`written[label] <= forest.cut`), so deleted and overwritten
  labels (the tombstones) never come back from the forest.

Every label write stamps `written[label]` with a new sequence number. When the writes since
the cut pass `max(REBUILD_MIN_CHANGES, REBUILD_FRACTION * forest size)`, a background
thread builds a new forest over the labels live at that moment and swaps it in atomically,
together with the delta of the writes made while it was building. Queries keep being
answered from the old forest and its delta during the build; writes are never blocked by
it. A forest that failed to build is logged and retried after twice as many writes.

The engine also keeps every vector in a label-indexed float32 matrix (like the exact
engine): `get`, the delta search, the rebuilds and the distances come from it, so every
distance is computed exactly from the stored vector, with the same conventions as the
other engines (cosine `1 - cos`, l2 squared euclidean, ip `1 - dot`), whatever annoy's own
metric reports (angular is `sqrt(2 (1 - cos))`, euclidean is not squared, dot is the dot
product). annoy is used only to pick candidates: `angular` under cosine, `dot` under ip,
`euclidean` under l2.

`search_k` (annoy nodes inspected per query) is `IndexParams.search_k` (-1: annoy's
default, n_trees x candidates asked for) when a query uses the index's own `ef_search`; a
query passing another `ef` gets `search_k = n_trees * max(ef, candidates asked for)`.

Forests are built straight into a temporary file (annoy's `on_disk_build`) and used
through annoy's mmap of it; the file is removed when its forest is dropped. A snapshot
hard-links it (no copy) into its own parts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from lhv_index._distance import Metric, TopK, merge_topk, topk
from lhv_index._engines.base import EngineCapture, ShortResult, capture_by_dump, engine_library
from lhv_index._types import Labels, Vectors
from lhv_index.errors import EngineError, SnapshotError

__all__ = [
    "PARTS",
    "REBUILD_FRACTION",
    "REBUILD_MIN_CHANGES",
    "AnnoyEngine",
    "annoy_metric",
]

if TYPE_CHECKING:
    import annoy


log = logging.getLogger(__name__)

AnnoyMetric = Literal["angular", "euclidean", "dot"]

#: label writes (adds, replacements, deletes) since the forest's cut that start a rebuild ...
REBUILD_MIN_CHANGES = 1024
#: ... or this fraction of the forest's size, whichever is larger
REBUILD_FRACTION = 0.02
#: threads annoy builds a forest with (-1: one per CPU)
BUILD_JOBS = -1
#: seed of every forest, so a forest of the same vectors is the same forest
FOREST_SEED = 1234
#: the files `dump` writes beside its main one, as `f"{path}.{part}"`
PARTS = ("forest", "forest_labels", "delta")
#: queries whose forest candidates are re-ranked at a time
_RERANK_ROWS = 128
#: vectors handed to annoy per chunk while building
_BUILD_CHUNK = 8192


def annoy_metric(metric: Metric, *, normalized: bool) -> AnnoyMetric:
    """annoy's metric for an engine metric; `normalized`: vectors are unit (cosine)."""
    if metric == "l2":
        return "euclidean"
    return "angular" if normalized else "dot"


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class _ForestFile:
    """A temporary file that is removed when this object is dropped (or at exit)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, _remove, path)

    @classmethod
    def create(cls) -> _ForestFile:
        fd, path = tempfile.mkstemp(prefix="lhv-annoy-", suffix=".ann")
        os.close(fd)
        return cls(path)


@dataclass(frozen=True, slots=True, eq=False)
class _Forest:
    """One immutable forest: annoy item `i` is label `labels[i]`, as written at `cut`."""

    index: annoy.AnnoyIndex
    labels: Labels
    cut: int
    """the write sequence number the forest reflects: later writes are not in it"""
    file: _ForestFile


@dataclass(frozen=True, slots=True, eq=False)
class _Delta:
    """Live labels written since the forest's cut (sorted) and their vectors (float64)."""

    labels: Labels
    vectors: npt.NDArray[np.float64]


class AnnoyEngine:
    """An annoy forest plus an exact delta and tombstones; labels are the index's labels."""

    #: replacing a vector is a row write and one write towards the next forest
    replace_in_place = True

    def __init__(
        self,
        *,
        metric: Metric,
        dim: int,
        capacity: int,
        n_trees: int,
        search_k: int,
        ef_search: int,
        normalized: bool,
    ) -> None:
        self.metric: Metric = metric
        self.dim = dim
        self.n_trees = n_trees
        self.search_k = search_k
        self.ef_search = ef_search
        self.annoy_metric: AnnoyMetric = annoy_metric(metric, normalized=normalized)
        capacity = max(capacity, 1)
        self._data: Vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._live: npt.NDArray[np.bool_] = np.zeros(capacity, dtype=np.bool_)
        self._written: npt.NDArray[np.int64] = np.zeros(capacity, dtype=np.int64)
        self._slots = 0
        self._count = 0
        self._seq = 0
        # guards everything below against the builder thread; writes take it whole, so the
        # builder sees no half-applied write, and queries take it to read forest + delta
        self._state = threading.Lock()
        self._forest: _Forest | None = None
        self._delta: set[int] = set()
        self._delta_view: _Delta | None = None
        self._changes = 0
        self._retry_at = 0
        self._builder: threading.Thread | None = None
        self._idle = threading.Condition(self._state)

    # -- sizes --------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return int(self._data.shape[0])

    def slots(self) -> int:
        return self._slots

    @property
    def forest_size(self) -> int:
        """Items in the current forest (0: none yet)."""
        forest = self._forest
        return 0 if forest is None else int(forest.labels.size)

    @property
    def delta_size(self) -> int:
        """Live labels served by exact search (written since the forest's cut)."""
        return len(self._delta)

    # -- writes -------------------------------------------------------------------------

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        with self._state:
            n = self._slots
            data = np.zeros((capacity, self.dim), dtype=np.float32)
            data[:n] = self._data[:n]
            live = np.zeros(capacity, dtype=np.bool_)
            live[:n] = self._live[:n]
            written = np.zeros(capacity, dtype=np.int64)
            written[:n] = self._written[:n]
            # a running build keeps reading the old matrix; rows written from now on go to
            # the new one and are newer than its cut anyway
            self._data, self._live, self._written = data, live, written

    def add(self, labels: Labels, vectors: Vectors) -> None:
        if labels.size == 0:
            return
        idx = labels.astype(np.intp)
        with self._state:
            self._seq += 1
            self._count += int(np.count_nonzero(~self._live[idx]))
            self._data[idx] = vectors
            self._live[idx] = True
            self._written[idx] = self._seq
            self._slots = max(self._slots, int(idx.max()) + 1)
            self._delta.update(idx.tolist())
            self._wrote(idx.size)

    def mark_deleted(self, labels: Labels) -> None:
        if labels.size == 0:
            return
        idx = labels.astype(np.intp)
        with self._state:
            self._seq += 1
            self._count -= int(np.count_nonzero(self._live[idx]))
            self._live[idx] = False
            self._written[idx] = self._seq
            self._delta.difference_update(idx.tolist())
            self._wrote(idx.size)

    def _wrote(self, n: int) -> None:
        """Bookkeeping after a write, under `_state`."""
        self._delta_view = None
        self._changes += n
        if self._builder is None and self._changes >= max(self._threshold(), self._retry_at):
            self._start_build()

    def _threshold(self) -> int:
        return max(REBUILD_MIN_CHANGES, int(REBUILD_FRACTION * self.forest_size))

    # -- rebuilds -----------------------------------------------------------------------

    def _start_build(self) -> None:
        """Cut a new forest at the current write: under `_state`."""
        cut = self._seq
        labels = np.flatnonzero(self._live[: self._slots]).astype(np.uint64)
        self._builder = threading.Thread(
            target=self._build_loop,
            args=(cut, labels, self._data, self._changes),
            name="lhv-annoy-build",
            daemon=True,
        )
        self._builder.start()

    def _build_loop(self, cut: int, labels: Labels, data: Vectors, changes: int) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                forest = self._build(cut, labels, data)
            except Exception:
                log.exception("annoy forest of %d items failed to build", labels.size)
                with self._state:
                    self._retry_at = 2 * max(self._changes, self._threshold())
                    self._builder = None
                    self._idle.notify_all()
                return
            with self._state:
                self._swap(forest, cut, changes)
                log.info(
                    "annoy forest of %d items built in %.2f s; %d in the delta",
                    labels.size,
                    time.perf_counter() - t0,
                    len(self._delta),
                )
                if self._changes < self._threshold():
                    self._builder = None
                    self._idle.notify_all()
                    return
                # writes during the build already call for the next forest
                cut, changes, data = self._seq, self._changes, self._data
                labels = np.flatnonzero(self._live[: self._slots]).astype(np.uint64)

    def _build(self, cut: int, labels: Labels, data: Vectors) -> _Forest | None:
        """A forest over `labels` as `data` holds them (outside `_state`).

        Rows rewritten while this runs may be read half-written: those labels are newer
        than `cut`, so their forest entries are never used.
        """
        if labels.size == 0:
            return None
        file = _ForestFile.create()
        index = engine_library("annoy", "annoy").AnnoyIndex(self.dim, self.annoy_metric)
        index.set_seed(FOREST_SEED)
        index.on_disk_build(file.path)
        for start in range(0, labels.size, _BUILD_CHUNK):
            rows = data[labels[start : start + _BUILD_CHUNK].astype(np.intp)].tolist()
            for offset, row in enumerate(rows):
                index.add_item(start + offset, row)
        index.build(self.n_trees, n_jobs=BUILD_JOBS)
        return _Forest(index=index, labels=labels, cut=cut, file=file)

    def _swap(self, forest: _Forest | None, cut: int, changes: int) -> None:
        """Make `forest` (cut at `cut`) current: under `_state`."""
        written = self._written
        self._delta = {lb for lb in self._delta if written[lb] > cut}
        self._delta_view = None
        self._forest = forest
        self._changes -= changes
        self._retry_at = 0

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for a running rebuild (and any it chains) to finish; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._idle:
            while self._builder is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def rebuild(self) -> None:
        """Fold the delta into a new forest now and wait for it (tests, benchmarks)."""
        self.join()
        with self._state:
            if self._builder is None:
                self._start_build()
        self.join()

    # -- reads --------------------------------------------------------------------------

    def get(self, labels: Labels) -> Vectors:
        return self._data[labels.astype(np.intp)].copy()

    def _view(self) -> tuple[_Forest | None, _Delta]:
        """The current forest and its delta, as one consistent pair."""
        with self._state:
            delta = self._delta_view
            if delta is None:
                labels = np.array(sorted(self._delta), dtype=np.uint64)
                vectors = self._data[labels.astype(np.intp)].astype(np.float64)
                delta = self._delta_view = _Delta(labels, vectors)
            return self._forest, delta

    def query(self, queries: Vectors, k: int, *, ef: int) -> TopK:
        n = queries.shape[0]
        if k <= 0 or n == 0:
            return np.empty((n, 0), dtype=np.uint64), np.empty((n, 0), dtype=np.float32)
        forest, delta = self._view()
        best: TopK | None = None
        if delta.labels.size:
            best = topk(self.metric, queries, delta.vectors, delta.labels, k)
        valid = self._count - int(delta.labels.size)  # live labels the forest serves
        want = min(k, valid)
        if forest is not None and want > 0:
            got = self._query_forest(forest, queries, want, ef, valid)
            best = got if best is None else merge_topk(best, got, k)
        if best is None or best[0].shape[1] < k:
            raise ShortResult(f"annoy returned fewer than {k} results")
        return best

    def _search_k(self, ef: int, fetch: int) -> int:
        if ef == self.ef_search:
            return self.search_k if self.search_k <= 0 else max(self.search_k, fetch)
        return self.n_trees * max(ef, fetch)

    def _query_forest(
        self, forest: _Forest, queries: Vectors, want: int, ef: int, valid: int
    ) -> TopK:
        """The `want` nearest of the `valid` forest labels per query (exact distances)."""
        m = int(forest.labels.size)
        live, written, cut = self._live, self._written, forest.cut
        # over-fetch in proportion to the forest entries that are tombstones
        stale = m - valid
        first = min(m, want + (math.ceil(2 * want * stale / m) + 4 if stale else 0))
        rows: list[Labels] = []
        for q in queries.tolist():
            fetch = first
            search_k = self._search_k(ef, fetch)
            while True:
                try:
                    pos = forest.index.get_nns_by_vector(q, fetch, search_k=search_k)
                except (IndexError, ValueError, RuntimeError) as exc:
                    raise EngineError(f"annoy: {exc}") from exc
                found = forest.labels[np.asarray(pos, dtype=np.intp)]
                idx = found.astype(np.intp)
                ok = found[live[idx] & (written[idx] <= cut)]
                if ok.size >= want or fetch >= m:
                    break
                fetch = min(m, 4 * fetch)
                search_k = search_k if search_k <= 0 else 4 * search_k
            if ok.size < want:
                raise ShortResult(f"annoy found {ok.size} of {want} results")
            rows.append(ok)
        return self._rerank(queries, rows, want)

    def _rerank(self, queries: Vectors, rows: list[Labels], want: int) -> TopK:
        """Exact distances to each row's candidates; the `want` nearest per row."""
        n = len(rows)
        out_l = np.empty((n, want), dtype=np.uint64)
        out_d = np.empty((n, want), dtype=np.float32)
        for start in range(0, n, _RERANK_ROWS):
            part = rows[start : start + _RERANK_ROWS]
            width = max(r.size for r in part)
            cand = np.zeros((len(part), width), dtype=np.uint64)
            pad = np.ones((len(part), width), dtype=np.bool_)
            for i, r in enumerate(part):
                cand[i, : r.size] = r
                pad[i, : r.size] = False
            q = queries[start : start + len(part)].astype(np.float64)
            v = self._data[cand.astype(np.intp)].astype(np.float64)
            dots = np.einsum("nd,nkd->nk", q, v)
            if self.metric == "ip":
                d = 1.0 - dots
            else:
                qq = np.einsum("nd,nd->n", q, q)
                vv = np.einsum("nkd,nkd->nk", v, v)
                d = np.maximum(qq[:, None] + vv - 2.0 * dots, 0.0)
            d[pad] = np.inf
            order = np.lexsort((cand, d), axis=1)[:, :want]
            out_l[start : start + len(part)] = np.take_along_axis(cand, order, axis=1)
            out_d[start : start + len(part)] = np.take_along_axis(d, order, axis=1)
        return out_l, out_d

    # -- snapshots ----------------------------------------------------------------------

    def capture(self) -> EngineCapture:
        return capture_by_dump(self)

    def dump(self, path: str) -> dict[str, Any]:
        """The matrix to `path`; the forest file, its labels and the delta labels to
        `path.forest`, `path.forest_labels` and `path.delta` (see `PARTS`)."""
        with self._state:
            forest, delta = self._forest, sorted(self._delta)
        with open(path, "wb") as f:
            self._data[: self._slots].tofile(f)
        if forest is None:
            open(f"{path}.forest", "wb").close()
            forest_labels = np.empty(0, dtype=np.uint64)
        else:
            try:
                os.link(forest.file.path, f"{path}.forest")
            except OSError:
                shutil.copyfile(forest.file.path, f"{path}.forest")
            forest_labels = forest.labels
        forest_labels.astype("<u8").tofile(f"{path}.forest_labels")
        np.array(delta, dtype="<u8").tofile(f"{path}.delta")
        return {
            "slots": self._slots,
            "annoy_metric": self.annoy_metric,
            "n_trees": self.n_trees,
            "parts": list(PARTS),
        }

    @classmethod
    def load(
        cls,
        path: str,
        *,
        metric: Metric,
        dim: int,
        slots: int,
        live: Labels,
        n_trees: int,
        search_k: int,
        ef_search: int,
        normalized: bool,
        state: dict[str, Any],
    ) -> AnnoyEngine:
        """Load what `dump` wrote; `live` are the live labels. The forest file is moved
        into the engine's own temporary file.

        Raises:
            SnapshotError: the parts do not fit each other or the parameters.
        """
        engine = cls(
            metric=metric,
            dim=dim,
            capacity=max(slots, 1),
            n_trees=n_trees,
            search_k=search_k,
            ef_search=ef_search,
            normalized=normalized,
        )
        if state.get("annoy_metric") != engine.annoy_metric:
            raise SnapshotError(f"annoy engine state {state!r} does not fit metric {metric}")
        data = np.fromfile(path, dtype="<f4")
        if data.size != slots * dim:
            raise SnapshotError(f"annoy section holds {data.size} floats, expected {slots} x {dim}")
        forest_labels = np.fromfile(f"{path}.forest_labels", dtype="<u8").astype(np.uint64)
        delta = np.fromfile(f"{path}.delta", dtype="<u8").astype(np.uint64)
        for what, labels in (("forest", forest_labels), ("delta", delta), ("live", live)):
            if labels.size and int(labels.max()) >= slots:
                raise SnapshotError(f"a {what} label is beyond the engine's slots")
            if labels.size and np.unique(labels).size != labels.size:
                raise SnapshotError(f"{what} labels repeat")
        if np.setdiff1d(delta, live).size:
            raise SnapshotError("a delta label is not live")
        if np.setdiff1d(live, np.union1d(forest_labels, delta)).size:
            raise SnapshotError("a live label is neither in the forest nor in the delta")
        engine._data[:slots] = data.reshape(slots, dim)
        engine._live[live.astype(np.intp)] = True
        engine._slots, engine._count = slots, int(live.size)
        # the forest reflects sequence 0; the delta was written after it
        engine._seq = 1
        engine._written[delta.astype(np.intp)] = 1
        engine._delta = set(delta.tolist())
        engine._changes = int(delta.size)
        engine._forest = _load_forest(engine, f"{path}.forest", forest_labels)
        return engine


def _load_forest(engine: AnnoyEngine, path: str, labels: Labels) -> _Forest | None:
    size = os.path.getsize(path)
    if labels.size == 0:
        if size:
            raise SnapshotError("annoy forest section is not empty but names no labels")
        return None
    file = _ForestFile.create()
    shutil.move(path, file.path)
    index = engine_library("annoy", "annoy").AnnoyIndex(engine.dim, engine.annoy_metric)
    try:
        index.load(file.path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SnapshotError(f"annoy could not load the forest: {exc}") from exc
    if index.get_n_items() != labels.size or index.get_n_trees() < 1:
        raise SnapshotError(
            f"annoy forest holds {index.get_n_items()} items, its labels {labels.size}"
        )
    return _Forest(index=index, labels=labels, cut=0, file=file)
