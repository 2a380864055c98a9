"""`.npy` and `.npz` vector files, read within bounds: the one reader of `lhv load` and of
`import` (DESIGN section 3), so both accept the same files.

- `.npy`: the header is checked before any array exists: no pickles or objects, a dtype of
  the kinds asked for, shape times item size within a cap and equal to the bytes that
  follow the header. The array is then a read-only view of the bytes given (a memory map
  of a file stays a memory map).
- `.npz`: the zip directory is checked before anything is inflated (member count,
  declared sizes in total, each compressed member's ratio); members are inflated with a
  cap (one longer than it declares is cut there and fails its check). The vectors are
  the member `vectors` (else `embeddings`, `x` or `data`; else the only member besides
  `ids`), the ids the member `ids` if there is one.
- ids: strings (UTF-8 when bytes) or integers (as decimal text), one per row.

Errors are `ArrayFileError` (a `ValueError`) saying what is wrong, naming the file as the
caller calls it (`what`) and the bound's setting when the caller gives one, never echoing
what was read; each caller words them for its users (`lhv load`: the path; `import`: an
`invalid_request` naming the import's field).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

__all__ = [
    "ID_KINDS",
    "VECTOR_KINDS",
    "VECTOR_MEMBERS",
    "ArrayFileError",
    "NpzBounds",
    "RowError",
    "ids_of",
    "read_npy",
    "read_npz",
    "vectors_member",
]

#: the `.npz` member names taken for the vectors, in order of preference
VECTOR_MEMBERS = ("vectors", "embeddings", "x", "data")
#: numpy dtype kinds of vectors, and of ids
VECTOR_KINDS = "fiu"
ID_KINDS = "USiu"


class ArrayFileError(ValueError):
    """A `.npy` or `.npz` file is unreadable, of another type, or over a bound."""


def _named(message: str, setting: str | None) -> str:
    """`message`, naming the bound's setting when there is one."""
    return f"{message} ({setting})" if setting else message


def read_npy(
    data: bytes | bytearray | memoryview | Any,
    what: str,
    *,
    kinds: str = VECTOR_KINDS,
    max_bytes: int | None = None,
    setting: str | None = None,
) -> np.ndarray:
    """The array of the `.npy` file held in `data` (bytes, or any buffer such as an
    `mmap`), as a read-only view of it; checked before any array exists.

    Raises:
        ArrayFileError: unreadable, another dtype, or declaring more than `max_bytes`
            (named by `setting`).
    """
    view = memoryview(data).cast("B")
    buf = io.BytesIO(view[: 65536 + 16].tobytes())  # the header: at most 64 KiB (format 2)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError("unsupported .npy version")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise ArrayFileError(f"{what} is not a readable .npy array") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in kinds:
        raise ArrayFileError(f"{what} holds an array of an unsupported type")
    count = 1
    for n in shape:
        count *= int(n)
    nbytes = count * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ArrayFileError(
            _named(f"{what} declares an array larger than {max_bytes} bytes", setting)
        )
    start = buf.tell()
    if len(view) - start != nbytes:
        raise ArrayFileError(f"{what} is not a readable .npy array")
    arr = np.frombuffer(view, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


@dataclass(frozen=True, slots=True, kw_only=True)
class NpzBounds:
    """What a `.npz` may hold (the defaults are `ImportPolicy`'s); `settings` name the
    bounds in messages."""

    max_members: int = 16
    max_inflated_bytes: int = 1 << 30
    max_compression_ratio: int = 100
    settings: tuple[str, str, str] | None = None
    """the settings of `max_members`, `max_inflated_bytes` and `max_compression_ratio`"""

    def _setting(self, i: int) -> str | None:
        return self.settings[i] if self.settings else None


def vectors_member(names: Iterable[str]) -> str | None:
    """The member of a `.npz` taken for the vectors (names without `.npy`): the first of
    `VECTOR_MEMBERS`, else the only one besides `ids`; None when there is no such one."""
    names = list(names)
    for name in VECTOR_MEMBERS:
        if name in names:
            return name
    others = [n for n in names if n != "ids"]
    return others[0] if len(others) == 1 else None


def read_npz(
    src: bytes | IO[bytes],
    what: str,
    bounds: NpzBounds,
    members: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of the `.npz` in `src` (bytes or a binary file) named in `members`
    (names without `.npy`; default: the vectors member, see `vectors_member`, and `ids`),
    those it has. `ids` may hold strings; the others numbers.

    Raises:
        ArrayFileError: unreadable, or over a bound (named with its setting).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(src) if isinstance(src, bytes) else src) as zf:
            infos = zf.infolist()
            if len(infos) > bounds.max_members:
                raise ArrayFileError(
                    _named(f"{what} has more than {bounds.max_members} members", bounds._setting(0))
                )
            declared = sum(i.file_size for i in infos)
            if declared > bounds.max_inflated_bytes:
                raise ArrayFileError(
                    _named(
                        f"{what} inflates to more than {bounds.max_inflated_bytes} bytes",
                        bounds._setting(1),
                    )
                )
            for info in infos:
                if (
                    info.compress_type != zipfile.ZIP_STORED
                    and info.file_size > bounds.max_compression_ratio * max(info.compress_size, 1)
                ):
                    raise ArrayFileError(
                        _named(
                            f"{what} has a member compressed more than "
                            f"{bounds.max_compression_ratio} to 1",
                            bounds._setting(2),
                        )
                    )
            by_name = {i.filename.removesuffix(".npy"): i for i in infos}
            if members is None:
                chosen = vectors_member(by_name)
                members = [m for m in (chosen, "ids") if m is not None]
            out: dict[str, np.ndarray] = {}
            budget = bounds.max_inflated_bytes
            for name in members:
                member = by_name.get(name)
                if member is None:
                    continue
                with zf.open(member) as f:
                    raw = f.read(min(member.file_size, budget) + 1)
                if len(raw) > member.file_size or len(raw) > budget:
                    raise ArrayFileError(
                        _named(f"{what} inflates past its bound", bounds._setting(1))
                    )
                budget -= len(raw)
                out[name] = read_npy(
                    raw,
                    f"{what} member {name!r}",
                    kinds=ID_KINDS if name == "ids" else VECTOR_KINDS,
                    max_bytes=bounds.max_inflated_bytes,
                    setting=bounds._setting(1),
                )
            return out
    except ArrayFileError:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
        ValueError,
        OSError,
        EOFError,
    ) as exc:
        raise ArrayFileError(f"{what} is not a readable .npz archive") from exc


def ids_of(arr: np.ndarray, what: str) -> list[str]:
    """One id per row: strings as they are (bytes as UTF-8), integers as decimal text.

    Raises:
        ArrayFileError: not 1-D, another dtype, or bytes that are not UTF-8 (the message
            names the row).
    """
    if arr.ndim != 1:
        raise ArrayFileError(f"the ids of {what} must be a 1-D array")
    if arr.dtype.kind == "U":
        return [str(x) for x in arr.tolist()]
    if arr.dtype.kind == "S":
        out = []
        for row, x in enumerate(arr.tolist()):
            try:
                out.append(x.decode("utf-8"))
            except UnicodeDecodeError:
                raise RowError(row, f"the id in {what} is not UTF-8") from None
        return out
    if arr.dtype.kind in "iu":
        return [str(int(x)) for x in arr.tolist()]
    raise ArrayFileError(f"the ids of {what} must be strings or integers")


class RowError(ArrayFileError):
    """An `ArrayFileError` about one row (`row`, 0-based)."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(f"row {row}: {message}")
        self.row = row
