"""The string id <-> uint64 label map. Its counts are the truth, never hnswlib's.

Labels are dense: `0 .. next_label-1` have all been given to the engine once. A label is
either live (its id is in `labels`) or free (deleted in the engine, waiting in `free` to be
given to a new id; hnswlib then replaces the slot's vector and revives it). Labels are
never handed to hnswlib's `replace_deleted`, so a label always names one slot. A live id
can also `move` to a fresh label (its old one freed), which engines whose in-place
replacement is slow take instead of replacing (see `Index._put`).

Memory: a dict of a million str -> int costs about 75 MB (the dict and one int object per
entry), and a list of a million short str another 70 MB. `LabelMap.ids` keeps each id's
UTF-8 bytes packed by label (`IdColumn`: its bytes plus 12 per slot), and `IdTable` maps
ids to labels in an open-addressing table of an int32 label and a 16-bit hash tag per
slot (9-26 MB per million ids, with its fill between 0.23 and 0.7), comparing a probed
slot's bytes in place; only the ids asked for become `str` objects.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from lhv_index._packed import PackedBytes, unpack_strings

__all__ = ["IdColumn", "IdTable", "LabelMap"]

#: slot values: 0 empty, -1 deleted, else label + 1
_EMPTY = 0
_GONE = -1
#: the table is rebuilt bigger past this fill (live + deleted slots) ...
_MAX_FILL = 0.7
#: ... with room for this many times the entries it holds
_GROWTH = 1.5
_MIN_SLOTS = 1024
#: each slot also keeps 16 bits of its id's hash (from bit `_TAG_SHIFT`), so a probe
#: compares an id's bytes only when those match
_TAG_SHIFT = 40


def _tag(h: int) -> int:
    return (h >> _TAG_SHIFT) & 0xFFFF


class IdTable:
    """A dict-like map live id -> label over `LabelMap.ids` (which must hold each label's
    id)."""

    __slots__ = ("_gone", "_mask", "_owner", "_slots", "_tags", "_used")

    def __init__(self, owner: LabelMap, size: int = _MIN_SLOTS) -> None:
        self._owner = owner
        self._alloc(size)

    def _alloc(self, size: int) -> None:
        self._slots = array("i", bytes(4 * size))
        self._tags = array("H", bytes(2 * size))
        self._mask = size - 1
        self._used = 0
        self._gone = 0

    def _find(self, id_: str) -> int:
        """The slot holding `id_`, or -1."""
        slots, tags, mask = self._slots, self._tags, self._mask
        h = hash(id_)
        tag, key = _tag(h), None
        i = h & mask
        while True:
            v = slots[i]
            if v == _EMPTY:
                return -1
            if v > 0 and tags[i] == tag:
                if key is None:
                    try:
                        key = id_.encode()
                    except UnicodeEncodeError:  # never stored: ids are checked to be UTF-8
                        return -1
                if self._owner.ids.equals(v - 1, key):
                    return i
            i = (i + 1) & mask

    def get(self, id_: str) -> int | None:
        i = self._find(id_)
        return None if i < 0 else self._slots[i] - 1

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, str) and self._find(id_) >= 0

    def __getitem__(self, id_: str) -> int:
        i = self._find(id_)
        if i < 0:
            raise KeyError(id_)
        return self._slots[i] - 1

    def __setitem__(self, id_: str, label: int) -> None:
        """Map `id_` to `label`; `ids` must already hold `id_` at `label`."""
        i = self._find(id_)
        if i >= 0:
            self._slots[i] = label + 1
            return
        self.insert_new(id_, label)

    def insert_new(self, id_: str, label: int) -> None:
        """Map an id known to be absent to `label`; `ids` must already hold it there."""
        if (self._used + self._gone + 1) > _MAX_FILL * (self._mask + 1):
            self._rehash(self._used + 1)
        slots, mask = self._slots, self._mask
        h = hash(id_)
        i = h & mask
        while slots[i] > 0:
            i = (i + 1) & mask
        if slots[i] == _GONE:
            self._gone -= 1
        slots[i] = label + 1
        self._tags[i] = _tag(h)
        self._used += 1

    def pop(self, id_: str) -> int:
        i = self._find(id_)
        if i < 0:
            raise KeyError(id_)
        label = self._slots[i] - 1
        self._slots[i] = _GONE
        self._used -= 1
        self._gone += 1
        return label

    def _rehash(self, need: int) -> None:
        old = np.frombuffer(self._slots, dtype=np.int32)
        labels = (old[old > 0] - 1).astype(np.intp)
        self.bulk_load(self._owner.ids.strings(labels), labels, need)

    def bulk_load(
        self,
        ids: list[str],
        labels: npt.NDArray[np.integer],
        need: int | None = None,
        *,
        hashes: npt.NDArray[np.int64] | None = None,
    ) -> None:
        """Replace the table with `ids` -> `labels` (distinct; already in `LabelMap.ids`),
        sized for `need` entries. Vectorized linear probing: the same slots as inserting
        one by one would give up to the order of collisions, which lookups do not care about.
        """
        n = len(ids)
        size = _MIN_SLOTS
        while size * _MAX_FILL < _GROWTH * max(n, need or 0):
            size *= 2
        mask = size - 1
        slots = np.zeros(size, dtype=np.int32)
        tags = np.zeros(size, dtype=np.uint16)
        values = np.asarray(labels, dtype=np.int64).astype(np.int32) + 1
        if hashes is None:
            hashes = np.fromiter(map(hash, ids), dtype=np.int64, count=n)
        id_tags = ((hashes >> _TAG_SHIFT) & 0xFFFF).astype(np.uint16)
        pos = hashes & mask
        pending = np.arange(n)
        claim = np.empty(size, dtype=np.int64)
        while pending.size:
            p = pos[pending]
            free = slots[p] == _EMPTY
            cand, cpos = pending[free], p[free]
            # each free slot goes to one of the ids that reach it (the last one written)
            claim[cpos] = cand
            won = claim[cpos] == cand
            slots[cpos[won]] = values[cand[won]]
            tags[cpos[won]] = id_tags[cand[won]]
            placed = np.zeros(n, dtype=np.bool_)
            placed[cand[won]] = True
            pending = pending[~placed[pending]]
            pos[pending] = (pos[pending] + 1) & mask
        self._slots = array("i", slots.tobytes())
        self._tags = array("H", tags.tobytes())
        self._mask = mask
        self._used = n
        self._gone = 0

    def __len__(self) -> int:
        return self._used

    def items(self) -> Iterator[tuple[str, int]]:
        """(id, label) of every live id, in label order."""
        ids = self._owner.ids
        labels = ids.labels()
        yield from zip(ids.strings(labels), labels.tolist(), strict=True)

    def values(self) -> Iterator[int]:
        """Live labels, ascending."""
        yield from self._owner.ids.labels().tolist()

    def __iter__(self) -> Iterator[str]:
        for id_, _ in self.items():
            yield id_


class IdColumn(PackedBytes):
    """label -> id (None: a free label), packed as UTF-8 (see `PackedBytes`; ids are never
    empty, and are checked to be UTF-8 text before they are written)."""

    __slots__ = ()

    def id(self, label: int) -> str | None:
        raw = self.get(label)
        return None if raw is None else raw.decode()

    def live_id(self, label: int) -> str:
        """The id of a label known to be live."""
        o, n = self._off.item(label), self._len.item(label)
        return self._buf[o : o + n].decode()

    def put(self, label: int, id_: str | None) -> None:
        self.set(label, None if id_ is None else id_.encode())

    def strings(self, labels: npt.NDArray[np.intp]) -> list[str]:
        """The ids of `labels` (all live), in that order."""
        lens, blob = self.take(labels)
        return unpack_strings(lens, blob)


class LabelMap:
    """Live ids and their labels, the ids of labels, and the free labels."""

    __slots__ = ("free", "ids", "labels", "next_label")

    def __init__(self) -> None:
        self.ids = IdColumn()
        """label -> id (None for a free label), for labels below `next_label`"""
        self.labels = IdTable(self)
        """live id -> label"""
        self.free: list[int] = []
        """labels deleted in the engine, reused last-in first-out"""
        self.next_label = 0
        """labels handed out so far: `0 .. next_label-1`"""

    def __len__(self) -> int:
        return len(self.labels)

    def _extend(self, n: int) -> int:
        """Hand out `n` fresh labels; returns the first."""
        start = self.next_label
        self.next_label += n
        if self.next_label > self.ids.capacity:
            self.ids.reserve(max(self.next_label, self.ids.capacity + self.ids.capacity // 2))
        return start

    def allocate(self, n: int) -> tuple[list[int], int]:
        """Labels for `n` new ids: free ones first, then fresh ones.

        Returns the labels and how many of them are fresh. Bind them with `bind`.
        """
        reused = self.free[len(self.free) - min(n, len(self.free)) :][::-1]
        fresh = n - len(reused)
        start = self.next_label
        return reused + list(range(start, start + fresh)), fresh

    def bind(self, ids: list[str], labels: list[int], fresh: int) -> None:
        """Make `ids` (distinct, not live) live under the labels `allocate` gave, in order."""
        reused = len(labels) - fresh
        if reused:
            del self.free[len(self.free) - reused :]
        self._extend(fresh)
        self.ids.set_many(labels, [i.encode() for i in ids])
        insert = self.labels.insert_new
        for id_, label in zip(ids, labels, strict=True):
            insert(id_, label)
        self.ids.maybe_compact()

    def move(self, ids: list[str]) -> tuple[list[int], list[int]]:
        """Give live `ids` (distinct) fresh labels `next_label ..`, never a free one, and
        free their old labels; returns (old labels, new labels), in the order of `ids`.

        The engine must then hold each id's vector under its new label and have its old
        label deleted: a label still names one slot, and the freed ones wait in `free`.
        """
        start = self._extend(len(ids))
        new = list(range(start, start + len(ids)))
        table, column = self.labels, self.ids
        old = []
        for id_, label in zip(ids, new, strict=True):
            column.put(label, id_)
            prev = table[id_]
            table[id_] = label
            column.put(prev, None)
            self.free.append(prev)
            old.append(prev)
        column.maybe_compact()
        return old, new

    def release(self, ids: list[str]) -> list[int]:
        """Make live `ids` free; returns their labels (to delete in the engine)."""
        out = []
        for id_ in ids:
            label = self.labels.pop(id_)
            self.ids.put(label, None)
            self.free.append(label)
            out.append(label)
        self.ids.maybe_compact()
        return out

    @classmethod
    def load(
        cls,
        ids: tuple[list[str], npt.NDArray[np.uint32], bytes],
        labels: npt.NDArray[np.intp],
        slots: int,
        hashes: npt.NDArray[np.int64],
    ) -> LabelMap:
        """A map of `slots` labels whose live ones are `labels`, named by `ids` (the ids,
        their UTF-8 byte lengths and bytes, in the order of `labels`; distinct, checked by
        the caller), `hashes` their `hash`."""
        id_list, lens, blob = ids
        m = cls()
        m.next_label = slots
        m.ids.reserve(slots)
        m.ids.load(labels, lens, blob)
        if labels.size != slots:
            free = np.ones(slots, dtype=np.bool_)
            free[labels] = False
            m.free = np.flatnonzero(free)[::-1].tolist()
        m.labels.bulk_load(id_list, labels, hashes=hashes)
        return m
