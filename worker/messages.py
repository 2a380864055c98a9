"""Wire messages: decoded once, at the edge, into typed values; replies encode themselves.

bytes -> orjson -> JSON Schema (the files in `schemas/`, compiled once with fastjsonschema)
-> limits -> frozen dataclass. Past `decode_command` / `decode_query` no code touches a raw
dict. Every failure is an `InvalidRequest` (wire code `invalid_request`) whose message
names what is wrong.

Vectors: the schemas say "array of numbers" for `vector`; at run time that one check is
done by numpy (`np.asarray(..., float32)` on a list of numbers, plus a finiteness check)
instead of per element in the schema validator, which costs about as much as adding the
vector to the index. The runtime validator is the published schema with that one
subschema relaxed to "array"; everything else is checked as published.

Conventions: `deadline_ms` is absolute Unix time in milliseconds. A correlation id is
opaque bytes on the wire (header `kafka_correlationId`); in reply bodies it is the UTF-8
text when the bytes are UTF-8, else their hex.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias

import fastjsonschema
import numpy as np
import orjson

from lhv_index.errors import InvalidRequest, LhvError

__all__ = [
    "COMMAND_OPS",
    "QUERY_OPS",
    "AddCommand",
    "AddItem",
    "Command",
    "CreateCommand",
    "DeleteCommand",
    "DropCommand",
    "GetQuery",
    "ImportCommand",
    "MergeCommand",
    "MergeDoneCommand",
    "MergeInCommand",
    "MessageLimits",
    "Query",
    "ReplyTo",
    "SearchQuery",
    "StatsQuery",
    "correlation_text",
    "decode_command",
    "decode_query",
    "decode_vector_b64",
    "encode_ack",
    "encode_error_reply",
    "encode_get_reply",
    "encode_search_reply",
    "encode_stats_reply",
    "load_schema",
    "reply_to_from_headers",
]

COMMAND_OPS = ("create", "drop", "add", "delete", "merge", "import", "merge_in", "merge_done")
QUERY_OPS = ("search", "get", "stats")


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageLimits:
    """Limits on one wire message, checked before anything is applied."""

    max_message_bytes: int = 8 * 1024 * 1024
    max_items: int = 10_000
    max_dim: int = 4096
    max_metadata_bytes: int = 65_536
    max_id_bytes: int = 512
    max_k: int = 10_000
    max_ids: int = 10_000


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a reply or ack goes (Spring ReplyingKafkaTemplate headers)."""

    topic: str
    partition: int | None
    correlation_id: bytes


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Base:
    index: str
    request_id: str | None = None
    reply_to: ReplyTo | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateCommand(_Base):
    op = "create"
    params: dict[str, Any]
    """dim, space, engine and engine parameters, as `IndexParams.from_dict` takes them"""


@dataclass(frozen=True, slots=True, kw_only=True)
class DropCommand(_Base):
    op = "drop"


@dataclass(frozen=True, slots=True)
class AddItem:
    id: str
    vector: np.ndarray
    metadata: dict[str, Any] | None
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AddCommand(_Base):
    op = "add"
    items: list[AddItem]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteCommand(_Base):
    op = "delete"
    ids: list[str]
    version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeCommand(_Base):
    op = "merge"
    dest: str
    clear_source: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportCommand(_Base):
    op = "import"
    source: str
    ids_source: str | None = None
    metadata_source: str | None = None
    version: int = 0
    chunk_items: int = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeInCommand(_Base):
    """Merge step on the destination's partition (`index` is the destination)."""

    op = "merge_in"
    source_index: str
    export: str
    merge_id: str
    origin_partition: int = 0
    origin_offset: int = 0
    clear_source: bool = False
    reply: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeDoneCommand(_Base):
    """Merge step back on the source's partition (`index` is the source)."""

    op = "merge_done"
    dest: str
    export: str
    merge_id: str
    applied: int = 0
    clear_source: bool = False
    error: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None


Command: TypeAlias = (
    CreateCommand
    | DropCommand
    | AddCommand
    | DeleteCommand
    | MergeCommand
    | ImportCommand
    | MergeInCommand
    | MergeDoneCommand
)

# -- queries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _QueryBase:
    index: str
    reply_to: ReplyTo
    request_id: str | None = None
    min_offset: int | None = None
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchQuery(_QueryBase):
    vectors: np.ndarray
    """shape (1, dim), float32"""
    k: int = 10
    ef: int | None = None
    filter: dict[str, Any] | None = None
    include_metadata: bool = False
    include_vectors: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GetQuery(_QueryBase):
    ids: list[str]
    include_vectors: bool = True
    include_metadata: bool = True
    vector_encoding: str = "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsQuery(_QueryBase):
    pass


