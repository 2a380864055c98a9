"""Replies and acks: typed values that encode themselves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import orjson

from lhv_index import Columns, MetadataJson
from lhv_index.errors import LhvError, error_for_code
from worker.wire.headers import ReplyTo, correlation_text
from worker.wire.limits import QUERY_OPS
from worker.wire.queries import DescribeQuery, GetQuery, SearchQuery, StatsQuery
from worker.wire.vectors import encode_vector, vector_field

__all__ = [
    "Ack",
    "DescribeReply",
    "ErrorInfo",
    "ErrorReply",
    "GetReply",
    "SearchReply",
    "StatsReply",
    "encode_ack",
    "encode_describe_reply",
    "encode_error_reply",
    "encode_get_reply",
    "encode_search_reply",
    "encode_search_results",
    "encode_stats_reply",
]


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error carried inside a message (merge_done), as code and message."""

    code: str
    message: str
    item: int | None = None

    @classmethod
    def of(cls, error: LhvError) -> ErrorInfo:
        return cls(error.code, error.message, error.item)

    def to_error(self) -> LhvError:
        """The `LhvError` subclass named by `code` (unknown codes: `Internal`)."""
        exc = error_for_code(self.code, self.message)
        exc.item = self.item
        return exc

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.item is not None:
            out["item"] = self.item
        return out


def _dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _ms(took_ms: float) -> float:
    return round(float(took_ms), 3)


def _ok_body(
    reply_to: ReplyTo,
    op: str,
    index: str,
    fields: Mapping[str, Any],
    took_ms: float,
    request_id: str | None,
) -> bytes:
    """A `status: ok` query reply: the correlation, op and index, `fields`, then the time
    taken and the request id when there is one."""
    body: dict[str, Any] = {
        "correlation_id": correlation_text(reply_to.correlation_id),
        "status": "ok",
        "op": op,
        "index": index,
    }
    body.update(fields)
    body["took_ms"] = _ms(took_ms)
    if request_id is not None:
        body["request_id"] = request_id
    return _dumps(body)


def _metadata(value: object) -> object:
    """A hit's or item's metadata as `orjson` writes it: `MetadataJson` (stored JSON, read
    without parsing it) goes in as the JSON it holds."""
    return orjson.Fragment(value.json) if isinstance(value, MetadataJson) else value


class _HitLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def distance(self) -> float: ...
    @property
    def metadata(self) -> object: ...


