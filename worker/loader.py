"""Reading vector files for `lhv load`: `.npy`, `.npz`, `.fvecs`, `.jsonl`, in batches.

| format | vectors | ids | metadata |
| --- | --- | --- | --- |
| `.npy` | the 2-D array (memory-mapped) | row numbers, or `ids_file` | none |
| `.npz` | the array named `vectors` (or `embeddings`, `x`, `data`; or the only 2-D array) | the array `ids` if present, else row numbers or `ids_file` | none |
| `.fvecs` | TEXMEX layout: per row a little-endian int32 dim, then dim float32 | row numbers, or `ids_file` | none |
| `.jsonl` | one JSON object per line: `{"id", "vector", "metadata"?}` | `id` (strings; numbers are turned into text) | `metadata` |

`ids_file` is a text file with one id per line, or an `.npy` array of ids. Row ids are the
row number as text (`"0"`, `"1"`, ...), so loading a file twice upserts the same items.
Files are read lazily, one batch at a time, so a large file is never loaded whole.

Raises `LoadError` (a `ValueError`) naming the file and the row for anything malformed.

`load_file(client, index, vectors)` sends the batches as acknowledged `add` records, in
file order (a later row with the same id wins), with a bounded number of batches waiting
for their acks, and reports the batches the workers rejected or did not acknowledge.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from lhv_index.errors import LhvError

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
_NPZ_NAMES = ("vectors", "embeddings", "x", "data")


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


@dataclass(slots=True)
class VectorFile:
    """An opened vector file: its size, its dimension and its batches."""

    path: Path
    rows: int
    dim: int
    _vectors: Any = None
    _ids: list[str] | None = None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches of at most `batch_size` rows."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.path.suffix == ".jsonl":
            yield from _jsonl_batches(self.path, self.dim, batch_size)
            return
        for start in range(0, self.rows, batch_size):
            stop = min(start + batch_size, self.rows)
            vecs = np.ascontiguousarray(self._vectors[start:stop], dtype=np.float32)
            ids = self._ids[start:stop] if self._ids is not None else _row_ids(start, stop)
            yield Batch(start, ids, vecs)


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
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
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


def _npz(path: Path) -> tuple[Any, list[str] | None]:
    with np.load(path, allow_pickle=False) as z:
        names = list(z.files)
        name = next((n for n in _NPZ_NAMES if n in names), None)
        if name is None:
            two_d = [n for n in names if z[n].ndim == 2]
            if len(two_d) != 1:
                raise LoadError(
                    f"{path}: name the vectors array one of {', '.join(_NPZ_NAMES)} "
                    f"(arrays: {', '.join(names)})"
                )
            name = two_d[0]
        vectors = z[name]
        ids = [str(x) for x in z["ids"].tolist()] if "ids" in names else None
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
    if path.suffix.lower() == ".npy":
        return [str(x) for x in np.load(path, allow_pickle=False).tolist()]
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as f:
        row = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise LoadError(f"{path}:{lineno}: not JSON: {exc}") from None
            if not isinstance(obj, dict) or "id" not in obj or "vector" not in obj:
                raise LoadError(f'{path}:{lineno}: expected {{"id", "vector", "metadata"?}}')
            yield row, obj
            row += 1


def _jsonl_shape(path: Path) -> tuple[int, int]:
    rows = 0
    dim = 0
    for _row, obj in _jsonl_rows(path):
        if rows == 0:
            dim = len(obj["vector"])
        rows += 1
    if rows == 0:
        raise LoadError(f"{path}: no rows")
    return rows, dim


def _jsonl_batches(path: Path, dim: int, batch_size: int) -> Iterator[Batch]:
    ids: list[str] = []
    vecs: list[Any] = []
    metas: list[dict[str, Any] | None] = []
    start = 0
    for row, obj in _jsonl_rows(path):
        vector = obj["vector"]
        if not isinstance(vector, list) or len(vector) != dim:
            raise LoadError(f"{path}: row {row} (id {obj['id']!r}): vector is not {dim} numbers")
        meta = obj.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise LoadError(f"{path}: row {row}: metadata must be an object")
        if not ids:
            start = row
        ids.append(str(obj["id"]))
        vecs.append(vector)
        metas.append(meta)
        if len(ids) == batch_size:
            yield _jsonl_batch(path, start, ids, vecs, metas)
            ids, vecs, metas = [], [], []
    if ids:
        yield _jsonl_batch(path, start, ids, vecs, metas)


def _jsonl_batch(
    path: Path, start: int, ids: list[str], vecs: list[Any], metas: list[dict[str, Any] | None]
) -> Batch:
    try:
        arr = np.asarray(vecs, dtype=np.float32)
    except (TypeError, ValueError):
        raise LoadError(
            f"{path}: rows {start}..{start + len(ids) - 1}: vectors must be numbers"
        ) from None
    return Batch(start, ids, arr, metas if any(m is not None for m in metas) else None)


# -- sending --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailedBatch:
    """A batch the workers rejected (or did not acknowledge in time)."""

    number: int
    """0-based batch number"""
    start: int
    """first row of the batch"""
    rows: int
    error: str
    """`<code>: <message>` of the error"""

    def __str__(self) -> str:
        return (
            f"batch {self.number} (rows {self.start}..{self.start + self.rows - 1}): {self.error}"
        )


@dataclass(slots=True)
class LoadReport:
    rows: int = 0
    """rows acknowledged as applied"""
    batches: int = 0
    failed: list[FailedBatch] = field(default_factory=list)
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
    `progress(rows)` is called as batches are acknowledged (or fail). A failed batch does
    not stop the load: it is reported in `LoadReport.failed`.
    """
    if in_flight < 1:
        raise ValueError("in_flight must be >= 1")
    report = LoadReport()
    slots = asyncio.Semaphore(in_flight)
    tasks: list[asyncio.Task[None]] = []

    async def settle(number: int, batch: Batch, pending: Awaitable[WriteResult]) -> None:
        try:
            result = await pending
        except (LhvError, TimeoutError) as exc:
            code = exc.code if isinstance(exc, LhvError) else "timeout"
            msg = exc.message if isinstance(exc, LhvError) else "no acknowledgement in time"
            report.failed.append(FailedBatch(number, batch.start, len(batch.ids), f"{code}: {msg}"))
            log.warning("batch %d failed: %s", number, msg)
        else:
            report.rows += len(batch.ids)
            if report.last is None or result.offset > report.last.offset:
                report.last = result
        finally:
            slots.release()
            if progress is not None:
                progress(len(batch.ids))

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
    return report
