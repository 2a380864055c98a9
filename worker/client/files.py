"""Reading vector files for `lhv load`: `.npy`, `.npz`, `.fvecs`, `.jsonl`, in batches.

| format | vectors | ids | metadata |
| --- | --- | --- | --- |
| `.npy` | the 2-D array (memory-mapped) | row numbers, or `ids_file` | none |
| `.npz` | the array named `vectors` (or `embeddings`, `x`, `data`; or the only array besides `ids`) | the array `ids` if present, else row numbers or `ids_file` | none |

`.npy` and `.npz` files are read by `worker.wire.arrays`, the reader of `import` too, so
both accept the same files and check them the same way before allocating anything (a
`.npy` header against the file's size, a `.npz` directory against `NPZ_BOUNDS`).
| `.fvecs` | TEXMEX layout: per row a little-endian int32 dim, then dim float32 | row numbers, or `ids_file` | none |
| `.jsonl` | one JSON object per line: `{"id", "vector", "metadata"?}` | `id` (strings; numbers are turned into text) | `metadata` |

`ids_file` is a text file with one id per line, or an `.npy` array of ids. Row ids are the
row number as text (`"0"`, `"1"`, ...), so loading a file twice upserts the same items.
Files are read lazily, one batch at a time, so a large file is never loaded whole.

Raises `LoadError` (a `ValueError`) naming the file and where in it for anything
malformed: `row N` (0-based, the default id) in array files, `line N` (1-based, what an
editor shows) in `.jsonl`. Vectors must be finite as float32 (NaN, infinities and values
beyond +-3.4e38 are refused with their row, before anything is sent: `VectorFile.check`).

`load_file(client, index, vectors)` sends the batches as acknowledged `add` records, in
file order (a later row with the same id wins), with a bounded number of batches waiting
for their acks, and reports the batches the workers rejected, and apart from them the
batches written to Kafka whose acks did not come in time (they are applied all the same
when a worker gets to them).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from lhv_index.errors import LhvError
from worker.wire.arrays import (
    ID_KINDS,
    VECTOR_KINDS,
    VECTOR_MEMBERS,
    ArrayFileError,
    NpzBounds,
    ids_of,
    read_npy,
    read_npz,
)

if TYPE_CHECKING:
    from worker.client import LhvClient, WriteResult

__all__ = [
    "FORMATS",
    "Batch",
    "FailedBatch",
    "LoadError",
    "LoadReport",
    "VectorFile",
    "load_file",
    "open_vectors",
]

log = logging.getLogger(__name__)

FORMATS = (".npy", ".npz", ".fvecs", ".jsonl")
#: what a `.npz` may hold: the import's defaults (`ImportPolicy`)
NPZ_BOUNDS = NpzBounds()


class LoadError(ValueError):
    """A vector file cannot be read as promised."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows `start .. start + len(ids) - 1` of a file."""

    start: int
    ids: list[str]
    vectors: np.ndarray
    """float32, shape (len(ids), dim)"""
    metadata: list[dict[str, Any] | None] | None = None
    lines: tuple[int, int] | None = None
    """`.jsonl`: the first and last line (1-based) of the batch's rows"""
    row_lines: tuple[int, ...] = ()
    """`.jsonl`: the line (1-based) of each row, as an editor counts them"""

    def row(self, n: int) -> str:
        """Row `n` of the batch as a message names it: `line L` of a `.jsonl`, else
        `row R` of the file."""
        if self.row_lines:
            return f"line {self.row_lines[n]}"
        return f"row {self.start + n}"

    @property
    def where(self) -> str:
        """`rows a..b`, or `lines a..b` of a `.jsonl` file."""
        if self.lines is not None:
            return f"lines {self.lines[0]}..{self.lines[1]}"
        return f"rows {self.start}..{self.start + len(self.ids) - 1}"


