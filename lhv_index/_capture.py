"""In-memory captures of an index: a full `Base`, or a `Delta` of the ids that changed.

`Index.capture_base` and `Index.capture_delta` fill them under the index's exclusive lock,
copying only; encoding into an LHV1 frame (`write_snapshot`, `write_delta`) happens later,
outside the lock, so writes to the index go on while a checkpoint is encoded and uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from lhv_index._params import IndexParams

__all__ = ["Base", "Delta", "EnginePiece"]

#: one buffer of an engine section; a section is the concatenation of its pieces
EnginePiece = bytes | memoryview | npt.NDArray[Any]


@dataclass(slots=True, kw_only=True, eq=False)
class Base:
    """Everything a full snapshot holds, copied out of the index."""

    name: str
    params: IndexParams
    labels: npt.NDArray[np.intp]
    """the live labels, ascending"""
    ids: list[str]
    """the id of each live label, in the order of `labels`"""
    clocks: npt.NDArray[np.int64]
    """(n, 3): version, offset, position"""
    meta_lens: npt.NDArray[np.uint32]
    """metadata byte lengths (0: none), in the order of `labels`"""
    meta_json: bytes
    """the compact JSON objects, concatenated"""
    norms: npt.NDArray[np.float32] | None
    """cosine only: the norm of each vector as given"""
    tomb_ids: list[str]
    tomb_clocks: npt.NDArray[np.int64]
    """(t, 3)"""
    slots: int
    """labels handed out (live and free)"""
    version_floor: int
    """the highest client version of a tombstone dropped by `compact_tombstones`"""
    engine_state: dict[str, Any]
    """what the engine's bytes do not record (see `_snapshot`)"""
    engine: list[tuple[str, list[EnginePiece]]]
    """(section name, pieces) of the engine's sections, in frame order"""


@dataclass(slots=True, kw_only=True, eq=False)
class Delta:
    """The state, at capture, of every id written since the previous capture.

    Each changed id is in exactly one of three lists: live (`ids` with their vector,
    metadata and clock), tombstoned (`tomb_ids`), or gone (`gone`: no state at all, a
    tombstone dropped by `compact_tombstones`). Applying it sets those ids to that state,
    so applying it twice changes nothing.
    """

    name: str
    params: IndexParams
    ids: list[str]
    clocks: npt.NDArray[np.int64]
    """(n, 3): version, offset, position"""
    vectors: npt.NDArray[np.float32]
    """(n, dim): the vectors as the engine holds them (normalized under cosine)"""
    norms: npt.NDArray[np.float32] | None
    """cosine only: the norm of each vector as given"""
    meta_lens: npt.NDArray[np.uint32]
    meta_json: bytes
    tomb_ids: list[str]
    tomb_clocks: npt.NDArray[np.int64]
    """(t, 3)"""
    gone: list[str]
    version_floor: int

    def __len__(self) -> int:
        """Changed ids in this delta."""
        return len(self.ids) + len(self.tomb_ids) + len(self.gone)
