"""Metadata of live items: compact JSON bytes packed in one arena, indexed by label.

A million small metadata objects as separate `bytes` cost about 50 MB (object headers and
list pointers); packed, they cost their bytes plus 12 bytes per slot. A replaced or
deleted entry leaves garbage in the arena, which is compacted when it passes half of it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__all__ = ["MetaStore"]

#: compact when garbage exceeds this many bytes and half of the arena
_COMPACT_MIN_BYTES = 1 << 20
#: `take` copies contiguous runs one by one when there are fewer than this many
_RUNS_MAX = 256


class MetaStore:
    """label -> metadata bytes (None: no metadata)."""

    __slots__ = ("_buf", "_garbage", "_len", "_off")

    def __init__(self, capacity: int) -> None:
        self._buf = bytearray()
        self._off: npt.NDArray[np.int64] = np.zeros(capacity, dtype=np.int64)
        self._len: npt.NDArray[np.uint32] = np.zeros(capacity, dtype=np.uint32)
        self._garbage = 0

    @property
    def capacity(self) -> int:
        return int(self._len.shape[0])

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        off = np.zeros(capacity, dtype=np.int64)
        off[: self._off.shape[0]] = self._off
        ln = np.zeros(capacity, dtype=np.uint32)
        ln[: self._len.shape[0]] = self._len
        self._off, self._len = off, ln

    def get(self, label: int) -> bytes | None:
        n = int(self._len[label])
        if not n:
            return None
        o = int(self._off[label])
        return bytes(self._buf[o : o + n])

    def set(self, label: int, blob: bytes | None) -> None:
        """Store `blob` for `label` (None or empty: no metadata)."""
        self._garbage += int(self._len[label])
        if blob:
            self._off[label] = len(self._buf)
            self._buf += blob
            self._len[label] = len(blob)
        else:
            self._len[label] = 0

    def maybe_compact(self) -> None:
        if self._garbage > _COMPACT_MIN_BYTES and 2 * self._garbage > len(self._buf):
            self.permute(np.arange(self.capacity), self.capacity)

    def permute(self, order: npt.NDArray[np.intp], capacity: int) -> None:
        """Keep only labels `order`, renumbered `0 .. len(order)-1`, in a fresh arena."""
        buf = bytearray()
        off = np.zeros(capacity, dtype=np.int64)
        ln = np.zeros(capacity, dtype=np.uint32)
        old_buf, old_off, old_len = self._buf, self._off, self._len
        for new, label in enumerate(order.tolist()):
            n = int(old_len[label])
            if n:
                o = int(old_off[label])
                off[new] = len(buf)
                ln[new] = n
                buf += old_buf[o : o + n]
        self._buf, self._off, self._len, self._garbage = buf, off, ln, 0

    def matching(self, match: Callable[[bytes], bool]) -> npt.NDArray[np.uint64]:
        """Labels (ascending) whose metadata satisfies `match`."""
        buf, off, ln = self._buf, self._off, self._len
        labels = np.flatnonzero(ln)
        hits = [
            label
            for label, o, n in zip(
                labels.tolist(), off[labels].tolist(), ln[labels].tolist(), strict=True
            )
            if match(bytes(buf[o : o + n]))
        ]
        return np.array(hits, dtype=np.uint64)

    def take(self, labels: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.uint32], bytes]:
        """Lengths (0: none) and the concatenated bytes of `labels`, in that order."""
        lens = self._len[labels].astype(np.int64)
        total = int(lens.sum())
        if not total:
            return lens.astype(np.uint32), b""
        offs = self._off[labels]
        # pieces that follow each other in the arena are copied as one run (an arena
        # filled in label order is a single run)
        present = np.flatnonzero(lens)
        p_offs = offs[present]
        p_ends = p_offs + lens[present]
        starts = np.flatnonzero(p_offs[1:] != p_ends[:-1]) + 1
        if starts.size < _RUNS_MAX:
            firsts = [0, *starts.tolist()]
            lasts = [*(starts - 1).tolist(), present.size - 1]
            spans = zip(p_offs[firsts].tolist(), p_ends[lasts].tolist(), strict=True)
            with memoryview(self._buf) as view:
                blob = b"".join([view[a:b] for a, b in spans])
            return lens.astype(np.uint32), blob
        # byte positions: each piece's offset repeated over its length, plus 0, 1, 2, ...
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        where = np.repeat(offs, lens) + within
        arena = np.frombuffer(self._buf, dtype=np.uint8)
        try:
            out = arena[where].tobytes()
        finally:
            del arena  # release the export, or the bytearray cannot grow again
        return lens.astype(np.uint32), out

    def load(self, labels: npt.NDArray[np.intp], lens: npt.NDArray[np.uint32], blob: bytes) -> None:
        """Replace the content: `labels[i]` gets the i-th of the concatenated `blob` pieces
        of `lens` bytes (0: none). Raises ValueError when a piece is not a JSON object."""
        lens64 = lens.astype(np.int64)
        offs = np.cumsum(lens64) - lens64
        if int(lens64.sum()) != len(blob):
            raise ValueError("metadata lengths do not add up")
        present = lens64 > 0
        if (
            present.any()
            and not (np.frombuffer(blob, dtype=np.uint8)[offs[present]] == ord("{")).all()
        ):
            raise ValueError("metadata is not a JSON object")
        self._buf = bytearray(blob)
        self._off[labels] = offs
        self._len[labels] = lens
        self._garbage = 0

    def nbytes(self) -> int:
        """Arena bytes, garbage included."""
        return len(self._buf)
