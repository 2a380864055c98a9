"""The string id <-> uint64 label map. Its counts are the truth, never hnswlib's.

Labels are dense: `0 .. next_label-1` have all been given to the engine once. A label is
either live (its id is in `labels`) or free (deleted in the engine, waiting in `free` to be
given to a new id; hnswlib then replaces the slot's vector and revives it). Labels are
never handed to hnswlib's `replace_deleted`, so a label always names one slot. A live id
can also `move` to a fresh label (its old one freed), which engines whose in-place
replacement is slow take instead of replacing (see `Index._put`).

Memory: a dict of a million str -> int costs about 75 MB (the dict and one int object per
entry); `IdTable` keeps the same map in an open-addressing table of int32 (8 MB per
million ids), comparing against the `ids` list it shares with `LabelMap`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["IdTable", "LabelMap"]

#: slot values: 0 empty, -1 deleted, else label + 1
_EMPTY = 0
_GONE = -1
#: the table is rebuilt bigger past this fill (live + deleted slots) ...
_MAX_FILL = 0.7
_MIN_SLOTS = 1024


class IdTable:
    """A dict-like map live id -> label over `LabelMap.ids` (which must name each label)."""

    __slots__ = ("_gone", "_mask", "_owner", "_slots", "_used")

    def __init__(self, owner: LabelMap, size: int = _MIN_SLOTS) -> None:
        self._owner = owner
        self._alloc(size)

    def _alloc(self, size: int) -> None:
        self._slots = array("i", bytes(4 * size))
        self._mask = size - 1
        self._used = 0
        self._gone = 0

    def _find(self, id_: str) -> int:
        """The slot holding `id_`, or -1."""
        slots, mask, ids = self._slots, self._mask, self._owner.ids
        i = hash(id_) & mask
        while True:
            v = slots[i]
            if v == _EMPTY:
                return -1
            if v > 0 and ids[v - 1] == id_:
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
        """Map `id_` to `label`; `ids[label]` must already be `id_`."""
        i = self._find(id_)
        if i >= 0:
            self._slots[i] = label + 1
            return
        self.insert_new(id_, label)

    def insert_new(self, id_: str, label: int) -> None:
        """Map an id known to be absent to `label`; `ids[label]` must already be `id_`."""
        if (self._used + self._gone + 1) > _MAX_FILL * (self._mask + 1):
            self._rehash(self._used + 1)
        slots, mask = self._slots, self._mask
        i = hash(id_) & mask
        while slots[i] > 0:
            i = (i + 1) & mask
        if slots[i] == _GONE:
            self._gone -= 1
        slots[i] = label + 1
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
        labels = old[old > 0] - 1
        ids = self._owner.ids
        self.bulk_load([ids[lb] for lb in labels.tolist()], labels, need)

    def bulk_load(
        self,
        ids: list[str],
        labels: npt.NDArray[np.integer],
        need: int | None = None,
        *,
        hashes: npt.NDArray[np.int64] | None = None,
    ) -> None:
        """Replace the table with `ids` -> `labels` (distinct; `ids[label]` already set),
        sized for `need` entries. Vectorized linear probing: the same slots as inserting
        one by one would give up to the order of collisions, which lookups do not care about.
        """
        n = len(ids)
        size = _MIN_SLOTS
        while size * _MAX_FILL < 2 * max(n, need or 0):
            size *= 2
        mask = size - 1
        slots = np.zeros(size, dtype=np.int32)
        values = np.asarray(labels, dtype=np.int64).astype(np.int32) + 1
        if hashes is None:
            hashes = np.fromiter(map(hash, ids), dtype=np.int64, count=n)
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
            placed = np.zeros(n, dtype=np.bool_)
            placed[cand[won]] = True
            pending = pending[~placed[pending]]
            pos[pending] = (pos[pending] + 1) & mask
        self._slots = array("i", slots.tobytes())
        self._mask = mask
        self._used = n
        self._gone = 0

    def __len__(self) -> int:
        return self._used

    def items(self) -> Iterator[tuple[str, int]]:
        """(id, label) of every live id, in label order."""
        for label, id_ in enumerate(self._owner.ids):
            if id_ is not None:
                yield id_, label

    def values(self) -> Iterator[int]:
        """Live labels, ascending."""
        for _, label in self.items():
            yield label

    def __iter__(self) -> Iterator[str]:
        for id_, _ in self.items():
            yield id_


class LabelMap:
    """Live ids and their labels, the ids of labels, and the free labels."""

    __slots__ = ("free", "ids", "labels")

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        """label -> id (None for a free label); its length is `next_label`"""
        self.labels = IdTable(self)
        """live id -> label"""
        self.free: list[int] = []
        """labels deleted in the engine, reused last-in first-out"""

    @property
    def next_label(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.labels)

    def allocate(self, n: int) -> tuple[list[int], int]:
        """Labels for `n` new ids: free ones first, then fresh ones.

        Returns the labels and how many of them are fresh. Bind them with `bind`.
        """
        reused = self.free[len(self.free) - min(n, len(self.free)) :][::-1]
        fresh = n - len(reused)
        start = len(self.ids)
        return reused + list(range(start, start + fresh)), fresh

    def bind(self, ids: list[str], labels: list[int], fresh: int) -> None:
        """Make `ids` (distinct, not live) live under the labels `allocate` gave, in order."""
        reused = len(labels) - fresh
        if reused:
            del self.free[len(self.free) - reused :]
        self.ids.extend([None] * fresh)
        insert = self.labels.insert_new
        for id_, label in zip(ids, labels, strict=True):
            self.ids[label] = id_
            insert(id_, label)

    def move(self, ids: list[str]) -> tuple[list[int], list[int]]:
        """Give live `ids` (distinct) fresh labels `next_label ..`, never a free one, and
        free their old labels; returns (old labels, new labels), in the order of `ids`.

        The engine must then hold each id's vector under its new label and have its old
        label deleted: a label still names one slot, and the freed ones wait in `free`.
        """
        start = len(self.ids)
        new = list(range(start, start + len(ids)))
        self.ids.extend(ids)
        table = self.labels
        old = []
        for id_, label in zip(ids, new, strict=True):
            prev = table[id_]
            table[id_] = label
            self.ids[prev] = None
            self.free.append(prev)
            old.append(prev)
        return old, new

    def release(self, ids: list[str]) -> list[int]:
        """Make live `ids` free; returns their labels (to delete in the engine)."""
        out = []
        for id_ in ids:
            label = self.labels.pop(id_)
            self.ids[label] = None
            self.free.append(label)
            out.append(label)
        return out
