"""The string id <-> uint64 label map. Its counts are the truth, never hnswlib's.

Labels are dense: `0 .. next_label-1` have all been given to the engine once. A label is
either live (its id is in `labels`) or free (deleted in the engine, waiting in `free` to be
given to a new id; hnswlib then replaces the slot's vector and revives it). Labels are
never handed to hnswlib's `replace_deleted`, so a label always names one slot.
"""

from __future__ import annotations

__all__ = ["LabelMap"]


class LabelMap:
    """Live ids and their labels, the ids of labels, and the free labels."""

    __slots__ = ("free", "ids", "labels")

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        """label -> id (None for a free label); its length is `next_label`"""
        self.labels: dict[str, int] = {}
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
        """Make `ids` live under the labels `allocate` gave (in the same order)."""
        reused = len(labels) - fresh
        if reused:
            del self.free[len(self.free) - reused :]
        self.ids.extend([None] * fresh)
        for id_, label in zip(ids, labels, strict=True):
            self.ids[label] = id_
            self.labels[id_] = label

    def release(self, ids: list[str]) -> list[int]:
        """Make live `ids` free; returns their labels (to delete in the engine)."""
        out = []
        for id_ in ids:
            label = self.labels.pop(id_)
            self.ids[label] = None
            self.free.append(label)
            out.append(label)
        return out
