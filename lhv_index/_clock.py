"""Write clocks: `(version, offset, position)`, compared lexicographically.

`version` is the client's version (0 when absent), `offset` the Kafka offset of the record,
`position` the item's index inside its record. A write whose clock is not newer than the
stored clock of its id (live item or tombstone) changes nothing, so replays are idempotent
and late retries with an older client version never resurrect or overwrite data.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["CLOCK_MAX", "CLOCK_MIN", "Clock", "ClockTable"]

#: every clock field is stored as a signed 64-bit integer
CLOCK_MIN = -(2**63)
CLOCK_MAX = 2**63 - 1


class Clock(NamedTuple):
    """The clock of one write; tuple ordering is the last-write-wins order."""

    version: int
    """the client's version; 0 when the client gave none"""
    offset: int
    """the Kafka offset of the record that carried the write"""
    position: int
    """the item's index inside its record (a later duplicate in one record wins a tie)"""


class ClockTable:
    """The clocks of live items, in label-indexed int64 columns (24 bytes per slot)."""

    __slots__ = ("offset", "position", "version")

    def __init__(self, capacity: int) -> None:
        self.version = np.zeros(capacity, dtype=np.int64)
        self.offset = np.zeros(capacity, dtype=np.int64)
        self.position = np.zeros(capacity, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return int(self.version.shape[0])

    def reserve(self, capacity: int) -> None:
        """Grow the columns to `capacity` slots, keeping their content."""
        if capacity <= self.capacity:
            return
        for name in self.__slots__:
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=np.int64)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def get(self, label: int) -> Clock:
        return Clock(int(self.version[label]), int(self.offset[label]), int(self.position[label]))

    def set(self, labels: npt.NDArray[np.intp], clocks: list[Clock]) -> None:
        if not clocks:
            return
        cols = np.array(clocks, dtype=np.int64).reshape(len(clocks), 3)
        self.version[labels] = cols[:, 0]
        self.offset[labels] = cols[:, 1]
        self.position[labels] = cols[:, 2]

    def take(self, labels: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
        """The clocks of `labels` as an (n, 3) int64 array."""
        return np.stack([self.version[labels], self.offset[labels], self.position[labels]], axis=1)