@dataclass(slots=True)
class VectorFile:
    """An opened vector file: its size, its dimension and its batches."""

    path: Path
    rows: int
    dim: int
    _vectors: Any = None
    _ids: list[str] | None = None
    zero_row: str | None = None
    """after `check`: the first row whose norm is zero (or out of range), which an index
    under cosine refuses, as "row N (id X)" ("line L (id X)" in a `.jsonl`); None when
    there is none"""

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches of at most `batch_size` rows."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.path.suffix == ".jsonl":
            yield from _jsonl_batches(self.path, self.dim, batch_size)
            return
        for start in range(0, self.rows, batch_size):
            stop = min(start + batch_size, self.rows)
            vecs = _finite_f32(self._vectors[start:stop], self.path, start)
            ids = self._ids[start:stop] if self._ids is not None else _row_ids(start, stop)
            yield Batch(start, ids, vecs)

    def check(self, batch_size: int = 10_000) -> None:
        """Read the whole file once, checking every row (before anything is sent).

        Raises:
            LoadError: the first bad row.
        """
        self.zero_row = None
        for batch in self.batches(batch_size):
            if self.zero_row is not None:
                continue
            norms = np.sqrt(np.einsum("ij,ij->i", batch.vectors, batch.vectors, dtype=np.float64))
            bad = np.flatnonzero(~(norms > 1e-30) | ~np.isfinite(norms))  # as lhv_index
            if len(bad):
                n = int(bad[0])
                self.zero_row = f"{batch.row(n)} (id {batch.ids[n]!r})"


def _finite_f32(values: Any, path: Path, first_row: int) -> np.ndarray:
    """`values` as contiguous float32; a row that is not finite as float32 (NaN, inf, or
    out of float32's range) raises `LoadError` naming it, without numpy's warnings."""
    with np.errstate(over="ignore", invalid="ignore"):
        vecs = np.ascontiguousarray(values, dtype=np.float32)
    finite = np.isfinite(vecs).all(axis=1)
    if not finite.all():
        bad = first_row + int(np.argmin(finite))
        raise LoadError(
            f"{path}: row {bad}: not a finite float32 vector (NaN, infinity, or beyond +-3.4e38)"
        )
    return vecs


def _row_ids(start: int, stop: int) -> list[str]:
    return [str(i) for i in range(start, stop)]


