"""Byte strings by label, packed in one arena: what an index keeps per live item that is
not a number (its id, its metadata), without an object per item.

A million short `str` or `bytes` objects cost about 60-70 bytes each in headers and list
pointers before their content; packed, a piece costs its bytes plus 12 bytes per slot (an
offset and a length). A replaced or cleared piece leaves garbage in the arena, which is
compacted once it passes half of it. Length 0 means "nothing" (no metadata, a free label):
an empty piece is never stored.

Also the two halves of the snapshot form of a list of strings (their UTF-8 byte lengths
and their concatenated bytes): `pack_strings` and `unpack_strings`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["PackedBytes", "Strings", "pack_strings", "unpack_strings"]

#: compact when garbage exceeds this many bytes and half of the arena
_COMPACT_MIN_BYTES = 1 << 20
#: `take` copies contiguous runs one by one when there are fewer than this many
_RUNS_MAX = 256
#: ... else gathers the bytes of this many pieces at a time
_GATHER_PIECES = 1 << 16


class Strings(NamedTuple):
    """Strings as a snapshot stores them: UTF-8 byte lengths and the bytes, concatenated."""

    lens: npt.NDArray[np.uint32]
    blob: bytes


def pack_strings(values: list[str]) -> Strings:
    joined = "".join(values)
    if joined.isascii():  # one encode; byte lengths equal character lengths
        lens = np.fromiter(map(len, values), dtype=np.uint32, count=len(values))
        return Strings(lens, joined.encode("ascii"))
    encoded = [v.encode("utf-8") for v in values]
    return Strings(np.array([len(e) for e in encoded], dtype=np.uint32), b"".join(encoded))


def unpack_strings(lens: npt.NDArray[np.integer], blob: bytes) -> list[str]:
    """The strings of `pack_strings` (lengths must add up to the blob: checked by callers).

    Raises:
        UnicodeDecodeError: a piece is not UTF-8.
    """
    n = int(lens.size)
    if n == 0:
        return []
    if blob.isascii():  # one decode; character offsets equal byte offsets
        text = blob.decode("ascii")
        if int(lens.min()) == int(lens.max()) > 0:  # strings of one length: no offsets
            width = int(lens[0])
            return [text[a : a + width] for a in range(0, len(text), width)]
        ends = np.cumsum(lens, dtype=np.int64).tolist()
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    ends = np.cumsum(lens, dtype=np.int64).tolist()
    starts = [0, *ends[:-1]]
    return [blob[a:b].decode("utf-8") for a, b in zip(starts, ends, strict=True)]


class PackedBytes:
    """label -> bytes (None: nothing), for labels below `capacity`."""

    __slots__ = ("_buf", "_garbage", "_len", "_off")

    def __init__(self, capacity: int = 0) -> None:
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

    def total(self, labels: npt.NDArray[np.intp]) -> int:
        """The bytes of `labels` together."""
        return int(self._len[labels].sum(dtype=np.int64))

    def get(self, label: int) -> bytes | None:
        n = self._len.item(label)
        if not n:
            return None
        o = self._off.item(label)
        return bytes(self._buf[o : o + n])

    def equals(self, label: int, value: bytes) -> bool:
        """Whether `label` holds exactly `value` (compared in place, nothing copied)."""
        n = self._len.item(label)
        if n != len(value) or not n:
            return False
        o = self._off.item(label)
        return self._buf.startswith(value, o, o + n)

    def set(self, label: int, blob: bytes | None) -> None:
        """Store `blob` for `label` (None or empty: nothing)."""
        self._garbage += int(self._len[label])
        if blob:
            self._off[label] = len(self._buf)
            self._buf += blob
            self._len[label] = len(blob)
        else:
            self._len[label] = 0

    def set_many(self, labels: list[int], blobs: list[bytes]) -> None:
        """`set` of distinct `labels` to non-empty `blobs`, in one append."""
        if not labels:
            return
        at = np.array(labels, dtype=np.intp)
        lens = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
        self._garbage += int(self._len[at].sum())
        self._off[at] = len(self._buf) + np.cumsum(lens) - lens
        self._len[at] = lens
        self._buf += b"".join(blobs)

    def labels(self) -> npt.NDArray[np.intp]:
        """Labels holding something, ascending."""
        return np.flatnonzero(self._len)

    def maybe_compact(self) -> None:
        if self._garbage > _COMPACT_MIN_BYTES and 2 * self._garbage > len(self._buf):
            self.permute(np.arange(self.capacity), self.capacity)

    def permute(self, order: npt.NDArray[np.intp], capacity: int) -> None:
        """Keep only labels `order`, renumbered `0 .. len(order)-1`, in a fresh arena."""
        lens, blob = self.take(order)
        off = np.zeros(capacity, dtype=np.int64)
        ln = np.zeros(capacity, dtype=np.uint32)
        wide = lens.astype(np.int64)
        off[: order.size] = np.cumsum(wide) - wide
        ln[: order.size] = lens
        self._buf, self._off, self._len, self._garbage = bytearray(blob), off, ln, 0

    def matching(self, match: Callable[[bytes], bool]) -> npt.NDArray[np.uint64]:
        """Labels (ascending) whose bytes satisfy `match`."""
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

    def take(self, labels: npt.NDArray[np.intp]) -> Strings:
        """Lengths (0: nothing) and the concatenated bytes of `labels`, in that order."""
        lens = self._len[labels].astype(np.int64)
        total = int(lens.sum())
        if not total:
            return Strings(lens.astype(np.uint32), b"")
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
            return Strings(lens.astype(np.uint32), blob)
        # byte positions: each piece's offset repeated over its length, plus 0, 1, 2, ...
        # (`_GATHER_PIECES` pieces at a time, so the positions stay small next to the bytes)
        parts: list[bytes] = []
        arena = np.frombuffer(self._buf, dtype=np.uint8)
        try:
            for lo in range(0, labels.size, _GATHER_PIECES):
                c_lens = lens[lo : lo + _GATHER_PIECES]
                c_offs = offs[lo : lo + _GATHER_PIECES]
                starts = np.repeat(np.cumsum(c_lens) - c_lens, c_lens)
                within = np.arange(int(c_lens.sum()), dtype=np.int64) - starts
                parts.append(arena[np.repeat(c_offs, c_lens) + within].tobytes())
        finally:
            del arena  # release the export, or the bytearray cannot grow again
        return Strings(lens.astype(np.uint32), b"".join(parts))

    def load(self, labels: npt.NDArray[np.intp], lens: npt.NDArray[np.uint32], blob: bytes) -> None:
        """Replace the content: `labels[i]` gets the i-th of the concatenated `blob` pieces
        of `lens` bytes (0: nothing). Raises ValueError when the lengths do not add up."""
        lens64 = lens.astype(np.int64)
        if int(lens64.sum()) != len(blob):
            raise ValueError("lengths do not add up")
        self._buf = bytearray(blob)
        self._off[labels] = np.cumsum(lens64) - lens64
        self._len[labels] = lens
        self._garbage = 0

    def nbytes(self) -> int:
        """Arena bytes, garbage included."""
        return len(self._buf)
