"""`Index`: string ids, metadata and last-write-wins clocks over one engine.

State per live id: a label (`LabelMap`), the clock of its last write (`ClockTable`),
metadata as compact JSON bytes (None when empty), and under cosine the vector's norm (the
engine holds the normalized vector, so `get` returns vector * norm). Deleted ids leave a
tombstone (id -> clock), so an older add arriving later is ignored; `compact_tombstones`
drops the tombstones below a horizon (see `Index`).

Every id written (upserted, deleted, or whose tombstone was dropped) since the last
capture is tracked, so `capture_delta` copies those ids only; `capture_base` takes
everything a full snapshot needs (the engine's part as its own saved file). Both run under
the lock and encode nothing.

Locking: `search`, `get`, `stats`, `logical_state`, `live_items` and `clock_of` share the
lock; `apply`, `compact_tombstones`, the captures and delta application hold it alone
(see `_locks`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from lhv_index._capture import Base, Delta
from lhv_index._clock import Clock, ClockTable
from lhv_index._distance import TopK, merge_topk, topk
from lhv_index._engines import (
    DeferredEngine,
    Engine,
    ExactEngine,
    HnswEngine,
    ShortResult,
    make_engine,
    metric_of,
)
from lhv_index._filter import compile_filter, filter_key
from lhv_index._ids import LabelMap
from lhv_index._locks import RWLock
from lhv_index._metadata import MetaStore
from lhv_index._params import EF_MAX, EngineKind, IndexParams, Limits, Space
from lhv_index._recent import RECENT_MAX_BYTES, RecentVectors
from lhv_index._types import Columns, Hit, Item, Labels, Metadata, MetadataJson, Vectors
from lhv_index._validate import (
    META_CLEAR,
    META_KEEP,
    Prepared,
    ValidatedWrites,
    prepare,
    prepare_queries,
)
from lhv_index._writes import ApplyResult, Write
from lhv_index.errors import EngineError, InvalidRequest, SnapshotError, TooLarge

__all__ = ["COMPACT_DELETED_FRACTION", "COMPACT_MIN_SLOTS", "Index"]

log = logging.getLogger(__name__)

#: capacity of a new index when `max_elements_hint` is smaller
MIN_CAPACITY = 1024
#: rebuild the engine when free (deleted) slots exceed this fraction of all slots ...
COMPACT_DELETED_FRACTION = 0.3
#: ... and there are at least this many slots
COMPACT_MIN_SLOTS = 1024
#: a filter matching at most this many items is answered by brute force over them
FILTER_BRUTE_MAX = 20_000
#: vectors read from the engine at a time by brute force, rebuilds and `live_items`
CHUNK = 16_384
#: filters whose matching labels are cached (per index, until the next write)
FILTER_CACHE_SIZE = 16


class Index:
    """One vector index: see the module docstring and docs/ARCHITECTURE.md.

    Last-write-wins: a write is applied when its clock is newer than the stored clock of
    its id (live item or tombstone), so re-applying any record changes nothing and a
    replay of the log from any point at or before a checkpoint gives the same state.

    The tombstone horizon: `compact_tombstones(before_offset)` drops the tombstones whose
    offset is below `before_offset`, which the caller guarantees no replay will start
    before (a checkpoint covers it). The guarantee then reads:

    - A tombstone with client version 0 only beats version-0 writes of lower offset, and
      none can arrive any more: dropping it changes the outcome of no future write.
    - For a dropped tombstone with a client version > 0, `version_floor` keeps the highest
      such version. A later write with a client version > 0 to an id with no stored state
      (neither live nor tombstoned), whose version is at or below the floor, is refused
      with `InvalidRequest` ("older than the tombstone horizon") and nothing of its call
      is applied: it cannot resurrect an item a dropped tombstone had deleted. Writes to
      ids with stored state compare clocks as before; version-0 writes to unknown ids are
      applied as before.
    - Replay equivalence holds for live ids, their vectors, metadata and clocks, and for
      the tombstones at or above the horizon; tombstones below it may be absent. A replay
      that starts from an older checkpoint runs under that checkpoint's (lower) floor, so
      a versioned write at or below the newer floor may be refused in one run and applied
      in the other: compact only just before a checkpoint is captured
      (`capture_delta(compact_before=...)`), so the floor changes with checkpoints.
    """

    def __init__(self, name: str, params: IndexParams, *, limits: Limits | None = None) -> None:
        """A new, empty index.

        Raises:
            InvalidRequest: `params` over `limits` (`dim`, `max_elements_hint`), or a
                `max_elements_hint` this process cannot allocate.
        """
        limits = limits if limits is not None else Limits()
        limits.check_new(params)
        capacity = max(params.max_elements_hint, MIN_CAPACITY)
        try:
            self._setup(name, params, limits, make_engine(params, capacity))
        except MemoryError:
            if capacity == MIN_CAPACITY:
                raise
            raise InvalidRequest(
                f"max_elements_hint {params.max_elements_hint}: cannot allocate that much "
                "capacity up front; leave the hint lower, the index grows by itself"
            ) from None

    @classmethod
    def _with_engine(
        cls, name: str, params: IndexParams, limits: Limits | None, engine: Engine
    ) -> Index:
        """An empty index around an engine that was loaded (snapshots)."""
        index = cls.__new__(cls)
        index._setup(name, params, limits if limits is not None else Limits(), engine)
        return index

    def _setup(self, name: str, params: IndexParams, limits: Limits, engine: Engine) -> None:
        capacity = engine.capacity
        self.name = name
        self.params = params
        self.limits = limits
        self._lock = RWLock()
        self._engine = engine
        self._map = LabelMap()
        self._clocks = ClockTable(capacity)
        self._cosine = params.space is Space.COSINE
        self._norms: npt.NDArray[np.float32] = np.ones(
            capacity if self._cosine else 0, dtype=np.float32
        )
        self._meta = MetaStore(capacity)
        self._tombs: dict[str, Clock] = {}
        self._generation = 0
        self._filter_cache: OrderedDict[bytes, tuple[int, Labels]] = OrderedDict()
        self._filter_cache_lock = threading.Lock()
        self._broken: str | None = None
        #: ids written since the last capture (upserted, deleted, tombstone dropped)
        self._changed: set[str] = set()
        #: the vectors those writes gave the engine, for `capture_delta` (hnsw only: the
        #: other engines read vectors back as cheaply)
        self._recent = RecentVectors(
            params.dim, RECENT_MAX_BYTES if params.engine is EngineKind.HNSW else 0
        )
        #: highest client version of a dropped tombstone (see the class docstring)
        self._version_floor = 0

    # -- writes -------------------------------------------------------------------------

    def validate(self, writes: Sequence[Write]) -> ValidatedWrites:
        """Check every write without applying anything (the writes alone: the tombstone
        horizon, which depends on the stored state, is checked by `apply`). Returns them
        checked, for `apply` to take without checking them again.

        Raises:
            InvalidRequest: a bad item (`item` = its position; the message names its id).
            DimMismatch: a vector of another dim.
        """
        return ValidatedWrites(prepare(writes, self.params, self.limits), self.params, self.limits)

    def apply(self, writes: Sequence[Write] | ValidatedWrites) -> ApplyResult:
        """Validate all (unless `writes` come from `validate`), keep the newest write per
        id, drop those not newer than the stored clock (live or tombstone), apply the rest
        with one engine call. All or nothing. The result names the writes that won.

        Raises:
            InvalidRequest, DimMismatch: as `validate`, or a versioned write older than the
                tombstone horizon (see the class docstring); nothing is applied.
            EngineError: the engine failed; the index refuses further use (restore it).
        """
        if isinstance(writes, ValidatedWrites):
            prep = writes.prepared_for(self.params, self.limits)
        else:
            prep = prepare(writes, self.params, self.limits)
        with self._lock.exclusive():
            self._check_usable()
            won = self._apply(prep)
            if won:
                self._generation += 1
                self._maybe_compact()
        return ApplyResult(applied=len(won), skipped=len(prep.ids) - len(won), won=won)

    def _apply(self, prep: Prepared) -> tuple[int, ...]:
        """Apply a validated batch; returns the positions of the writes that won."""
        ids, clocks, rows, metas = prep.ids, prep.clocks, prep.rows, prep.metas
        labels_of = self._map.labels
        # One pass in arrival order gives what applying the writes one by one would give:
        # per id, the last effective write (newer than everything before it) wins, and its
        # metadata is resolved along the chain (None keeps, a delete clears).
        # id -> [winning pos or -1, clock, metadata, label before the batch]
        state: dict[str, list[Any]] = {}
        for pos, id_ in enumerate(ids):
            clock = clocks[pos]
            st = state.get(id_)
            if st is None:
                label = labels_of.get(id_)
                stored = self._clocks.get(label) if label is not None else self._tombs.get(id_)
                if stored is None and 0 < clock.version <= self._version_floor:
                    raise InvalidRequest(
                        f"item {pos}: version {clock.version} of an id with no stored state"
                        f" is older than the tombstone horizon (version floor"
                        f" {self._version_floor})",
                        item=pos,
                    )
                st = state[id_] = [-1, stored, META_KEEP, label]
            if st[1] is not None and clock <= st[1]:
                continue
            st[0], st[1] = pos, clock
            if rows[pos] < 0:
                st[2] = META_CLEAR
            elif metas[pos] is not META_KEEP:
                st[2] = metas[pos]
        update_pos: list[int] = []  # upserts of live ids
        update_labels: list[int] = []
        update_meta: list[bytes] = []
        new_pos: list[int] = []  # upserts of ids that are not live
        new_meta: list[bytes] = []
        delete_pos: list[int] = []  # deletes of live ids
        tomb_pos: list[int] = []  # deletes of ids that are not live
        for pos, _, meta, label in state.values():
            if pos < 0:
                continue
            if rows[pos] < 0:
                (delete_pos if label is not None else tomb_pos).append(pos)
            elif label is not None:
                update_pos.append(pos)
                update_labels.append(label)
                update_meta.append(meta)
            else:
                new_pos.append(pos)
                new_meta.append(META_CLEAR if meta is META_KEEP else meta)
        if not (update_pos or new_pos or delete_pos or tomb_pos):
            return ()

        new_ids = [ids[p] for p in new_pos]
        new_labels, fresh = self._map.allocate(len(new_pos))
        self._reserve(self._map.next_label + fresh)
        up_pos = update_pos + new_pos
        up_labels = np.array(update_labels + new_labels, dtype=np.uint64)
        sel = np.array([prep.rows[p] for p in up_pos], dtype=np.intp)
        if sel.size == prep.vectors.shape[0] and np.array_equal(sel, np.arange(sel.size)):
            vectors, norms = prep.vectors, prep.norms
        else:
            vectors, norms = prep.vectors[sel], prep.norms[sel]
        if self._cosine and sel.size:
            vectors = np.ascontiguousarray(vectors / norms[:, None], dtype=np.float32)
        delete_ids = [ids[p] for p in delete_pos]
        delete_labels = np.array([labels_of[i] for i in delete_ids], dtype=np.uint64)
        with self._engine_call("during apply"):
            self._engine.add(up_labels, vectors)
            if delete_labels.size:
                self._engine.mark_deleted(delete_labels)

        # bookkeeping: pure Python and numpy from here on
        self._recent.record(up_labels, vectors)
        self._map.bind(new_ids, new_labels, fresh)
        meta = self._meta
        for blob, label in zip(update_meta + new_meta, up_labels.tolist(), strict=True):
            if blob is not META_KEEP:
                meta.set(label, blob or None)
        for id_ in new_ids:
            self._tombs.pop(id_, None)
        if up_pos:
            self._clocks.set(up_labels.astype(np.intp), [clocks[p] for p in up_pos])
            if self._cosine:
                self._norms[up_labels.astype(np.intp)] = norms
        for label in self._map.release(delete_ids):
            meta.set(label, None)
        meta.maybe_compact()
        for p in delete_pos + tomb_pos:
            self._tombs[ids[p]] = clocks[p]
        self._changed.update([ids[p] for p in up_pos + delete_pos + tomb_pos])
        return tuple(sorted(up_pos + delete_pos + tomb_pos))

    def _reserve(self, slots: int) -> None:
        capacity = self._engine.capacity
        if slots <= capacity:
            return
        capacity = max(slots, capacity + capacity // 2)
        self._engine.reserve(capacity)
        self._clocks.reserve(capacity)
        self._meta.reserve(capacity)
        if self._cosine:
            norms = np.ones(capacity, dtype=np.float32)
            norms[: self._norms.shape[0]] = self._norms
            self._norms = norms

    def _maybe_compact(self) -> None:
        slots = self._map.next_label
        if slots >= COMPACT_MIN_SLOTS and len(self._map.free) > COMPACT_DELETED_FRACTION * slots:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the engine from the live items, labels `0 .. live-1` in label order."""
        old = np.fromiter(self._map.labels.values(), dtype=np.uint64)
        n = old.size
        log.info("index %s: rebuilding, %d live of %d slots", self.name, n, self._map.next_label)
        # an index restored from before the limit keeps its hint, within today's limit
        hint = min(self.params.max_elements_hint, self.limits.max_elements_hint)
        capacity = max(n, MIN_CAPACITY, hint)
        engine = make_engine(self.params, capacity)
        try:
            for start in range(0, n, CHUNK):
                part = old[start : start + CHUNK]
                engine.add(
                    np.arange(start, start + part.size, dtype=np.uint64), self._engine.get(part)
                )
        except Exception as exc:
            # the old engine is untouched: keep it
            log.error("index %s: rebuild failed, keeping the old engine: %s", self.name, exc)
            return
        idx = old.astype(np.intp)
        ids = self._map.ids.strings(idx)
        clocks = ClockTable(capacity)
        clocks.version[:n] = self._clocks.version[idx]
        clocks.offset[:n] = self._clocks.offset[idx]
        clocks.position[:n] = self._clocks.position[idx]
        if self._cosine:
            norms = np.ones(capacity, dtype=np.float32)
            norms[:n] = self._norms[idx]
            self._norms = norms
        self._meta.permute(idx, capacity)
        self._map = LabelMap()
        self._map.bind(ids, list(range(n)), n)
        self._clocks = clocks
        self._engine = engine
        self._recent.clear()  # every label changed

    # -- deferred inserts -----------------------------------------------------------------

    def defer_inserts(self, on: bool = True) -> None:
        """While on, the engine's inserts are deferred: an added vector is kept in a
        buffer searched exactly (merged with the engine's results) and inserted later by
        `settle`. For restores: delta segments and a replayed tail become searchable at
        the cost of a copy, not of an HNSW insert each (hnsw engine only; a no-op for
        the others, whose adds are cheap). Off: new adds go to the engine again; what is
        buffered stays searchable until settled."""
        with self._lock.exclusive():
            engine = self._engine
            if isinstance(engine, DeferredEngine):
                engine.deferring = on
            elif on and isinstance(engine, HnswEngine):
                self._engine = DeferredEngine(engine)

    @property
    def pending_inserts(self) -> int:
        """Items added but not yet inserted into the engine (see `defer_inserts`)."""
        engine = self._engine
        return len(engine) if isinstance(engine, DeferredEngine) else 0

    def settle(self, max_items: int = 1024) -> int:
        """Insert up to `max_items` deferred items into the engine, under the exclusive
        lock (searches wait for one call: keep `max_items` small); returns how many are
        still deferred. Once none are and deferral is off, the buffer is gone.

        Raises:
            EngineError: the engine failed; the index refuses further use.
        """
        with self._lock.exclusive():
            engine = self._engine
            if not isinstance(engine, DeferredEngine):
                return 0
            self._check_usable()
            with self._engine_call("while inserting deferred items"):
                left = engine.settle(max_items)
            if not left and not engine.deferring:
                self._engine = engine.inner
            return left

    # -- tombstones and captures ---------------------------------------------------------

    @property
    def version_floor(self) -> int:
        """The highest client version of a tombstone dropped by `compact_tombstones`."""
        return self._version_floor

    def compact_tombstones(self, before_offset: int) -> int:
        """Drop the tombstones whose clock offset is below `before_offset`; returns how many.

        The caller guarantees no replay will start at or before `before_offset - 1` (a
        durable checkpoint covers it). Version-0 tombstones go with no other effect; the
        highest client version among the others raises `version_floor` (see the class
        docstring for what that refuses). The dropped ids count as changed, so the next
        delta records them as gone.
        """
        with self._lock.exclusive():
            return self._compact_tombstones(before_offset)

    def _compact_tombstones(self, before_offset: int) -> int:
        drop = [id_ for id_, clock in self._tombs.items() if clock.offset < before_offset]
        for id_ in drop:
            version = self._tombs.pop(id_).version
            if version > self._version_floor:
                self._version_floor = version
        self._changed.update(drop)
        return len(drop)

    def capture_delta(self, *, compact_before: int | None = None) -> Delta:
        """Copy the state of every id written since the last capture, and start tracking
        anew. O(changed ids) under the exclusive lock; nothing is encoded.

        `compact_before`: run `compact_tombstones(compact_before)` first, under the same
        lock, so the horizon moves exactly with this capture.

        Note: the ids are no longer tracked once captured: a caller that fails to persist
        the delta must persist a base (`capture_base`) next, not a later delta.

        Raises:
            EngineError: the index is unusable.
        """
        with self._lock.exclusive():
            self._check_usable()
            if compact_before is not None:
                self._compact_tombstones(compact_before)
            changed = sorted(self._changed)
            self._changed = set()
            labels_of = self._map.labels
            live: list[str] = []
            live_labels: list[int] = []
            tomb_ids: list[str] = []
            gone: list[str] = []
            for id_ in changed:
                label = labels_of.get(id_)
                if label is not None:
                    live.append(id_)
                    live_labels.append(label)
                elif id_ in self._tombs:
                    tomb_ids.append(id_)
                else:
                    gone.append(id_)
            labels = np.array(live_labels, dtype=np.intp)
            meta_lens, meta_json = self._meta.take(labels)
            tomb_clocks = np.array([self._tombs[i] for i in tomb_ids], dtype=np.int64)
            return Delta(
                name=self.name,
                params=self.params,
                ids=live,
                clocks=self._clocks.take(labels),
                vectors=self._changed_vectors(labels.astype(np.uint64)),
                norms=self._norms[labels] if self._cosine else None,
                meta_lens=meta_lens,
                meta_json=meta_json,
                tomb_ids=tomb_ids,
                tomb_clocks=tomb_clocks.reshape(len(tomb_ids), 3),
                gone=gone,
                version_floor=self._version_floor,
            )

    def _changed_vectors(self, labels: Labels) -> Vectors:
        """The engine's vectors of `labels`, from `_recent` where it kept them (a copy)
        and from the engine for the rest; `_recent` starts again."""
        found, kept = self._recent.take(labels)
        self._recent.clear()
        if found.all():
            return kept
        out = np.empty((labels.size, self.params.dim), dtype=np.float32)
        out[found] = kept
        out[~found] = self._engine.get(labels[~found])
        return out

    def capture_base(self, *, compact_before: int | None = None) -> Base:
        """Take everything a full snapshot holds, and start tracking changes anew. Under
        the exclusive lock: copies of ids, clocks, metadata, norms and tombstones, and the
        engine's own saved bytes (hnsw: hnswlib's `save_index`) in an unlinked temporary
        file, so the process never holds a second copy of the engine. `write_snapshot`
        encodes the base later, outside the lock; close it (`Base.close`, or `with`) once
        written.

        `compact_before`: as in `capture_delta`.

        Raises:
            EngineError: the index is unusable, or the engine failed to serialize.
        """
        with self._lock.exclusive():
            self._check_usable()
            if compact_before is not None:
                self._compact_tombstones(compact_before)
            labels = self._map.ids.labels()
            live_ids = self._map.ids.take(labels)
            meta_lens, meta_json = self._meta.take(labels)
            clocks = self._clocks.take(labels)
            norms = self._norms[labels] if self._cosine else None
            tombs = list(self._tombs.items())
            tomb_clocks = np.array([c for _, c in tombs], dtype=np.int64).reshape(len(tombs), 3)
            # last: nothing that can fail comes after it, so its files always have an owner
            engine_state, engine = self._engine.capture()
            self._changed = set()
            self._recent.clear()
            return Base(
                name=self.name,
                params=self.params,
                labels=labels,
                ids=live_ids,
                clocks=clocks,
                meta_lens=meta_lens,
                meta_json=meta_json,
                norms=norms,
                tomb_ids=[i for i, _ in tombs],
                tomb_clocks=tomb_clocks,
                slots=self._map.next_label,
                version_floor=self._version_floor,
                engine_state=engine_state,
                engine=engine,
            )

    def _apply_delta(self, delta: Delta) -> int:
        """Set every id of `delta` to its captured state, with one engine add; returns the
        ids whose state changed. Not tracked as changes (the state is a captured one).

        Raises:
            SnapshotError: the delta is of another dim, space or engine.
            EngineError: the engine failed; the index refuses further use.
        """
        for field in ("dim", "space", "engine"):
            got, want = getattr(delta.params, field), getattr(self.params, field)
            if got != want:
                raise SnapshotError(f"delta holds {field}={got}, index has {want}")
        with self._lock.exclusive():
            self._check_usable()
            changed = self._put(delta)
            if delta.version_floor > self._version_floor:
                self._version_floor = delta.version_floor
            if changed:
                self._generation += 1
                self._maybe_compact()
            return changed

    def _put(self, delta: Delta) -> int:
        labels_of = self._map.labels
        n = len(delta.ids)
        old = [labels_of.get(i) for i in delta.ids]
        # live entries already stored exactly as captured are left alone (a delta applied
        # twice costs no engine work); `same_vec`: the engine already holds the vector
        same = np.zeros(n, dtype=np.bool_)
        same_vec = np.zeros(n, dtype=np.bool_)
        known = [k for k in range(n) if old[k] is not None]
        if known:
            kl = np.array([old[k] for k in known], dtype=np.intp)
            ka = np.array(known, dtype=np.intp)
            vec_eq = (self._engine.get(kl.astype(np.uint64)) == delta.vectors[ka]).all(axis=1)
            same_vec[ka] = vec_eq
            eq = vec_eq & (self._clocks.take(kl) == delta.clocks[ka]).all(axis=1)
            if delta.norms is not None:
                eq &= self._norms[kl] == delta.norms[ka]
            offs = np.cumsum(delta.meta_lens, dtype=np.int64) - delta.meta_lens
            for j in np.flatnonzero(eq).tolist():
                k, lb = known[j], int(kl[j])
                o, ln = int(offs[k]), int(delta.meta_lens[k])
                eq[j] = self._meta.get(lb) == (delta.meta_json[o : o + ln] if ln else None)
            same[ka] = eq
        todo = np.flatnonzero(~same).tolist()
        new = [k for k in todo if old[k] is None]
        # live ids whose vector changed: replaced in place, or, where the engine replaces
        # slowly (hnswlib), moved to fresh labels so the engine inserts them; ids whose
        # vector is unchanged (metadata, clock or norm changed) need no engine work
        rewrite = [k for k in todo if old[k] is not None and not same_vec[k]]
        move = [] if self._engine.replace_in_place else rewrite
        replace = [] if move else rewrite
        keep = [k for k in todo if old[k] is not None and same_vec[k]]
        drop_ids = [i for i in delta.tomb_ids + delta.gone if i in labels_of]
        tomb_changes = [
            (i, Clock(*c))
            for i, c in zip(delta.tomb_ids, delta.tomb_clocks.tolist(), strict=True)
            if self._tombs.get(i) != Clock(*c)
        ]
        gone = [i for i in delta.gone if i in self._tombs]
        if not (rewrite or keep or new or drop_ids or tomb_changes or gone):
            return 0
        self._recent.clear()  # labels change hands untracked: read the engine next time
        new_ids = [delta.ids[k] for k in new]
        new_labels, fresh = self._map.allocate(len(new))
        # moved ids take the labels after the new ids' fresh ones (`LabelMap.move`)
        moved_from = self._map.next_label + fresh
        moved_labels = list(range(moved_from, moved_from + len(move)))
        self._reserve(moved_from + len(move))
        add_rows = np.array(replace + new + move, dtype=np.intp)
        add_labels = np.array(
            [old[k] for k in replace] + new_labels + moved_labels, dtype=np.uint64
        )
        drop_labels = np.array(
            [labels_of[i] for i in drop_ids] + [old[k] for k in move], dtype=np.uint64
        )
        with self._engine_call("while applying a delta"):
            self._engine.add(add_labels, np.ascontiguousarray(delta.vectors[add_rows]))
            if drop_labels.size:
                self._engine.mark_deleted(drop_labels)
        self._map.bind(new_ids, new_labels, fresh)
        freed, moved = self._map.move([delta.ids[k] for k in move])
        assert moved == moved_labels
        for label in freed:
            self._meta.set(label, None)
        rows = np.array(replace + new + move + keep, dtype=np.intp)
        labels = add_labels.tolist() + [old[k] for k in keep]
        offs = np.cumsum(delta.meta_lens, dtype=np.int64) - delta.meta_lens
        for k, label in zip(rows.tolist(), labels, strict=True):
            o, ln = int(offs[k]), int(delta.meta_lens[k])
            self._meta.set(label, delta.meta_json[o : o + ln] if ln else None)
        if rows.size:
            idx = np.array(labels, dtype=np.intp)
            self._clocks.set(idx, [Clock(*c) for c in delta.clocks[rows].tolist()])
            if delta.norms is not None:
                self._norms[idx] = delta.norms[rows]
        for id_ in new_ids:
            self._tombs.pop(id_, None)
        for label in self._map.release(drop_ids):
            self._meta.set(label, None)
        self._meta.maybe_compact()
        for id_, clock in tomb_changes:
            self._tombs[id_] = clock
        for id_ in gone:
            del self._tombs[id_]
        return (
            len(rewrite)
            + len(keep)
            + len(new)
            + len(set(drop_ids) | {i for i, _ in tomb_changes} | set(gone))
        )

    # -- reads --------------------------------------------------------------------------

    def search(
        self,
        vectors: npt.ArrayLike,
        k: int,
        *,
        ef: int | None = None,
        filter: dict[str, Any] | None = None,
        include_metadata: bool = False,
    ) -> list[list[Hit]]:
        """The k nearest live items to each query row (a 1-D vector is one query).

        k is clamped to the live (matching) count. `filter` is an equality filter on
        metadata fields, all must match; k hits come back whenever k live items match.

        Raises:
            InvalidRequest: bad k, ef, filter or query vector. DimMismatch: wrong dim.
        """
        found = self.search_columns(
            vectors, k, ef=ef, filter=filter, include_metadata=include_metadata
        )
        return [c.hits() for c in found]

    def search_columns(
        self,
        vectors: npt.ArrayLike,
        k: int,
        *,
        ef: int | None = None,
        filter: dict[str, Any] | None = None,
        include_metadata: bool = False,
    ) -> list[Columns]:
        """`search`, with each query's hits as `Columns` (ids, distances, metadata)."""
        queries, qnorms = prepare_queries(vectors, self.params)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.limits.max_k:
            raise InvalidRequest(f"k must be an integer in [1, {self.limits.max_k}], got {k!r}")
        if ef is None:
            ef = self.params.ef_search
        elif isinstance(ef, bool) or not isinstance(ef, int) or not 1 <= ef <= EF_MAX:
            raise InvalidRequest(f"ef must be an integer in [1, {EF_MAX}], got {ef!r}")
        key = filter_key(filter) if filter else None
        if self._cosine:
            queries = np.ascontiguousarray(queries / qnorms[:, None], dtype=np.float32)
        with self._lock.shared():
            self._check_usable()
            if key is not None:
                assert filter is not None
                allowed = self._matching(key, filter)
                labels, dists = self._search_filtered(queries, k, ef, allowed)
            else:
                labels, dists = self._search_all(queries, min(k, len(self._map)), ef)
            return self._columns(labels, dists, include_metadata)

    def _search_all(self, queries: Vectors, k: int, ef: int) -> TopK:
        try:
            return self._engine.query(queries, k, ef=ef)
        except ShortResult:
            live = np.fromiter(self._map.labels.values(), dtype=np.uint64)
            return self._brute(queries, k, live)

    def _brute(self, queries: Vectors, k: int, labels: Labels) -> TopK:
        """Exact top-k among `labels` (live labels only)."""
        engine = self._engine
        if isinstance(engine, ExactEngine):
            return engine.query_labels(queries, k, labels)
        metric = metric_of(self.params.space)
        best: TopK | None = None
        for start in range(0, max(labels.size, 1), CHUNK):
            part = labels[start : start + CHUNK]
            got = topk(metric, queries, engine.get(part), part, k)
            best = got if best is None else merge_topk(best, got, k)
        assert best is not None
        return best

    def _search_filtered(self, queries: Vectors, k: int, ef: int, allowed: Labels) -> TopK:
        n = queries.shape[0]
        m = int(allowed.size)
        k = min(k, m)
        if k == 0:
            return np.empty((n, 0), dtype=np.uint64), np.empty((n, 0), dtype=np.float32)
        live = len(self._map)
        if m <= FILTER_BRUTE_MAX or isinstance(self._engine, ExactEngine):
            return self._brute(queries, k, allowed)
        # over-fetch in proportion to how selective the filter is, then post-filter
        mask = np.zeros(self._map.next_label, dtype=np.bool_)
        mask[allowed.astype(np.intp)] = True
        out_l = np.zeros((n, k), dtype=np.uint64)
        out_d = np.zeros((n, k), dtype=np.float32)
        todo = np.arange(n)
        fetch = min(live, math.ceil(2 * k * live / m) + 16)
        while todo.size:
            try:
                got_l, got_d = self._engine.query(queries[todo], fetch, ef=max(ef, fetch))
            except ShortResult:
                got_l, got_d = self._brute(queries[todo], k, allowed)
                out_l[todo], out_d[todo] = got_l, got_d
                break
            ok = mask[got_l.astype(np.intp)]
            enough = ok.sum(axis=1) >= k
            for row in np.flatnonzero(enough | (fetch >= live)).tolist():
                sel = np.flatnonzero(ok[row])[:k]
                if sel.size < k:  # cannot happen when every live item came back
                    sub_l, sub_d = self._brute(queries[todo[row] : todo[row] + 1], k, allowed)
                    out_l[todo[row]], out_d[todo[row]] = sub_l[0], sub_d[0]
                    continue
                out_l[todo[row]] = got_l[row, sel]
                out_d[todo[row]] = got_d[row, sel]
            todo = todo[~(enough | (fetch >= live))]
            fetch = min(live, fetch * 4)
        return out_l, out_d

    def _matching(self, key: bytes, flt: dict[str, Any]) -> Labels:
        """Live labels whose metadata matches `flt` (sorted), cached until the next write."""
        generation = self._generation
        with self._filter_cache_lock:
            hit = self._filter_cache.get(key)
            if hit is not None and hit[0] == generation:
                self._filter_cache.move_to_end(key)
                return hit[1]
        match = compile_filter(flt)
        labels = self._meta.matching(match)
        with self._filter_cache_lock:
            self._filter_cache[key] = (generation, labels)
            self._filter_cache.move_to_end(key)
            while len(self._filter_cache) > FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        return labels

    def _columns(
        self, labels: Labels, dists: npt.NDArray[np.float32], with_meta: bool
    ) -> list[Columns]:
        k = labels.shape[1]
        # every hit's id in one gather and one decode, then cut into rows
        ids = self._map.ids.strings(labels.reshape(-1).astype(np.intp))
        flat = labels.reshape(-1).tolist() if with_meta else []
        meta = self._meta
        out: list[Columns] = []
        for row, row_d in enumerate(dists.tolist()):
            lo, hi = row * k, row * k + k
            metas: list[Metadata | MetadataJson | None] | None = None
            if with_meta:
                metas = [_load(meta.get(lb)) for lb in flat[lo:hi]]
            out.append(Columns(ids[lo:hi], row_d, metas))
        return out

    def _vectors(self, labels: Labels) -> Vectors:
        """Stored vectors of live labels, as given (norms restored under cosine)."""
        vectors = self._engine.get(labels)
        if self._cosine and labels.size:
            vectors *= self._norms[labels.astype(np.intp)][:, None]
        return vectors

    def get(
        self, ids: Iterable[str], *, include_vectors: bool = True, include_metadata: bool = True
    ) -> list[Item]:
        """The live items among `ids`, in the order asked (ids not live are left out)."""
        asked = list(ids)
        with self._lock.shared():
            self._check_usable()
            found = [(i, self._map.labels.get(i)) for i in asked if isinstance(i, str)]
            pairs = [(i, lb) for i, lb in found if lb is not None]
            labels = np.array([lb for _, lb in pairs], dtype=np.uint64)
            vectors = self._vectors(labels) if include_vectors else None
            return [
                Item(
                    id=id_,
                    vector=None if vectors is None else vectors[n],
                    metadata=_load(self._meta.get(lb)) if include_metadata else None,
                    clock=self._clocks.get(lb),
                )
                for n, (id_, lb) in enumerate(pairs)
            ]

    def metadata_json(
        self, ids: Sequence[str], *, max_bytes: int | None = None
    ) -> list[MetadataJson | None]:
        """The stored metadata of `ids` as its compact JSON, in the order asked (None: an
        id without metadata, or not live), for writing into a larger JSON document without
        parsing it: parsed, a small object can weigh 20 times its bytes.

        Raises:
            TooLarge: together they are over `max_bytes`; nothing was copied.
        """
        with self._lock.shared():
            self._check_usable()
            get = self._map.labels.get
            labels = [get(i) if isinstance(i, str) else None for i in ids]
            meta = self._meta
            if max_bytes is not None:
                live = np.array([lb for lb in labels if lb is not None], dtype=np.intp)
                size = meta.total(live)
                if size > max_bytes:
                    raise TooLarge(
                        f"the metadata of {live.size} items is {size} bytes, over the limit "
                        f"of {max_bytes}",
                        size=size,
                        limit=max_bytes,
                    )
            out: list[MetadataJson | None] = []
            for lb in labels:
                blob = None if lb is None else meta.get(lb)
                out.append(None if blob is None else MetadataJson(blob))
            return out

    def live_items(self) -> Iterator[Item]:
        """Every live item with vector, metadata and clock, read in chunks.

        Note: items written while iterating may or may not be seen; each item returned is
        as stored at the moment its chunk was read.
        """
        with self._lock.shared():
            ids = list(self._map.labels)
        for start in range(0, len(ids), CHUNK):
            yield from self.get(ids[start : start + CHUNK])

    def clock_of(self, id_: str) -> Clock | None:
        """The clock of the last write to `id_` (live or tombstone), None if never written."""
        with self._lock.shared():
            label = self._map.labels.get(id_)
            if label is not None:
                return self._clocks.get(label)
            return self._tombs.get(id_)

    def stats(self) -> dict[str, Any]:
        """`count` (live), `deleted` (tombstones kept), `version_floor` (see the class
        docstring), `dim`, `space`, `engine`, `params`, and the engine's `slots` (live +
        free), `free_slots`, `capacity`, `pending_inserts` (see `defer_inserts`)."""
        with self._lock.shared():
            return {
                "count": len(self._map),
                "deleted": len(self._tombs),
                "version_floor": self._version_floor,
                "dim": self.params.dim,
                "space": self.params.space.value,
                "engine": self.params.engine.value,
                "params": self.params.to_dict(),
                "slots": self._map.next_label,
                "free_slots": len(self._map.free),
                "capacity": self._engine.capacity,
                "pending_inserts": self.pending_inserts,
            }

    def logical_state(self) -> dict[str, Any]:
        """What replay equivalence compares: `{"live": {id: (vector_bytes, metadata,
        clock)}, "tombstones": {id: clock}}` (`version_floor` is a property of its own).
        Materializes every vector: for tests."""
        with self._lock.shared():
            pairs = sorted(self._map.labels.items())
            labels = np.array([lb for _, lb in pairs], dtype=np.uint64)
            vectors = self._vectors(labels)
            live = {
                id_: (vectors[n].tobytes(), _load(self._meta.get(lb)), self._clocks.get(lb))
                for n, (id_, lb) in enumerate(pairs)
            }
            return {"live": live, "tombstones": dict(self._tombs)}

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return (
            f"Index(name={self.name!r}, dim={self.params.dim}, space={self.params.space.value},"
            f" engine={self.params.engine.value}, count={len(self._map)})"
        )

    @contextmanager
    def _engine_call(self, what: str) -> Iterator[None]:
        """Engine writes that leave the engine in an unknown state if they fail: the index
        then refuses further use (logged), and the failure is raised as `EngineError`."""
        try:
            yield
        except Exception as exc:
            self._broken = f"engine failed {what}: {exc}"
            log.error("index %s: %s", self.name, self._broken)
            if isinstance(exc, EngineError):
                raise
            raise EngineError(self._broken) from exc

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise EngineError(f"index {self.name!r} is unusable: {self._broken}")


def _load(blob: bytes | None) -> Metadata | None:
    if blob is None:
        return None
    out: Metadata = orjson.loads(blob)
    return out
