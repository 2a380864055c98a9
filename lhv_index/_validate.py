"""Validation of a batch of writes, all of it before anything is applied.

`prepare` checks every write (type, id, clock, vector, metadata) and returns the batch in
columns: the vectors stacked into one float32 matrix, metadata already serialized. Any bad
item raises `InvalidRequest` (or `DimMismatch`) with `item` = its position in the list and a
message naming its id; nothing is applied then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from lhv_index._clock import CLOCK_MAX, CLOCK_MIN, Clock
from lhv_index._params import IndexParams, Limits, Space, _brief
from lhv_index._types import MetadataJson, Vectors
from lhv_index._writes import Delete, Upsert, Write
from lhv_index.errors import DimMismatch, InvalidRequest

__all__ = [
    "META_CLEAR",
    "META_KEEP",
    "Prepared",
    "ValidatedWrites",
    "check_id",
    "encode_metadata",
    "prepare",
    "prepare_queries",
]

#: `Prepared.metas` entry: keep the stored metadata (the write had `metadata=None`)
META_KEEP = b"K"
#: `Prepared.metas` entry: no metadata (the write had `{}`, or it is a delete)
META_CLEAR = b""


@dataclass(slots=True)
class Prepared:
    """A validated batch in columns (one entry per write, in the order given)."""

    ids: list[str]
    clocks: list[Clock]
    rows: list[int]
    """row of the write's vector in `vectors`, -1 for a delete"""
    metas: list[bytes]
    """serialized metadata, `META_KEEP` or `META_CLEAR`"""
    vectors: Vectors
    """float32 (n_upserts, dim): as given (not normalized)"""
    norms: npt.NDArray[np.float32]
    """euclidean norm of each row of `vectors`"""


def check_id(id_: object, limits: Limits) -> str | None:
    """Why `id_` is not a valid id, or None when it is."""
    if not isinstance(id_, str):
        return f"id must be a string, got {type(id_).__name__}"
    if not id_:
        return "id must not be empty"
    try:
        size = len(id_.encode("utf-8"))
    except UnicodeEncodeError:
        return "id is not valid UTF-8 text"
    if size > limits.max_id_bytes:
        return f"id is {size} bytes, over the limit of {limits.max_id_bytes}"
    return None


def _check_clock(clock: object) -> Clock | None:
    if type(clock) is Clock:  # the common case, checked cheaply
        v, o, p = clock
        if (
            type(v) is int
            and type(o) is int
            and type(p) is int
            and CLOCK_MIN <= v <= CLOCK_MAX
            and CLOCK_MIN <= o <= CLOCK_MAX
            and CLOCK_MIN <= p <= CLOCK_MAX
        ):
            return clock
    if not isinstance(clock, tuple) or len(clock) != 3:
        return None
    out = []
    for part in clock:
        if isinstance(part, bool) or not isinstance(part, int | np.integer):
            return None
        value = int(part)
        if not CLOCK_MIN <= value <= CLOCK_MAX:
            return None
        out.append(value)
    return Clock(out[0], out[1], out[2])


def encode_metadata(metadata: object, limits: Limits) -> bytes:
    """Serialize one metadata object (compact JSON); `{}` gives `META_CLEAR`.

    Raises:
        InvalidRequest: not a JSON object, not serializable, or over the size limit.
    """
    if isinstance(metadata, MetadataJson):  # encoded by a caller that parsed it
        blob = metadata.json
        if blob[:1] != b"{" or blob[-1:] != b"}":
            raise InvalidRequest("metadata must be a JSON object")
        if blob == b"{}":
            return META_CLEAR
        if len(blob) > limits.max_metadata_bytes:
            raise InvalidRequest(
                f"metadata is {len(blob)} bytes, over the limit of {limits.max_metadata_bytes}"
            )
        return blob
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"metadata must be a JSON object, got {type(metadata).__name__}")
    if not metadata:
        return META_CLEAR
    try:
        blob = orjson.dumps(metadata)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidRequest(f"metadata is not valid JSON: {exc}") from None
    if len(blob) > limits.max_metadata_bytes:
        raise InvalidRequest(
            f"metadata is {len(blob)} bytes, over the limit of {limits.max_metadata_bytes}"
        )
    # orjson hands back its whole output buffer (4 KiB at least); keep an exact-size copy
    return bytes(memoryview(blob))


def _fail(exc_type: type[InvalidRequest], pos: int, id_: object, why: str) -> InvalidRequest:
    return exc_type(f"item {pos} (id {_brief(id_)}): {why}", item=pos)