class _ItemLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def vector(self) -> np.ndarray | None: ...
    @property
    def metadata(self) -> object: ...  # an object, None, or `MetadataJson`


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchReply:
    """`status: ok` reply to a search: hits nearest first; for a multi-vector search,
    `results` holds one `{ids, distances, metadata?}` per query vector, in request order,
    instead of `hits`."""

    reply_to: ReplyTo
    index: str
    hits: Sequence[_HitLike]
    """`lhv_index.Hit`s"""
    include_metadata: bool
    applied_offset: int
    took_ms: float
    request_id: str | None = None
    results: Sequence[Columns] | None = None
    """the hits of each vector of a multi-vector search, as columns (then `hits` is not
    sent)"""
    vectors: Mapping[str, np.ndarray] | None = None
    """include_vectors: the stored vector of each hit's id (a hit whose id is not here,
    deleted between the search and the read of the vectors, gets null)"""
    vector_encoding: Literal["json", "b64"] = "json"
    """how `vectors` are sent: JSON floats (`vector`), or base64 of little-endian float32
    (`vector_b64`)"""

    def _vector(self, id_: str) -> list[float] | str | None:
        assert self.vectors is not None
        vec = self.vectors.get(id_)
        return None if vec is None else encode_vector(vec, self.vector_encoding)

    def _hits(self, hits: Sequence[_HitLike]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"id": h.id, "distance": float(h.distance)} for h in hits]
        if self.include_metadata:
            for entry, h in zip(out, hits, strict=True):
                entry["metadata"] = _metadata(h.metadata)
        if self.vectors is not None:
            for entry, h in zip(out, hits, strict=True):
                entry[vector_field("vector", self.vector_encoding)] = self._vector(h.id)
        return out

    def _columns(self, c: Columns) -> dict[str, Any]:
        out: dict[str, Any] = {"ids": c.ids, "distances": c.distances}
        if self.include_metadata:
            out["metadata"] = None if c.metadata is None else list(map(_metadata, c.metadata))
        if self.vectors is not None:
            out[vector_field("vectors", self.vector_encoding)] = [
                self._vector(id_) for id_ in c.ids
            ]
        return out

    def encode(self) -> bytes:
        fields: dict[str, Any] = {}
        if self.results is None:
            fields["hits"] = self._hits(self.hits)
        else:
            fields["results"] = [self._columns(c) for c in self.results]
        fields["applied_offset"] = self.applied_offset
        return _ok_body(self.reply_to, "search", self.index, fields, self.took_ms, self.request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class GetReply:
    """`status: ok` reply to a get: the live ids asked for, in the order asked."""

    reply_to: ReplyTo
    index: str
    items: Sequence[_ItemLike]
    """`lhv_index.Item`s; `version` is sent when an item has a `clock`"""
    include_vectors: bool
    include_metadata: bool
    vector_encoding: Literal["json", "b64"]
    applied_offset: int
    took_ms: float
    request_id: str | None = None

    def encode(self) -> bytes:
        out = []
        for item in self.items:
            entry: dict[str, Any] = {"id": item.id}
            if self.include_vectors and item.vector is not None:
                field = vector_field("vector", self.vector_encoding)
                entry[field] = encode_vector(item.vector, self.vector_encoding)
            if self.include_metadata:
                entry["metadata"] = _metadata(item.metadata)
            clock = getattr(item, "clock", None)
            if clock is not None:
                entry["version"] = int(clock[0])
            out.append(entry)
        fields = {"items": out, "applied_offset": self.applied_offset}
        return _ok_body(self.reply_to, "get", self.index, fields, self.took_ms, self.request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsReply:
    """`status: ok` reply to stats: `Index.stats()` plus the partition's offsets."""

    reply_to: ReplyTo
    index: str
    stats: Mapping[str, Any]
    """count, deleted, dim, space, engine, params, applied_offset, checkpoint_offset, ..."""
    took_ms: float
    request_id: str | None = None

    def encode(self) -> bytes:
        return _ok_body(
            self.reply_to, "stats", self.index, self.stats, self.took_ms, self.request_id
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DescribeReply:
    """`status: ok` reply to describe: what the name is, from its home's catalog."""

    reply_to: ReplyTo
    index: str
    description: Mapping[str, Any]
    """kind ("index", "sharded", "alias"), shards, and params, target, shard, of"""
    took_ms: float
    request_id: str | None = None

    def encode(self) -> bytes:
        return _ok_body(
            self.reply_to, "describe", self.index, self.description, self.took_ms, self.request_id
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """`status: error` reply to any query; `error.code` comes from the error's class."""

    reply_to: ReplyTo
    index: str
    """"" when the request was too malformed to name one"""
    error: LhvError
    took_ms: float
    op: str | None = None
    applied_offset: int | None = None
    request_id: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "correlation_id": correlation_text(self.reply_to.correlation_id),
            "status": "error",
            "index": self.index,
            "error": self.error.to_wire(),
            "took_ms": _ms(self.took_ms),
        }
        if self.op in QUERY_OPS:
            body["op"] = self.op
        if self.applied_offset is not None:
            body["applied_offset"] = self.applied_offset
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return _dumps(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Acknowledgement of one command record, after it was applied (or rejected)."""

    reply_to: ReplyTo
    offset: int
    """the command record's offset"""
    index: str = ""
    op: str = ""
    request_id: str | None = None
    applied: int = 0
    """ids whose state changed"""
    skipped: int = 0
    """writes that lost last-write-wins (already newer, or a duplicate)"""
    error: LhvError | None = None
    partition: int | None = None
    forwarded: Mapping[str, int] | None = None
    """record key -> offset of each forwarded record made from this one (the home of a
    sharded index or alias acknowledges once the broker took every one)"""

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "correlation_id": correlation_text(self.reply_to.correlation_id),
            "status": "error" if self.error is not None else "ok",
            "op": self.op,
            "index": self.index,
            "request_id": self.request_id,
            "offset": self.offset,
            "applied": self.applied,
            "skipped": self.skipped,
        }
        if self.partition is not None:
            body["partition"] = self.partition
        if self.forwarded is not None and self.error is None:
            body["forwarded"] = dict(self.forwarded)
        if self.error is not None:
            body["error"] = self.error.to_wire()
        return _dumps(body)


def encode_search_reply(
    query: SearchQuery,
    hits: Sequence[Any],
    *,
    applied_offset: int,
    took_ms: float,
    results: Sequence[Columns] | None = None,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """`SearchReply` of a one-vector `query`; `hits` are `lhv_index.Hit`s (id, distance,
    metadata). With `results` (a multi-vector query), those are sent instead of `hits`.
    `vectors`: the hits' stored vectors by id, sent when the query asked for them."""
    return SearchReply(
        reply_to=query.reply_to,
        index=query.index,
        hits=hits,
        results=results,
        vectors=vectors if query.include_vectors else None,
        vector_encoding=query.vector_encoding,
        include_metadata=query.include_metadata,
        applied_offset=applied_offset,
        took_ms=took_ms,
        request_id=query.request_id,
    ).encode()


def encode_search_results(
    query: SearchQuery,
    rows: Sequence[Columns],
    *,
    applied_offset: int,
    took_ms: float,
    vectors: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """`SearchReply` of `query` from the `lhv_index.Columns` of each of its vectors:
    `results` for a multi-vector search, `hits` (of the one row) otherwise; `vectors` as
    `encode_search_reply`."""
    if query.multi:
        return encode_search_reply(
            query,
            (),
            applied_offset=applied_offset,
            took_ms=took_ms,
            results=rows,
            vectors=vectors,
        )
    return encode_search_reply(
        query, rows[0].hits(), applied_offset=applied_offset, took_ms=took_ms, vectors=vectors
    )


def encode_get_reply(
    query: GetQuery, items: Sequence[Any], *, applied_offset: int, took_ms: float
) -> bytes:
    """`GetReply` of `query`; `items` are `lhv_index.Item`s of the live ids asked for."""
    return GetReply(
        reply_to=query.reply_to,
        index=query.index,
        items=items,
        include_vectors=query.include_vectors,
        include_metadata=query.include_metadata,
        vector_encoding=query.vector_encoding,
        applied_offset=applied_offset,
        took_ms=took_ms,
        request_id=query.request_id,
    ).encode()


def encode_stats_reply(query: StatsQuery, stats: Mapping[str, Any], *, took_ms: float) -> bytes:
    """`StatsReply` of `query`."""
    return StatsReply(
        reply_to=query.reply_to,
        index=query.index,
        stats=stats,
        took_ms=took_ms,
        request_id=query.request_id,
    ).encode()


def encode_describe_reply(
    query: DescribeQuery, description: Mapping[str, Any], *, took_ms: float
) -> bytes:
    """`DescribeReply` of `query`."""
    return DescribeReply(
        reply_to=query.reply_to,
        index=query.index,
        description=description,
        took_ms=took_ms,
        request_id=query.request_id,
    ).encode()


def encode_error_reply(
    reply_to: ReplyTo,
    index: str,
    error: LhvError,
    *,
    took_ms: float,
    applied_offset: int | None = None,
    op: str | None = None,
    request_id: str | None = None,
) -> bytes:
    """`ErrorReply` to a query (decoded or not)."""
    return ErrorReply(
        reply_to=reply_to,
        index=index,
        error=error,
        took_ms=took_ms,
        op=op,
        applied_offset=applied_offset,
        request_id=request_id,
    ).encode()


def encode_ack(outcome: Any) -> bytes:
    """The `Ack` of one command record; `outcome` is a `worker.service.apply.Outcome`.

    Reads `reply_to`, `offset`, `index`, `op`, `request_id`, `applied`, `skipped`,
    `error` and `forwarded` from it.
    """
    return Ack(
        reply_to=outcome.reply_to,
        offset=outcome.offset,
        index=outcome.index,
        op=outcome.op,
        request_id=outcome.request_id,
        applied=outcome.applied,
        skipped=outcome.skipped,
        error=outcome.error,
        forwarded=getattr(outcome, "forwarded", None),
    ).encode()
