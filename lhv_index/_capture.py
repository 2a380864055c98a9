"""Captures of an index: a full `Base`, or a `Delta` of the ids that changed.

`Index.capture_base` and `Index.capture_delta` fill them under the index's exclusive lock,
taking state only; encoding into an LHV1 frame (`write_snapshot`, `write_delta`) happens
later, outside the lock, so writes to the index go on while a checkpoint is encoded and
uploaded.

A delta and the small parts of a base are copies in memory. The engine's part of a base is
the engine's own saved bytes in unlinked temporary files (`FilePiece`: hnswlib's
`save_index`; exact and annoy: their `dump`), read back in chunks while the frame is
encoded (`_frame.write_frame`): the process
never holds a second copy of the index, so peak memory stays near the index's size (the
file's pages are page cache, which the kernel reclaims, not process memory). A base holds
open files: close it (`Base.close`, or `with`) once it is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from lhv_index._packed import Strings
from lhv_index._params import IndexParams

__all__ = ["READ_CHUNK_BYTES", "Base", "Delta", "EnginePiece", "FilePiece"]

#: bytes read at a time from a `FilePiece`
READ_CHUNK_BYTES = 8 << 20


@dataclass(slots=True, eq=False)
class FilePiece:
    """The first `length` bytes of an open file, usually an unlinked temporary one (its
    blocks are freed once it is closed, or when the process ends)."""

    file: IO[bytes]
    length: int

    @property
    def closed(self) -> bool:
        return self.file.closed

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        """The bytes, `size` (default `READ_CHUNK_BYTES`) at a time, with `os.pread`: no
        shared file position, so readers never disturb one another.

        Raises:
            ValueError: the piece is closed.
            OSError: the file is shorter than `length`, or unreadable.
        """
        if self.file.closed:
            raise ValueError("the captured engine file is closed")
        fd, step = self.file.fileno(), size or READ_CHUNK_BYTES
        pos = 0
        while pos < self.length:
            chunk = os.pread(fd, min(step, self.length - pos), pos)
            if not chunk:
                raise OSError(f"captured engine file ends at {pos} of {self.length} bytes")
            pos += len(chunk)
            yield chunk

    def close(self) -> None:
        """Close the file (idempotent)."""
        self.file.close()


#: one part of an engine section, in memory or in a file; a section is the concatenation
#: of its pieces
EnginePiece = bytes | memoryview | npt.NDArray[Any] | FilePiece


@dataclass(slots=True, kw_only=True, eq=False)
class Base:
    """Everything a full snapshot holds, taken from the index: copies, and the engine's
    bytes in files this base owns (`close` releases them)."""

    name: str
    params: IndexParams
    labels: npt.NDArray[np.intp]
    """the live labels, ascending"""
    ids: Strings
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

    def close(self) -> None:
        """Close the files of the engine's sections (idempotent); the base can no longer
        be written after."""
        for _, pieces in self.engine:
            for piece in pieces:
                if isinstance(piece, FilePiece):
                    piece.close()

    def __enter__(self) -> Base:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