def prepare(writes: Sequence[Write], params: IndexParams, limits: Limits) -> Prepared:
    """Validate a whole batch; see the module docstring."""
    if isinstance(writes, Upsert | Delete) or not isinstance(writes, Sequence):
        raise InvalidRequest("writes must be a list of Upsert and Delete")
    if len(writes) > limits.max_batch_items:
        raise InvalidRequest(
            f"batch of {len(writes)} writes is over the limit of {limits.max_batch_items}"
        )
    dim = params.dim
    ids: list[str] = []
    clocks: list[Clock] = []
    rows: list[int] = []
    metas: list[bytes] = []
    vecs: list[Any] = []
    positions: list[int] = []
    for pos, w in enumerate(writes):
        if not isinstance(w, Upsert | Delete):
            raise InvalidRequest(
                f"item {pos}: expected Upsert or Delete, got {type(w).__name__}", item=pos
            )
        id_ = w.id
        why = check_id(id_, limits)
        if why is not None:
            raise _fail(InvalidRequest, pos, id_, why)
        clock = _check_clock(w.clock)
        if clock is None:
            raise _fail(
                InvalidRequest, pos, id_, f"clock must be 3 signed 64-bit integers: {w.clock!r}"
            )
        ids.append(id_)
        clocks.append(clock)
        if isinstance(w, Delete):
            rows.append(-1)
            metas.append(META_CLEAR)
            continue
        try:
            vec = np.asarray(w.vector, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _fail(InvalidRequest, pos, id_, f"vector is not numeric: {exc}") from None
        if vec.shape != (dim,):
            got = vec.shape[0] if vec.ndim == 1 else f"shape {vec.shape}"
            raise _fail(DimMismatch, pos, id_, f"vector has dim {got}, the index has {dim}")
        if w.metadata is None:
            metas.append(META_KEEP)
        else:
            try:
                metas.append(encode_metadata(w.metadata, limits))
            except InvalidRequest as exc:
                raise _fail(InvalidRequest, pos, id_, exc.message) from None
        rows.append(len(vecs))
        vecs.append(vec)
        positions.append(pos)
    vectors = np.stack(vecs) if vecs else np.empty((0, dim), dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad_rows.size:
        pos = positions[int(bad_rows[0])]
        raise _fail(InvalidRequest, pos, ids[pos], "vector contains NaN or Inf")
    norms64 = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    if params.space is Space.COSINE:
        bad_rows = np.flatnonzero(~(norms64 > 1e-30) | ~np.isfinite(norms64))
        if bad_rows.size:
            pos = positions[int(bad_rows[0])]
            raise _fail(
                InvalidRequest, pos, ids[pos], "zero vector (or norm out of range) under cosine"
            )
    return Prepared(
        ids=ids,
        clocks=clocks,
        rows=rows,
        metas=metas,
        vectors=vectors,
        norms=norms64.astype(np.float32),
    )


class ValidatedWrites:
    """A batch of writes that `Index.validate` has checked, in columns.

    `Index.apply` takes it as it is (no second validation pass) on any index with the
    parameters and limits it was checked for. `join` puts batches end to end, so writes
    validated one command at a time (each rejected on its own, with `item` its position in
    that command) are applied with one engine call; positions in the joined batch (those
    of `ApplyResult.won`) follow the order joined.
    """

    __slots__ = ("_limits", "_params", "_prep")

    def __init__(self, prep: Prepared, params: IndexParams, limits: Limits) -> None:
        self._prep = prep
        self._params = params
        self._limits = limits

    def __len__(self) -> int:
        return len(self._prep.ids)

    @property
    def norms(self) -> npt.NDArray[np.float32]:
        """The euclidean norm of each upsert's vector, in the order of the writes."""
        return self._prep.norms

    def prepared_for(self, params: IndexParams, limits: Limits) -> Prepared:
        """The columns, for an index with `params` and `limits`.

        Raises:
            ValueError: the batch was validated for an index of other parameters or limits.
        """
        if params != self._params or limits != self._limits:
            raise ValueError("writes validated for an index of other parameters or limits")
        return self._prep

    @classmethod
    def join(cls, batches: Sequence[ValidatedWrites]) -> ValidatedWrites:
        """The batches end to end, as if validated as one list.

        Raises:
            InvalidRequest: more writes in all than the index's `max_batch_items`.
            ValueError: no batches, or batches validated for different indexes.
        """
        if not batches:
            raise ValueError("nothing to join")
        first = batches[0]
        params, limits = first._params, first._limits
        total = sum(len(b) for b in batches)
        if total > limits.max_batch_items:
            raise InvalidRequest(
                f"batch of {total} writes is over the limit of {limits.max_batch_items}"
            )
        if len(batches) == 1:
            return first
        ids: list[str] = []
        clocks: list[Clock] = []
        rows: list[int] = []
        metas: list[bytes] = []
        base = 0
        for b in batches:
            p = b.prepared_for(params, limits)
            ids += p.ids
            clocks += p.clocks
            metas += p.metas
            rows += [r + base if r >= 0 else -1 for r in p.rows]
            base += p.vectors.shape[0]
        prep = Prepared(
            ids=ids,
            clocks=clocks,
            rows=rows,
            metas=metas,
            vectors=np.concatenate([b._prep.vectors for b in batches]),
            norms=np.concatenate([b._prep.norms for b in batches]),
        )
        return cls(prep, params, limits)


def prepare_queries(
    vectors: object, params: IndexParams
) -> tuple[Vectors, npt.NDArray[np.float32]]:
    """Check query vectors: 2-D (a 1-D vector is one query), right dim, finite.

    Returns the float32 matrix and its row norms (ones unless the space is cosine).
    """
    try:
        q = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"query vectors are not numeric: {exc}") from None
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise InvalidRequest(f"query vectors must be 2-D (n, dim), got shape {q.shape}")
    if q.shape[1] != params.dim:
        raise DimMismatch(f"query vector has dim {q.shape[1]}, the index has {params.dim}")
    if not np.isfinite(q).all():
        bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
        raise InvalidRequest(f"query {bad} contains NaN or Inf", item=bad)
    if params.space is not Space.COSINE:
        return np.ascontiguousarray(q), np.ones(q.shape[0], dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    if not ((norms > 1e-30) & np.isfinite(norms)).all():
        bad = int(np.flatnonzero(~(norms > 1e-30) | ~np.isfinite(norms))[0])
        raise InvalidRequest(f"query {bad} is a zero vector under cosine", item=bad)
    return np.ascontiguousarray(q), norms.astype(np.float32)
