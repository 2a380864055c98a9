"""Metadata of live items: compact JSON bytes by label, packed (`PackedBytes`).

A million small metadata objects as separate `bytes` cost about 50 MB (object headers and
list pointers); packed, they cost their bytes plus 12 bytes per slot.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from lhv_index._packed import PackedBytes

__all__ = ["MetaStore"]


class MetaStore(PackedBytes):
    """label -> compact JSON object bytes (None: no metadata)."""

    __slots__ = ()

    def load(self, labels: npt.NDArray[np.intp], lens: npt.NDArray[np.uint32], blob: bytes) -> None:
        """Replace the content: `labels[i]` gets the i-th of the concatenated `blob` pieces
        of `lens` bytes (0: none). Raises ValueError when a piece is not a JSON object or
        the lengths do not add up."""
        lens64 = lens.astype(np.int64)
        if int(lens64.sum()) != len(blob):
            raise ValueError("metadata lengths do not add up")
        present = lens64 > 0
        offs = np.cumsum(lens64) - lens64
        if (
            present.any()
            and not (np.frombuffer(blob, dtype=np.uint8)[offs[present]] == ord("{")).all()
        ):
            raise ValueError("metadata is not a JSON object")
        super().load(labels, lens, blob)
