"""Vectors on the wire: JSON arrays and base64 little-endian float32, checked finite."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import numpy as np

from lhv_index.errors import InvalidRequest
from worker.wire.limits import MessageLimits

__all__ = ["decode_vector_b64", "encode_vector", "encode_vector_b64", "vector_field"]


def decode_vector_b64(text: str, *, max_dim: int) -> np.ndarray:
    """base64 of little-endian float32 -> a float32 vector (writable, native order).

    Raises:
        InvalidRequest: not strict base64, not a whole number of float32 values, empty, or
            longer than `max_dim`. (Finiteness is the caller's check.)
    """
    raw = _b64_bytes(text, max_dim, "vector_b64", None)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def encode_vector_b64(vector: Any) -> str:
    """A vector (array or numbers) as base64 of little-endian float32, as
    `decode_vector_b64` reads it."""
    row = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    return base64.b64encode(row.tobytes()).decode("ascii")


def encode_vector(vector: Any, encoding: str) -> list[float] | str:
    """A stored vector in a reply: JSON floats, or `encode_vector_b64` when `encoding`
    is "b64"."""
    if encoding == "b64":
        return encode_vector_b64(vector)
    out: list[float] = np.asarray(vector, dtype="<f4").reshape(-1).tolist()
    return out


def vector_field(name: str, encoding: str) -> str:
    """The reply field of vectors sent with `encode_vector`: `name` ("vector" or
    "vectors"), or `name` + "_b64" when `encoding` is "b64"."""
    return f"{name}_b64" if encoding == "b64" else name


def _b64_bytes(text: str, max_dim: int, where: str, item: int | None) -> bytes:
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: vector_b64 is not valid base64", item=item) from None
    if not raw or len(raw) % 4:
        raise InvalidRequest(
            f"{where}: vector_b64 holds {len(raw)} bytes, not a whole number of float32 "
            "values (a multiple of 4, at least 4)",
            item=item,
        )
    if len(raw) > 4 * max_dim:
        raise InvalidRequest(
            f"{where}: vector of {len(raw) // 4} dimensions is over the limit {max_dim}",
            item=item,
        )
    return raw


_NOT_NUMBERS = "vector must be a flat array of numbers"
_NOT_FINITE = "vector has NaN or infinite values (or values beyond float32)"


def _json_vector(values: list[Any], max_dim: int, where: str, item: int | None) -> np.ndarray:
    """One JSON vector (the schema has checked it is a non-empty array)."""
    if len(values) > max_dim:
        raise InvalidRequest(
            f"{where}: vector of {len(values)} dimensions is over the limit {max_dim}",
            item=item,
        )
    if not all(type(v) is float or type(v) is int for v in values):
        raise InvalidRequest(f"{where}: {_NOT_NUMBERS}", item=item)
    with np.errstate(over="ignore"):
        vec = np.asarray(values, dtype=np.float32)
    if not np.isfinite(vec).all():
        raise InvalidRequest(f"{where}: {_NOT_FINITE}", item=item)
    return vec


_SEARCH_VECTOR_FIELDS = ("vector", "vector_b64", "vectors", "vectors_b64")


def _search_vectors(body: dict[str, Any], limits: MessageLimits) -> tuple[np.ndarray, bool]:
    """The (n, dim) float32 query rows of a search body, and whether it was multi-vector."""
    given = [name for name in _SEARCH_VECTOR_FIELDS if name in body]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise InvalidRequest(
            f"search: exactly one of vector, vector_b64, vectors and vectors_b64 is "
            f"required, got {got}"
        )
    field_name = given[0]
    value = body[field_name]
    if field_name == "vector":
        return _json_vector(value, limits.max_dim, "search", None).reshape(1, -1), False
    if field_name == "vector_b64":
        raw = _b64_bytes(value, limits.max_dim, "search", None)
        vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(vec).all():
            raise InvalidRequest(f"search: {_NOT_FINITE}")
        return vec.reshape(1, -1), False
    if len(value) > limits.max_queries:
        raise InvalidRequest(
            f"search: {len(value)} vectors is over the limit {limits.max_queries} (max_queries)"
        )

    def where(pos: int) -> str:
        return f"search: vector {pos}"

    positions = list(range(len(value)))
    if field_name == "vectors":
        _same_length([len(row) for row in value])
        out = _json_rows(value, positions, where, limits.max_dim)
        if out.shape[1] > limits.max_dim:
            raise InvalidRequest(
                f"search: vectors of {out.shape[1]} dimensions are over the limit {limits.max_dim}"
            )
        return out, True
    raws = [_b64_bytes(text, limits.max_dim, where(pos), pos) for pos, text in enumerate(value)]
    _same_length([len(raw) // 4 for raw in raws])
    out = np.frombuffer(b"".join(raws), dtype="<f4").astype(np.float32)
    out = out.reshape(len(raws), -1)
    _check_finite(out, positions, where)
    return out, True


def _same_length(dims: list[int]) -> None:
    for pos, dim in enumerate(dims):
        if dim != dims[0]:
            raise InvalidRequest(
                f"search: vector {pos} has {dim} dimensions, vector 0 has {dims[0]}: "
                "the vectors of one search share one length",
                item=pos,
            )


def _json_rows(
    rows: list[list[Any]], positions: list[int], where: Callable[[int], str], max_dim: int
) -> np.ndarray:
    """Rows of one length (<= max_dim) -> (n, dim) float32 in one numpy call (module doc)."""
    try:
        arr = np.array(rows)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is None or arr.ndim != 2 or arr.dtype.kind not in "fiu":
        for row, pos in zip(rows, positions, strict=True):  # find the culprit
            _json_vector(row, max_dim, where(pos), pos)
        raise InvalidRequest(f"{where(positions[0])}: {_NOT_NUMBERS}", item=positions[0])
    # JSON true/false become exactly 1/0: look for booleans only in rows holding one
    for i in np.flatnonzero(((arr == 0) | (arr == 1)).any(axis=1)).tolist():
        if any(type(v) is bool for v in rows[i]):
            raise InvalidRequest(f"{where(positions[i])}: {_NOT_NUMBERS}", item=positions[i])
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, rejected just below
        out = arr.astype(np.float32)
    _check_finite(out, positions, where)
    return out


def _check_finite(arr: np.ndarray, positions: list[int], where: Callable[[int], str]) -> None:
    """Raise for the first row of a (n, dim) array holding NaN or an infinity."""
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        pos = positions[int(np.flatnonzero(~finite)[0])]
        raise InvalidRequest(f"{where(pos)}: {_NOT_FINITE}", item=pos)


_NO_VECTOR = np.empty(0, dtype=np.float32)