def open_vectors(path: str | Path, *, ids_file: str | Path | None = None) -> VectorFile:
    """Open `path` (format from its suffix) with ids from `ids_file` when given.

    Raises:
        LoadError: unknown suffix, not a 2-D float array, ids that do not match the rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise LoadError(f"{path}: unknown format {suffix!r}; one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    ids: list[str] | None = None
    if suffix == ".npy":
        vectors = _npy(path)
    elif suffix == ".npz":
        vectors, ids = _npz(path)
    elif suffix == ".fvecs":
        vectors = _fvecs(path)
    else:
        if ids_file is not None:
            raise LoadError(f"{path}: a .jsonl file carries its own ids; no ids file")
        rows, dim = _jsonl_shape(path)
        return VectorFile(path, rows, dim)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise LoadError(f"{path}: expected a non-empty 2-D array, got shape {vectors.shape}")
    if vectors.dtype.kind not in "fiu":
        raise LoadError(f"{path}: expected numbers, got dtype {vectors.dtype}")
    if ids_file is not None:
        ids = _ids_file(Path(ids_file))
    if ids is not None and len(ids) != vectors.shape[0]:
        raise LoadError(f"{path}: {vectors.shape[0]} rows but {len(ids)} ids")
    return VectorFile(path, int(vectors.shape[0]), int(vectors.shape[1]), vectors, ids)


def _npy(path: Path) -> Any:
    """The array of a `.npy` file, a view of its memory map (`worker.wire.arrays`)."""
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise ArrayFileError(f"{path} is not a readable .npy array")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return read_npy(mapped, str(path), kinds=VECTOR_KINDS)
    except ArrayFileError as exc:
        raise LoadError(str(exc)) from None
    except OSError as exc:
        raise LoadError(f"{path}: not a readable .npy array ({exc})") from None


def _npz(path: Path) -> tuple[Any, list[str] | None]:
    """The vectors and ids of a `.npz`, checked from its directory before anything is
    inflated (`worker.wire.arrays`, as `import` reads one)."""
    try:
        with path.open("rb") as f:
            arrays = read_npz(f, str(path), NPZ_BOUNDS)
        vectors = next((a for name, a in arrays.items() if name != "ids"), None)
        if vectors is None:
            raise LoadError(
                f"{path}: name the vectors array one of {', '.join(VECTOR_MEMBERS)} "
                "(or make it the only array besides ids)"
            )
        ids = ids_of(arrays["ids"], str(path)) if "ids" in arrays else None
    except ArrayFileError as exc:
        raise LoadError(str(exc)) from None
    except OSError as exc:
        raise LoadError(f"{path}: not a readable .npz archive ({exc})") from None
    return vectors, ids


def _fvecs(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size < 4:
        raise LoadError(f"{path}: empty .fvecs file")
    dim = int(np.fromfile(path, dtype="<i4", count=1)[0])
    row_bytes = 4 + 4 * dim
    if dim <= 0 or size % row_bytes:
        raise LoadError(f"{path}: not an .fvecs file (dim {dim}, {size} bytes)")
    raw = np.memmap(path, dtype="<i4", mode="r", shape=(size // row_bytes, dim + 1))
    if not (raw[:, 0] == dim).all():
        bad = int(np.argmax(raw[:, 0] != dim))
        raise LoadError(f"{path}: row {bad} has dim {int(raw[bad, 0])}, not {dim}")
    return raw[:, 1:].view("<f4")


def _ids_file(path: Path) -> list[str]:
    if not path.is_file():
        raise LoadError(f"{path}: no such ids file")
    try:
        if path.suffix.lower() == ".npy":
            return ids_of(read_npy(path.read_bytes(), str(path), kinds=ID_KINDS), str(path))
        with path.open(encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except (ValueError, OSError, EOFError) as exc:  # UnicodeDecodeError is a ValueError
        raise LoadError(f"{path}: not a readable ids file ({exc})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise LoadError(f"{path} line {lineno}: not JSON ({exc})") from None
            if not isinstance(obj, dict) or "id" not in obj or "vector" not in obj:
                raise LoadError(f'{path} line {lineno}: expected {{"id", "vector", "metadata"?}}')
            yield lineno, obj


def _jsonl_shape(path: Path) -> tuple[int, int]:
    rows = 0
    dim = 0
    for lineno, obj in _jsonl_rows(path):
        if rows == 0:
            if not isinstance(obj["vector"], list) or not obj["vector"]:
                raise LoadError(f"{path} line {lineno}: vector must be a non-empty list")
            dim = len(obj["vector"])
        rows += 1
    if rows == 0:
        raise LoadError(f"{path}: no rows")
    return rows, dim


def _jsonl_batches(path: Path, dim: int, batch_size: int) -> Iterator[Batch]:
    ids: list[str] = []
    vecs: list[Any] = []
    metas: list[dict[str, Any] | None] = []
    lines: list[int] = []
    row = 0
    for lineno, obj in _jsonl_rows(path):
        vector = obj["vector"]
        if not isinstance(vector, list) or len(vector) != dim:
            raise LoadError(f"{path} line {lineno} (id {obj['id']!r}): vector is not {dim} numbers")
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise LoadError(f"{path} line {lineno}: metadata must be an object")
        ids.append(str(obj["id"]))
        vecs.append(vector)
        metas.append(meta)
        lines.append(lineno)
        if len(ids) == batch_size:
            yield _jsonl_batch(path, row, ids, vecs, metas, lines)
            row += len(ids)
            ids, vecs, metas, lines = [], [], [], []
    if ids:
        yield _jsonl_batch(path, row, ids, vecs, metas, lines)


def _jsonl_batch(
    path: Path,
    start: int,
    ids: list[str],
    vecs: list[Any],
    metas: list[dict[str, Any] | None],
    lines: list[int],
) -> Batch:
    arr = np.empty((len(vecs), len(vecs[0])), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for n, vector in enumerate(vecs):
            try:
                arr[n] = vector
            except (TypeError, ValueError):
                raise LoadError(f"{path} line {lines[n]}: vector must be numbers") from None
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = lines[int(np.argmin(finite))]
        raise LoadError(
            f"{path} line {bad}: not a finite float32 vector (NaN, infinity, or beyond +-3.4e38)"
        )
    return Batch(
        start,
        ids,
        arr,
        metas if any(m is not None for m in metas) else None,
        lines=(lines[0], lines[-1]),
        row_lines=tuple(lines),
    )


# -- sending --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailedBatch:
    """A batch the workers rejected, or one whose acknowledgement did not come in time."""

    number: int
    """0-based batch number"""
    start: int
    """first row of the batch"""
    rows: int
    error: str
    """`<code>: <message>` of the error"""
    where: str = ""
    """`rows a..b`, or `lines a..b` of a `.jsonl` file"""

    def __str__(self) -> str:
        where = self.where or f"rows {self.start}..{self.start + self.rows - 1}"
        return f"batch {self.number} ({where}): {self.error}"


@dataclass(slots=True)
class LoadReport:
    rows: int = 0
    """rows acknowledged as applied"""
    batches: int = 0
    failed: list[FailedBatch] = field(default_factory=list)
    """batches a worker rejected: not applied"""
    unacknowledged: list[FailedBatch] = field(default_factory=list)
    """batches written to Kafka whose acks did not come in time: a worker applies them
    when it gets to them (none may be running)"""
    last: WriteResult | None = None
    """where the last acknowledged batch landed (pass as `after=` to search it)"""


async def load_file(
    client: LhvClient,
    index: str,
    vectors: VectorFile,
    *,
    batch_size: int = 1000,
    in_flight: int = 8,
    timeout_s: float | None = None,
    progress: Callable[[int], object] | None = None,
) -> LoadReport:
    """Send every batch of `vectors` to `index` as acknowledged adds.

    Batches are produced in file order; at most `in_flight` wait for their acks at once.
    `progress(rows)` is called as batches are acknowledged. A rejected batch does not stop
    the load: it is reported in `LoadReport.failed`; a batch written but not acknowledged
    within the timeout in `LoadReport.unacknowledged`.

    Raises:
        TimeoutError: a batch could not even be written to Kafka in time.
    """
    from worker.client import NotAcknowledged

    if in_flight < 1:
        raise ValueError("in_flight must be >= 1")
    report = LoadReport()
    slots = asyncio.Semaphore(in_flight)
    tasks: list[asyncio.Task[None]] = []

    async def settle(number: int, batch: Batch, pending: Awaitable[WriteResult]) -> None:
        try:
            result = await pending
        except LhvError as exc:
            failed = FailedBatch(
                number, batch.start, len(batch.ids), f"{exc.code}: {exc.message}", batch.where
            )
            report.failed.append(failed)
        except NotAcknowledged as exc:
            late = FailedBatch(number, batch.start, len(batch.ids), str(exc), batch.where)
            report.unacknowledged.append(late)
        else:
            report.rows += len(batch.ids)
            if report.last is None or result.offset > report.last.offset:
                report.last = result
            if progress is not None:
                progress(len(batch.ids))
        finally:
            slots.release()

    try:
        for number, batch in enumerate(vectors.batches(batch_size)):
            await slots.acquire()
            try:
                pending = await client.start_add(
                    index,
                    batch.ids,
                    batch.vectors,
                    batch.metadata,
                    batch_size=batch_size,
                    ack=True,
                    timeout_s=timeout_s,
                )
            except BaseException:
                slots.release()
                raise
            report.batches += 1
            tasks.append(asyncio.create_task(settle(number, batch, pending)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    report.failed.sort(key=lambda f: f.number)
    report.unacknowledged.sort(key=lambda f: f.number)
    return report
