"""Queries (`lhv.search`): typed values and `decode_query`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import orjson

from lhv_index.errors import InvalidRequest
from worker.wire._body import (
    _brief,
    _check_ids,
    _check_key,
    _int,
    _opt_int,
    _parse,
    _request_faults,
)
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC, ReplyTo, reply_to_from_headers
from worker.wire.limits import QUERY_OPS, MessageLimits
from worker.wire.schemas import _check
from worker.wire.vectors import _search_vectors

__all__ = ["DescribeQuery", "GetQuery", "Query", "SearchQuery", "StatsQuery", "decode_query"]


# -- queries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _QueryBase:
    index: str
    reply_to: ReplyTo
    request_id: str | None = None
    min_offset: int | None = None
    """answer only once this command offset of the index's partition is applied"""
    deadline_ms: int | None = None
    """absolute Unix time in milliseconds"""
    min_offsets: dict[str, int] | None = None
    """a sharded index asked by name: member key `NAME#s` -> the offset that member waits
    for (the home hands each member its own; ignored for an ordinary index)"""
    allow_partial: bool = False
    """a sharded index: answer without members that miss the deadline, flagged partial"""
    via_alias: str | None = None
    """relayed by the home of this alias (one hop: another alias here is refused)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchQuery(_QueryBase):
    op: ClassVar[str] = "search"
    vectors: np.ndarray
    """shape (n, dim), float32: one row, or the rows of a multi-vector search"""
    multi: bool = False
    """asked with `vectors` / `vectors_b64`: answered with `results`, one per row"""
    k: int = 10
    ef: int | None = None
    filter: dict[str, Any] | None = None
    """equality on metadata fields; None or {}: no filter"""
    include_metadata: bool = False
    include_vectors: bool = False
    """each hit carries its stored vector (`vector`; `vectors` in `results`)"""
    vector_encoding: Literal["json", "b64"] = "json"
    """with include_vectors: JSON floats, or base64 of little-endian float32 (`vector_b64`;
    `vectors_b64` in `results`)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class GetQuery(_QueryBase):
    op: ClassVar[str] = "get"
    ids: list[str]
    include_vectors: bool = True
    include_metadata: bool = True
    vector_encoding: Literal["json", "b64"] = "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsQuery(_QueryBase):
    op: ClassVar[str] = "stats"


@dataclass(frozen=True, slots=True, kw_only=True)
class DescribeQuery(_QueryBase):
    """What `index` names (an index, a sharded index, an alias), from its home's catalog."""

    op: ClassVar[str] = "describe"


Query: TypeAlias = SearchQuery | GetQuery | StatsQuery | DescribeQuery


def _check_filter(flt: dict[str, Any] | None, limits: MessageLimits) -> dict[str, Any] | None:
    """A search's equality filter (the schema has checked it is an object), within the
    limits on its fields and size; None when absent or empty."""
    if not flt:
        return None
    if len(flt) > limits.max_filter_keys:
        raise InvalidRequest(
            f"search: filter of {len(flt)} fields is over the limit {limits.max_filter_keys} "
            "(max_filter_keys)"
        )
    size = len(orjson.dumps(flt))  # nesting is within max_json_depth, below orjson's own
    if size > limits.max_filter_bytes:
        raise InvalidRequest(
            f"search: filter of {size} bytes is over the limit {limits.max_filter_bytes} "
            "(max_filter_bytes)"
        )
    return flt


def decode_query(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    *,
    limits: MessageLimits,
) -> Query:
    """Decode and validate one record of the search topic (`op` defaults to `search`).

    Raises:
        InvalidRequest: no reply headers (nowhere to answer: the worker logs and skips
            the record), or anything malformed; with reply headers present, the caller
            answers with an error reply (`reply_to_from_headers` reads them alone).
    """
    with _request_faults():
        return _query(key, value, headers, limits)


def _query(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    limits: MessageLimits,
) -> Query:
    reply_to = reply_to_from_headers(headers, limits=limits)
    if reply_to is None:
        raise InvalidRequest(f"a query needs {REPLY_TOPIC} and {CORRELATION_ID} headers")
    body = _parse(value, limits)
    op = body.setdefault("op", "search")
    if op not in QUERY_OPS:
        raise InvalidRequest(f"unknown op {_brief(op)}; queries are {', '.join(QUERY_OPS)}")
    _check(op, body)
    index = body["index"]
    _check_key(key, index)
    request_id = body.get("request_id")
    min_offset = _opt_int(body.get("min_offset"))
    deadline_ms = _opt_int(body.get("deadline_ms"))
    raw_offsets = body.get("min_offsets")
    common: dict[str, Any] = {
        "min_offsets": ({str(k): int(v) for k, v in raw_offsets.items()} if raw_offsets else None),
        "allow_partial": bool(body.get("allow_partial", False)),
        "via_alias": body.get("via_alias"),
    }
    if op == "search":
        k = _int(body.get("k"), 10)
        if k > limits.max_k:
            raise InvalidRequest(f"search: k {k} is over the limit {limits.max_k}")
        vectors, multi = _search_vectors(body, limits)
        if k * len(vectors) > limits.max_hits:
            raise InvalidRequest(
                f"search: k {k} times {len(vectors)} query vectors is over the limit "
                f"{limits.max_hits} (max_hits): ask for a smaller k, or fewer query "
                "vectors in one search"
            )
        include_vectors = bool(body.get("include_vectors", False))
        if include_vectors and k * len(vectors) > limits.max_get_vectors:
            raise InvalidRequest(
                f"search: k {k} times {len(vectors)} query vectors with include_vectors is "
                f"over the limit {limits.max_get_vectors} (max_get_vectors): ask for a "
                "smaller k, or without vectors and get the hits' vectors by id"
            )
        return SearchQuery(
            index=index,
            reply_to=reply_to,
            request_id=request_id,
            min_offset=min_offset,
            deadline_ms=deadline_ms,
            **common,
            vectors=vectors,
            multi=multi,
            k=k,
            ef=_opt_int(body.get("ef")),
            filter=_check_filter(body.get("filter"), limits),
            include_metadata=bool(body.get("include_metadata", False)),
            include_vectors=include_vectors,
            vector_encoding=body.get("vector_encoding", "json"),
        )
    if op == "get":
        ids = _check_ids(body["ids"], limits, op)
        include_vectors = bool(body.get("include_vectors", True))
        if include_vectors and len(ids) > limits.max_get_vectors:
            raise InvalidRequest(
                f"get: {len(ids)} ids with include_vectors is over the limit "
                f"{limits.max_get_vectors} (max_get_vectors): ask in several gets, or "
                "without vectors"
            )
        return GetQuery(
            index=index,
            reply_to=reply_to,
            request_id=request_id,
            min_offset=min_offset,
            deadline_ms=deadline_ms,
            **common,
            ids=ids,
            include_vectors=include_vectors,
            include_metadata=bool(body.get("include_metadata", True)),
            vector_encoding=body.get("vector_encoding", "json"),
        )
    if op == "describe":
        return DescribeQuery(
            index=index,
            reply_to=reply_to,
            request_id=request_id,
            min_offset=min_offset,
            deadline_ms=deadline_ms,
        )
    return StatsQuery(
        index=index,
        reply_to=reply_to,
        request_id=request_id,
        min_offset=min_offset,
        deadline_ms=deadline_ms,
        **common,
    )