Query: TypeAlias = SearchQuery | GetQuery | StatsQuery

# -- schemas ------------------------------------------------------------------------------


def _schema_dir() -> Any:
    """`schemas/` of a source checkout, else the copy installed as package `lhv_schemas`."""
    here = Path(__file__).resolve().parent.parent / "schemas"
    if (here / "add.schema.json").is_file():
        return here
    return resources.files("lhv_schemas")


def load_schema(name: str) -> dict[str, Any]:
    """One published schema, e.g. `load_schema("add")`."""
    text = _schema_dir().joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def _runtime(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with per-element checks of `vector` arrays left to numpy."""
    out = copy.deepcopy(schema)

    def relax(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and isinstance(props.get("vector"), dict):
                props["vector"] = {"type": "array", "minItems": 1}
            for value in node.values():
                relax(value)
        elif isinstance(node, list):
            for value in node:
                relax(value)

    relax(out)
    return out


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    op: fastjsonschema.compile(_runtime(load_schema(op))) for op in (*COMMAND_OPS, *QUERY_OPS)
}


def _check(op: str, body: dict[str, Any]) -> None:
    try:
        _VALIDATORS[op](body)
    except fastjsonschema.JsonSchemaValueException as exc:
        where = exc.path if isinstance(exc.path, str) else str(exc.name)
        raise InvalidRequest(f"{op}: {exc.message} (at {where})") from None


# -- decoding -----------------------------------------------------------------------------


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def reply_to_from_headers(headers: Sequence[tuple[str, bytes]]) -> ReplyTo | None:
    """Spring's `kafka_replyTopic`, `kafka_replyPartition` and `kafka_correlationId`.

    Works whatever the body is, so that a malformed request can still get its error reply.
    `kafka_replyPartition` is a 4-byte big-endian int (Spring) or ASCII decimal.

    Raises:
        InvalidRequest: a reply topic without a correlation id, or an unreadable partition.
    """
    topic = _header(headers, "kafka_replyTopic")
    if topic is None:
        return None
    cid = _header(headers, "kafka_correlationId")
    if not cid:
        raise InvalidRequest("kafka_replyTopic without kafka_correlationId")
    try:
        topic_s = topic.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("kafka_replyTopic is not UTF-8") from None
    raw_part = _header(headers, "kafka_replyPartition")
    partition: int | None = None
    if raw_part is not None:
        if len(raw_part) == 4 and not raw_part.isdigit():
            partition = int.from_bytes(raw_part, "big", signed=True)
        else:
            try:
                partition = int(raw_part.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise InvalidRequest("kafka_replyPartition is not a partition number") from None
        if partition < 0:
            raise InvalidRequest("kafka_replyPartition is negative")
    return ReplyTo(topic_s, partition, bytes(cid))


def _parse(key: bytes | None, value: bytes | None, limits: MessageLimits) -> dict[str, Any]:
    if value is None or not value:
        raise InvalidRequest("empty message")
    if len(value) > limits.max_message_bytes:
        raise InvalidRequest(
            f"message of {len(value)} bytes is over the limit of {limits.max_message_bytes}"
        )
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"a message must be a JSON object, not {type(body).__name__}")
    if key is None:
        raise InvalidRequest("the record has no key: the key must be the index name")
    try:
        key_s = key.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the record key is not UTF-8") from None
    if "index" in body and body["index"] != key_s:
        raise InvalidRequest(f"index {body['index']!r} differs from the record key {key_s!r}")
    return body


def decode_vector_b64(text: str, *, max_dim: int) -> np.ndarray:
    """base64 of little-endian float32 -> a float32 vector."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("vector_b64 is not valid base64") from None
    if not raw or len(raw) % 4:
        raise InvalidRequest(f"vector_b64 holds {len(raw)} bytes: not a whole float32 vector")
    if len(raw) // 4 > max_dim:
        raise InvalidRequest(f"vector of {len(raw) // 4} dimensions is over the limit {max_dim}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _vector(obj: Mapping[str, Any], limits: MessageLimits, where: str) -> np.ndarray:
    if "vector_b64" in obj:
        vec = decode_vector_b64(obj["vector_b64"], max_dim=limits.max_dim)
    else:
        values = obj["vector"]
        if len(values) > limits.max_dim:
            raise InvalidRequest(f"{where}: {len(values)} dimensions is over the limit")
        try:
            vec = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{where}: vector must be an array of numbers") from None
        if vec.ndim != 1 or any(isinstance(v, bool) for v in values[:1]):
            raise InvalidRequest(f"{where}: vector must be a flat array of numbers")
    if not np.isfinite(vec).all():
        raise InvalidRequest(f"{where}: vector has NaN or infinite values")
    return vec


def _metadata(meta: Any, limits: MessageLimits, where: str) -> dict[str, Any] | None:
    if meta is None:
        return None
    if len(orjson.dumps(meta)) > limits.max_metadata_bytes:
        raise InvalidRequest(f"{where}: metadata over {limits.max_metadata_bytes} bytes")
    return dict(meta)


def _check_id(id_: str, limits: MessageLimits, where: str) -> str:
    if len(id_.encode("utf-8")) > limits.max_id_bytes:
        raise InvalidRequest(f"{where}: id over {limits.max_id_bytes} bytes")
    return id_


def decode_command(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    *,
    limits: MessageLimits,
) -> Command:
    """Decode and validate one command record.

    Raises:
        InvalidRequest: anything malformed, with a message naming it (and `.item`).
    """
    body = _parse(key, value, limits)
    op = body.get("op")
    if op not in COMMAND_OPS:
        raise InvalidRequest(f"unknown op {op!r}; commands are {', '.join(COMMAND_OPS)}")
    _check(op, body)
    common = {
        "index": body["index"],
        "request_id": body.get("request_id"),
        "reply_to": reply_to_from_headers(headers),
    }
    if op == "add":
        raw_items = body["items"]
        if len(raw_items) > limits.max_items:
            raise InvalidRequest(f"{len(raw_items)} items is over the limit {limits.max_items}")
        items = []
        for pos, raw in enumerate(raw_items):
            where = f"item {pos} (id {raw['id']!r})"
            try:
                items.append(
                    AddItem(
                        _check_id(raw["id"], limits, where),
                        _vector(raw, limits, where),
                        _metadata(raw.get("metadata"), limits, where),
                        int(raw.get("version", 0)),
                    )
                )
            except LhvError as exc:
                exc.item = pos
                raise
        return AddCommand(items=items, **common)
    if op == "delete":
        ids = body["ids"]
        if len(ids) > limits.max_ids:
            raise InvalidRequest(f"{len(ids)} ids is over the limit {limits.max_ids}")
        for pos, id_ in enumerate(ids):
            _check_id(id_, limits, f"id {pos}")
        return DeleteCommand(ids=list(ids), version=int(body.get("version", 0)), **common)
    if op == "create":
        params = {k: v for k, v in body.items() if k not in ("op", "index", "request_id")}
        if params["dim"] > limits.max_dim:
            raise InvalidRequest(f"dim {params['dim']} is over the limit {limits.max_dim}")
        return CreateCommand(params=params, **common)
    if op == "drop":
        return DropCommand(**common)
    if op == "merge":
        if body["dest"] == body["index"]:
            raise InvalidRequest("an index cannot be merged into itself")
        return MergeCommand(
            dest=body["dest"], clear_source=bool(body.get("clear_source")), **common
        )
    if op == "import":
        return ImportCommand(
            source=body["source"],
            ids_source=body.get("ids_source"),
            metadata_source=body.get("metadata_source"),
            version=int(body.get("version", 0)),
            chunk_items=int(body.get("chunk_items", 10_000)),
            **common,
        )
    fields = {k: v for k, v in body.items() if k not in ("op", "index", "request_id")}
    if op == "merge_in":
        return MergeInCommand(**fields, **common)
    return MergeDoneCommand(**fields, **common)


def decode_query(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    *,
    limits: MessageLimits,
) -> Query:
    """Decode and validate one query record (reply headers required).

    Raises:
        InvalidRequest: anything malformed, or no reply headers (nowhere to answer).
    """
    reply_to = reply_to_from_headers(headers)
    if reply_to is None:
        raise InvalidRequest("a query needs kafka_replyTopic and kafka_correlationId headers")
    body = _parse(key, value, limits)
    op = body.setdefault("op", "search")
    if op not in QUERY_OPS:
        raise InvalidRequest(f"unknown op {op!r}; queries are {', '.join(QUERY_OPS)}")
    _check(op, body)
    common: dict[str, Any] = {
        "index": body["index"],
        "reply_to": reply_to,
        "request_id": body.get("request_id"),
        "min_offset": body.get("min_offset"),
        "deadline_ms": body.get("deadline_ms"),
    }
    if op == "search":
        k = int(body.get("k", 10))
        if k > limits.max_k:
            raise InvalidRequest(f"k {k} is over the limit {limits.max_k}")
        return SearchQuery(
            vectors=_vector(body, limits, "query").reshape(1, -1),
            k=k,
            ef=body.get("ef"),
            filter=body.get("filter") or None,
            include_metadata=bool(body.get("include_metadata", False)),
            include_vectors=bool(body.get("include_vectors", False)),
            **common,
        )
    if op == "get":
        ids = body["ids"]
        if len(ids) > limits.max_ids:
            raise InvalidRequest(f"{len(ids)} ids is over the limit {limits.max_ids}")
        return GetQuery(
            ids=list(ids),
            include_vectors=bool(body.get("include_vectors", True)),
            include_metadata=bool(body.get("include_metadata", True)),
            vector_encoding=str(body.get("vector_encoding", "json")),
            **common,
        )
    return StatsQuery(**common)


# -- encoding -----------------------------------------------------------------------------


def correlation_text(correlation_id: bytes) -> str:
    """A correlation id as it appears in reply bodies: UTF-8 text, else hex."""
    try:
        return correlation_id.decode("utf-8")
    except UnicodeDecodeError:
        return correlation_id.hex()


def _dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_search_reply(
    query: SearchQuery, hits: Sequence[Any], *, applied_offset: int, took_ms: float
) -> bytes:
    """`hits` are `lhv_index.Hit`s (id, distance, metadata)."""
    out_hits = []
    for hit in hits:
        h: dict[str, Any] = {"id": hit.id, "distance": float(hit.distance)}
        if query.include_metadata:
            h["metadata"] = hit.metadata
        out_hits.append(h)
    return _dumps(
        {
            "correlation_id": correlation_text(query.reply_to.correlation_id),
            "status": "ok",
            "op": "search",
            "index": query.index,
            "hits": out_hits,
            "applied_offset": applied_offset,
            "took_ms": round(took_ms, 3),
        }
    )


def encode_get_reply(
    query: GetQuery, items: Sequence[Any], *, applied_offset: int, took_ms: float
) -> bytes:
    """`items` are `lhv_index.Item`s of the live ids asked for."""
    out = []
    for item in items:
        entry: dict[str, Any] = {"id": item.id}
        if query.include_vectors and item.vector is not None:
            vec = np.asarray(item.vector, dtype="<f4")
            if query.vector_encoding == "b64":
                entry["vector_b64"] = base64.b64encode(vec.tobytes()).decode("ascii")
            else:
                entry["vector"] = vec.tolist()
        if query.include_metadata:
            entry["metadata"] = item.metadata
        clock = getattr(item, "clock", None)
        if clock is not None:
            entry["version"] = int(clock[0])
        out.append(entry)
    return _dumps(
        {
            "correlation_id": correlation_text(query.reply_to.correlation_id),
            "status": "ok",
            "op": "get",
            "index": query.index,
            "items": out,
            "applied_offset": applied_offset,
            "took_ms": round(took_ms, 3),
        }
    )


def encode_stats_reply(query: StatsQuery, stats: Mapping[str, Any], *, took_ms: float) -> bytes:
    body: dict[str, Any] = {
        "correlation_id": correlation_text(query.reply_to.correlation_id),
        "status": "ok",
        "op": "stats",
        "index": query.index,
    }
    body.update(stats)
    body["took_ms"] = round(took_ms, 3)
    return _dumps(body)


def encode_error_reply(
    reply_to: ReplyTo,
    index: str,
    error: LhvError,
    *,
    took_ms: float,
    applied_offset: int | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "correlation_id": correlation_text(reply_to.correlation_id),
        "status": "error",
        "index": index,
        "error": error.to_wire(),
        "took_ms": round(took_ms, 3),
    }
    if applied_offset is not None:
        body["applied_offset"] = applied_offset
    return _dumps(body)


def encode_ack(outcome: Any) -> bytes:
    """The acknowledgement of one command record (`worker.apply.Outcome`)."""
    reply_to: ReplyTo = outcome.reply_to
    body: dict[str, Any] = {
        "correlation_id": correlation_text(reply_to.correlation_id),
        "status": "error" if outcome.error is not None else "ok",
        "op": outcome.op,
        "index": outcome.index,
        "request_id": outcome.request_id,
        "offset": outcome.offset,
        "applied": outcome.applied,
        "skipped": outcome.skipped,
    }
    if outcome.error is not None:
        body["error"] = outcome.error.to_wire()
    return _dumps(body)
