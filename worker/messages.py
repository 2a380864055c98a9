"""Wire messages: decoded once, at the edge, into typed values; replies encode themselves.

bytes -> orjson -> JSON Schema (the files in `schemas/`, compiled once with fastjsonschema)
-> limits -> frozen dataclass. Past `decode_command` / `decode_query` no code touches a raw
dict. Every failure is an `InvalidRequest` (wire code `invalid_request`) whose message
names what is wrong and where; when one item of an `add` (or one id of a `delete`/`get`)
is to blame, the error's `item` is its position.

Runtime schema vs published schema. The worker compiles the published schemas with three
subschemas of per-item vector data relaxed, because checking them per element in the
validator costs a large share of adding the vectors to the index (about 8 ms per
1000 x 128 `add`, against 1 ms for the rest). The same rules are enforced in code, at least
as strictly:

- `vector` ("array of numbers, at least one"): the rows are converted by numpy in one call
  and rejected unless numpy infers a numeric dtype (strings, nulls, nested arrays fail);
  booleans, which numpy would read as 0/1, are looked for in the rows holding an exact 0.0
  or 1.0 (JSON Schema does not count `true` as a number).
- `vector_b64` (pattern of the base64 alphabet): decoded with `binascii.a2b_base64` in
  strict mode, which refuses any character outside the alphabet and misplaced padding.
- the item `oneOf` (exactly one of `vector` and `vector_b64`; for a search, of `vector`,
  `vector_b64`, `vectors` and `vectors_b64`): checked in code, with a message saying which.

Limits (`MessageLimits`) are configurable, so the schemas carry no upper bounds that are
limits (items per command, ids, dim, id length, k); their descriptions give the defaults.
Vectors must also be finite: NaN and infinities are rejected here (a JSON number too large
for float32 becomes infinite and is rejected too); the index checks them again with the
dimension, which messages do not know.

Before the schema or anything else walks a body, its nesting is checked against
`max_json_depth` without recursion (`_check_depth`): a deep `filter` or `metadata` would
otherwise fail later, in orjson (which writes at most 254 levels) or in recursive code,
as an error that is not the request's. Any `RecursionError` or `UnicodeError` that still
escapes decoding is the request's fault and becomes `InvalidRequest` too. Error messages
name a request's values cut short, never in full.

Conventions:

- `deadline_ms` is absolute Unix time in milliseconds (UTC epoch), as the requester's
  clock sees it; a request not answered by then gets `deadline_exceeded`.
- A correlation id is opaque bytes on the wire (header `kafka_correlationId`, and the key
  of the reply record); in reply and ack bodies it is the UTF-8 text when the bytes are
  valid UTF-8, else their lowercase hex. Requesters match replies on the header, never on
  the body field.
- Integers the schema calls `integer` may arrive as integral floats (`10.0`, as JSON
  Schema allows); they are decoded to `int`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import importlib.util
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeAlias

import fastjsonschema
import numpy as np
import orjson

from lhv_index import Columns
from lhv_index.errors import InvalidRequest, LhvError, error_for_code

__all__ = [
    "COMMAND_OPS",
    "QUERY_OPS",
    "SCHEMA_NAMES",
    "Ack",
    "AddCommand",
    "AddItem",
    "Command",
    "CreateCommand",
    "DeleteCommand",
    "DropCommand",
    "ErrorInfo",
    "ErrorReply",
    "GetQuery",
    "GetReply",
    "ImportCommand",
    "MergeCommand",
    "MergeDoneCommand",
    "MergeInCommand",
    "MessageLimits",
    "Query",
    "ReplyTo",
    "SearchQuery",
    "SearchReply",
    "StatsQuery",
    "StatsReply",
    "check_headers",
    "correlation_text",
    "decode_command",
    "decode_query",
    "decode_vector_b64",
    "encode_ack",
    "encode_error_reply",
    "encode_get_reply",
    "encode_search_reply",
    "encode_search_results",
    "encode_stats_reply",
    "load_schema",
    "reply_to_from_headers",
]

COMMAND_OPS = ("create", "drop", "add", "delete", "merge", "import", "merge_in", "merge_done")
QUERY_OPS = ("search", "get", "stats")
#: every published schema file, `<name>.schema.json`
SCHEMA_NAMES = (*COMMAND_OPS, *QUERY_OPS, "command", "query", "reply", "ack", "dlq_headers")

_INT64_MAX = 2**63 - 1
#: orjson refuses to write values nested deeper than this (and to read past 1024)
_ORJSON_MAX_DEPTH = 254


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageLimits:
    """Limits on one wire message, checked before anything is applied."""

    max_message_bytes: int = 8 * 1024 * 1024
    """size of the record value"""
    max_items: int = 10_000
    """items of one `add`"""
    max_dim: int = 4096
    """length of one vector, and `dim` of `create`"""
    max_metadata_bytes: int = 65_536
    """one item's metadata, as compact JSON"""
    max_id_bytes: int = 512
    """one id, UTF-8"""
    max_k: int = 10_000
    """`k` of a search"""
    max_queries: int = 1_024
    """vectors of one multi-vector search (`vectors` / `vectors_b64`)"""
    max_ids: int = 10_000
    """ids of one `delete` or `get`"""
    max_get_vectors: int = 1_000
    """ids of one `get` that asks for vectors (`include_vectors`, the default): bounds
    the vectors one reply materializes (at most this many times `max_dim` floats)"""
    max_json_depth: int = 32
    """nesting of a message body: objects and arrays inside each other, the body itself
    counting as 1 (an `add` item's `metadata` may then be 29 levels deep counting itself,
    a search `filter` 31)"""
    max_filter_keys: int = 64
    """fields of one search `filter`"""
    max_filter_bytes: int = 16_384
    """one search `filter`, as compact JSON"""
    max_headers: int = 64
    """headers of one record"""
    max_header_bytes: int = 65_536
    """keys and values of one record's headers, together"""
    max_correlation_id_bytes: int = 1024
    """`kafka_correlationId`: it comes back in every reply and ack, twice"""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"MessageLimits.{f.name} must be an integer of at least 1")
        if self.max_json_depth > _ORJSON_MAX_DEPTH:
            raise ValueError(
                f"MessageLimits.max_json_depth must be at most {_ORJSON_MAX_DEPTH} "
                "(orjson's own limit when it writes JSON)"
            )


_DEFAULT_LIMITS = MessageLimits()


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a reply or ack goes (Spring `ReplyingKafkaTemplate` headers)."""

    topic: str
    partition: int | None
    """None: the producer's partitioner picks (the reply key is the correlation id)"""
    correlation_id: bytes
    """opaque; sent back unchanged as header and key"""

    def to_wire(self) -> dict[str, Any]:
        """The JSON form carried by the internal merge commands."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "correlation_id_b64": base64.b64encode(self.correlation_id).decode("ascii"),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ReplyTo:
        """Inverse of `to_wire` (the schema has checked the shape)."""
        part = obj.get("partition")
        return cls(
            obj["topic"],
            None if part is None else int(part),
            base64.b64decode(obj["correlation_id_b64"]),
        )


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


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Base:
    index: str
    """the index the command is about; equals the record key"""
    request_id: str | None = None
    """echoed in the ack"""
    reply_to: ReplyTo | None = None
    """where the ack goes; None: no ack"""


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateCommand(_Base):
    op: ClassVar[str] = "create"
    params: dict[str, Any]
    """dim, space, engine and engine parameters, as `IndexParams.from_dict` takes them"""


@dataclass(frozen=True, slots=True, kw_only=True)
class DropCommand(_Base):
    op: ClassVar[str] = "drop"


@dataclass(frozen=True, slots=True)
class AddItem:
    id: str
    vector: np.ndarray
    """float32, 1-D (its length is checked against the index's dim by the index)"""
    metadata: dict[str, Any] | None
    """None keeps the stored metadata, {} clears it, an object replaces it"""
    version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AddCommand(_Base):
    op: ClassVar[str] = "add"
    items: list[AddItem]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteCommand(_Base):
    op: ClassVar[str] = "delete"
    ids: list[str]
    version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeCommand(_Base):
    """Copy the live items of `index` into `dest` (DESIGN section 6)."""

    op: ClassVar[str] = "merge"
    dest: str
    clear_source: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportCommand(_Base):
    """Bulk load of `index` from S3 objects (see `schemas/import.schema.json`).

    `source` is `s3://bucket/key` of a `.npy` (vectors only), a `.npz` (arrays `vectors`
    and optionally `ids`) or an LHV1 snapshot (`.lhv`: ids, vectors, metadata, versions);
    `format` overrides the guess from the extension. `ids_source` (text, one UTF-8 id per
    line, or a `.npy` of strings) and `metadata_source` (JSON Lines, one object or null per
    row) supply what the source lacks; without ids, an item's id is its row number in
    decimal. Every item gets `version` (None: 0, or an LHV1 source's own versions), and
    items are applied `chunk_items` at a time, last-write-wins like `add`.
    """

    op: ClassVar[str] = "import"
    source: str
    format: Literal["npy", "npz", "lhv"] | None = None
    ids_source: str | None = None
    metadata_source: str | None = None
    version: int | None = None
    """None: 0, or for an LHV1 source the versions it holds"""
    chunk_items: int = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeInCommand(_Base):
    """Merge step on the destination's partition (`index` is the destination).

    Produced by the source's owner after it wrote the export object `export` (a key under
    the worker's own bucket and prefix): apply the exported items not live in `index`, then
    produce `merge_done` back to `source_index`. `origin_partition`/`origin_offset` locate
    the `merge` record, `reply` is where the merge's requester wants its ack.
    """

    op: ClassVar[str] = "merge_in"
    source_index: str
    export: str
    merge_id: str
    origin_partition: int
    origin_offset: int
    clear_source: bool = False
    reply: ReplyTo | None = None

    def encode(self) -> tuple[bytes, bytes]:
        """(key, value) of the record to produce to the commands topic."""
        body: dict[str, Any] = {
            "op": self.op,
            "index": self.index,
            "source_index": self.source_index,
            "export": self.export,
            "merge_id": self.merge_id,
            "origin_partition": self.origin_partition,
            "origin_offset": self.origin_offset,
            "clear_source": self.clear_source,
        }
        if self.request_id is not None:
            body["request_id"] = self.request_id
        if self.reply is not None:
            body["reply"] = self.reply.to_wire()
        return self.index.encode("utf-8"), orjson.dumps(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeDoneCommand(_Base):
    """Merge step back on the source's partition (`index` is the source).

    `applied` items of `export` went into `dest` (or `error` says why none did); with
    `clear_source` the source deletes exactly the exported items, then acks to `reply`.
    """

    op: ClassVar[str] = "merge_done"
    dest: str
    export: str
    merge_id: str
    applied: int = 0
    skipped: int = 0
    clear_source: bool = False
    error: ErrorInfo | None = None
    reply: ReplyTo | None = None

    def encode(self) -> tuple[bytes, bytes]:
        """(key, value) of the record to produce to the commands topic."""
        body: dict[str, Any] = {
            "op": self.op,
            "index": self.index,
            "dest": self.dest,
            "export": self.export,
            "merge_id": self.merge_id,
            "applied": self.applied,
            "skipped": self.skipped,
            "clear_source": self.clear_source,
        }
        if self.request_id is not None:
            body["request_id"] = self.request_id
        if self.error is not None:
            body["error"] = self.error.to_wire()
        if self.reply is not None:
            body["reply"] = self.reply.to_wire()
        return self.index.encode("utf-8"), orjson.dumps(body)


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
    """answer only once this command offset of the index's partition is applied"""
    deadline_ms: int | None = None
    """absolute Unix time in milliseconds"""


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


Query: TypeAlias = SearchQuery | GetQuery | StatsQuery

# -- schemas ------------------------------------------------------------------------------


def _schema_dir() -> Any:
    """Where the schema files are: the installed package `lhv_schemas`, else `schemas/`
    of the source checkout this module sits in.

    `lhv_schemas` is a namespace package (data only). Under an editable install its path
    also holds the installer's path hook, which `importlib.resources.files` cannot read on
    Python 3.11, so the real directories on its path are tried next.
    """
    try:
        installed = resources.files("lhv_schemas")
        if installed.joinpath("add.schema.json").is_file():
            return installed
    except (ImportError, OSError, TypeError, ValueError):
        pass
    try:
        spec = importlib.util.find_spec("lhv_schemas")
    except (ImportError, ValueError):
        spec = None
    for entry in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(entry) / "add.schema.json").is_file():
            return Path(entry)
    return Path(__file__).resolve().parent.parent / "schemas"


def load_schema(name: str) -> dict[str, Any]:
    """One published schema, e.g. `load_schema("add")`."""
    text = _schema_dir().joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def _runtime(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with the per-element vector checks left to `decode_*` (module doc)."""
    out = copy.deepcopy(schema)

    def relax(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and "vector_b64" in props:
                props["vector"] = {"type": "array", "minItems": 1}
                props["vector_b64"] = {"type": "string"}
                if "vectors" in props:
                    props["vectors"] = {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "array", "minItems": 1},
                    }
                    props["vectors_b64"] = {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string"},
                    }
                if node.get("oneOf") in _EXACTLY_ONE_VECTOR:
                    del node["oneOf"]
            for value in node.values():
                relax(value)
        elif isinstance(node, list):
            for value in node:
                relax(value)

    relax(out)
    return out


_EXACTLY_ONE_VECTOR = (
    [{"required": ["vector"]}, {"required": ["vector_b64"]}],
    [{"required": [name]} for name in ("vector", "vector_b64", "vectors", "vectors_b64")],
)

_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    op: fastjsonschema.compile(_runtime(load_schema(op)), use_default=False)
    for op in (*COMMAND_OPS, *QUERY_OPS)
}
"""runtime validators by op; `use_default=False`: decoding never injects schema defaults"""


def _check(op: str, body: dict[str, Any]) -> None:
    try:
        _VALIDATORS[op](body)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise _schema_error(op, exc) from None


def _schema_error(op: str, exc: fastjsonschema.JsonSchemaValueException) -> InvalidRequest:
    """`data.items[3].id must be ...` -> `add: items[3].id must be ...` with item=3."""
    name = str(exc.name or "data")
    label = name[5:] if name.startswith("data.") else "message"
    path = exc.path if isinstance(exc.path, list) else []
    item = None
    if len(path) >= 3 and path[1] in ("items", "ids") and str(path[2]).isdigit():
        item = int(path[2])
    if exc.rule == "additionalProperties" and isinstance(exc.value, dict):
        allowed = (exc.definition or {}).get("properties", {})
        unknown = _brief(
            ", ".join(repr(k) for k in sorted(exc.value) if k not in allowed), 200, quote=False
        )
        return InvalidRequest(f"{op}: unknown field(s) {unknown} in {label}", item=item)
    message = str(exc.message)
    if message.startswith(name):
        message = label + message[len(name) :]
    return InvalidRequest(f"{op}: {message}", item=item)


# -- decoding -----------------------------------------------------------------------------


@contextmanager
def _request_faults() -> Iterator[None]:
    """Errors that only the request can cause, wherever decoding meets them, as
    `InvalidRequest` (the checks before them should have caught each; this is the net)."""
    try:
        yield
    except RecursionError:
        raise InvalidRequest("message is nested too deeply to decode (max_json_depth)") from None
    except UnicodeError:
        raise InvalidRequest("message holds text that is not valid UTF-8") from None


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    """The last header named `name` (Kafka's `lastHeader`, as Spring reads it)."""
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def check_headers(headers: Sequence[tuple[str, bytes | None]], limits: MessageLimits) -> None:
    """Refuse a record whose headers are over the limits (count, total bytes, and the
    length of `kafka_correlationId`).

    Raises:
        InvalidRequest: naming the limit and its setting.
    """
    if len(headers) > limits.max_headers:
        raise InvalidRequest(
            f"{len(headers)} record headers are over the limit of {limits.max_headers}"
        )
    cid = _header(headers, "kafka_correlationId")
    if cid is not None and len(cid) > limits.max_correlation_id_bytes:
        raise InvalidRequest(
            f"kafka_correlationId of {len(cid)} bytes is over the limit of "
            f"{limits.max_correlation_id_bytes}"
        )
    total = 0
    for key, value in headers:
        total += len(key) + (len(value) if value is not None else 0)
    if total > limits.max_header_bytes:
        raise InvalidRequest(
            f"record headers of {total} bytes are over the limit of {limits.max_header_bytes}"
        )


def reply_to_from_headers(
    headers: Sequence[tuple[str, bytes]], *, limits: MessageLimits | None = None
) -> ReplyTo | None:
    """Spring's `kafka_replyTopic`, `kafka_replyPartition` and `kafka_correlationId`.

    Reads headers only, so it works whatever the body is and a malformed request can still
    get its error reply. `kafka_replyPartition` is a 4-byte big-endian int (what Spring
    sends) or ASCII decimal digits. With `limits` (the default limits when not given),
    headers over them (`check_headers`) get no reply: an answer carrying them could not
    be sent.

    Returns:
        None when there is no `kafka_replyTopic` (nobody wants an answer).

    Raises:
        InvalidRequest: an empty or non-UTF-8 reply topic, a reply topic without a
            correlation id, an unreadable or negative partition, or headers over the
            limits.
    """
    check_headers(headers, limits or _DEFAULT_LIMITS)
    topic = _header(headers, "kafka_replyTopic")
    if topic is None:
        return None
    try:
        topic_s = bytes(topic).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("kafka_replyTopic is not UTF-8") from None
    if not topic_s:
        raise InvalidRequest("kafka_replyTopic is empty")
    cid = _header(headers, "kafka_correlationId")
    if not cid:
        raise InvalidRequest("kafka_replyTopic without kafka_correlationId")
    raw_part = _header(headers, "kafka_replyPartition")
    partition: int | None = None
    if raw_part is not None:
        raw_part = bytes(raw_part)
        if raw_part.isdigit():  # bytes.isdigit: ASCII digits only
            partition = int(raw_part)
        elif len(raw_part) == 4:
            partition = int.from_bytes(raw_part, "big", signed=True)
        else:
            raise InvalidRequest("kafka_replyPartition is not a partition number")
        if not 0 <= partition <= 2**31 - 1:
            raise InvalidRequest(f"kafka_replyPartition {partition} is not a partition number")
    return ReplyTo(topic_s, partition, bytes(cid))


def _parse(value: bytes | None, limits: MessageLimits) -> dict[str, Any]:
    """The body as a dict, its nesting checked before anything else walks it."""
    if not value:
        raise InvalidRequest("empty message: a command or query is a JSON object")
    if len(value) > limits.max_message_bytes:
        raise InvalidRequest(
            f"message of {len(value)} bytes is over the limit of {limits.max_message_bytes}"
        )
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise InvalidRequest(
                f"message is nested deeper than the limit of {limits.max_json_depth} levels "
                "(max_json_depth)"
            ) from None
        raise InvalidRequest(f"message is not valid JSON: {_brief(str(exc), 200)}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"a message must be a JSON object, not {_json_type(body)}")
    _check_depth(body, limits.max_json_depth)
    return body


def _check_depth(body: dict[str, Any], max_depth: int) -> None:
    """Refuse a body with objects and arrays nested deeper than `max_depth` (the body is
    level 1), naming the field where it happens.

    Iterative, level by level: no recursion, whatever the input. Long flat arrays (vectors,
    ids) are passed over with one C-level scan of their element types.
    """
    level: list[Any] = [body]
    depth = 1
    while level:
        if depth > max_depth:
            where = _deep_path(body, max_depth)
            raise InvalidRequest(
                f"{where} is nested deeper than the limit of {max_depth} levels (max_json_depth)"
            )
        below: list[Any] = []
        for node in level:
            values = node.values() if type(node) is dict else node
            if len(values) > 8:
                kinds = set(map(type, values))
                if dict not in kinds and list not in kinds:
                    continue
            below.extend([v for v in values if type(v) is dict or type(v) is list])
        level = below
        depth += 1


def _deep_path(body: dict[str, Any], max_depth: int) -> str:
    """The path (`items[3].metadata`, at most 4 steps) to a container below `max_depth`;
    only called once `_check_depth` knows there is one."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            return path.lstrip(".") or "message"
        children = node.items() if type(node) is dict else enumerate(node)
        for key, value in children:
            if type(value) is dict or type(value) is list:
                if depth > 4:
                    step = ""
                elif type(key) is int:
                    step = f"[{key}]"
                else:
                    step = f".{_brief(key, 40, quote=False)}"
                stack.append((value, depth + 1, path + step))
    return "message"


def _brief(value: Any, limit: int = 64, *, quote: bool = True) -> str:
    """`repr(value)` (or `str` with quote=False), cut to about `limit` characters: error
    messages name what is wrong without echoing a large request back."""
    text = repr(value) if quote else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_key(key: bytes | None, index: str) -> None:
    if key is None:
        raise InvalidRequest("the record has no key: the key must be the index name")
    try:
        key_s = bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "the record key is not UTF-8: the key must be the index name"
        ) from None
    if index != key_s:
        raise InvalidRequest(f"index {index!r} differs from the record key {_brief(key_s, 140)}")


def decode_vector_b64(text: str, *, max_dim: int) -> np.ndarray:
    """base64 of little-endian float32 -> a float32 vector (writable, native order).

    Raises:
        InvalidRequest: not strict base64, not a whole number of float32 values, empty, or
            longer than `max_dim`. (Finiteness is the caller's check.)
    """
    raw = _b64_bytes(text, max_dim, "vector_b64", None)
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


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
        raise InvalidRequest(f"search: {len(value)} vectors is over the limit {limits.max_queries}")
    where = lambda pos: f"search: vector {pos}"  # noqa: E731
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


def _int(value: Any, default: int) -> int:
    return default if value is None else int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _decode_items(raw_items: list[dict[str, Any]], limits: MessageLimits) -> list[AddItem]:
    """The items of an `add`; vectors decoded in as few numpy calls as possible."""
    n = len(raw_items)
    if n > limits.max_items:
        raise InvalidRequest(f"add: {n} items is over the limit {limits.max_items}")

    def where(pos: int) -> str:
        return f"add: items[{pos}] (id {_brief(raw_items[pos]['id'])})"

    max_id = limits.max_id_bytes
    max_meta = limits.max_metadata_bytes
    json_pos: list[int] = []
    b64_pos: list[int] = []
    for pos, raw in enumerate(raw_items):
        has_json = "vector" in raw
        if has_json == ("vector_b64" in raw):
            got = "both" if has_json else "neither"
            raise InvalidRequest(
                f"{where(pos)}: exactly one of vector and vector_b64 is required, got {got}",
                item=pos,
            )
        (json_pos if has_json else b64_pos).append(pos)
        id_ = raw["id"]
        if len(id_) * 4 > max_id and len(id_.encode("utf-8")) > max_id:
            raise InvalidRequest(f"{where(pos)}: id over {max_id} bytes", item=pos)
        meta = raw.get("metadata")
        if meta is not None and len(orjson.dumps(meta)) > max_meta:
            raise InvalidRequest(f"{where(pos)}: metadata over {max_meta} bytes", item=pos)

    vectors: list[np.ndarray] = [_NO_VECTOR] * n
    max_dim = limits.max_dim
    if json_pos:
        rows = [raw_items[p]["vector"] for p in json_pos]
        lengths = set(map(len, rows))
        if len(lengths) == 1 and max(lengths) <= max_dim:
            arr = _json_rows(rows, json_pos, where, max_dim)
            for i, pos in enumerate(json_pos):
                vectors[pos] = arr[i]
        else:  # ragged (the index rejects the odd ones out) or over the limit
            for pos, row in zip(json_pos, rows, strict=True):
                vectors[pos] = _json_vector(row, max_dim, where(pos), pos)
    if b64_pos:
        chunks = [_b64_bytes(raw_items[p]["vector_b64"], max_dim, where(p), p) for p in b64_pos]
        if len(set(map(len, chunks))) == 1:
            arr = np.frombuffer(b"".join(chunks), dtype="<f4").astype(np.float32)
            arr = arr.reshape(len(chunks), -1)
            _check_finite(arr, b64_pos, where)
            for i, pos in enumerate(b64_pos):
                vectors[pos] = arr[i]
        else:
            for pos, chunk in zip(b64_pos, chunks, strict=True):
                vec = np.frombuffer(chunk, dtype="<f4").astype(np.float32)
                _check_finite(vec.reshape(1, -1), [pos], where)
                vectors[pos] = vec
    return [
        AddItem(raw["id"], vec, raw.get("metadata"), _int(raw.get("version"), 0))
        for raw, vec in zip(raw_items, vectors, strict=True)
    ]


_NO_VECTOR = np.empty(0, dtype=np.float32)


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


def _check_ids(ids: list[str], limits: MessageLimits, op: str) -> list[str]:
    if len(ids) > limits.max_ids:
        raise InvalidRequest(f"{op}: {len(ids)} ids is over the limit {limits.max_ids}")
    max_id = limits.max_id_bytes
    for pos, id_ in enumerate(ids):
        if len(id_) * 4 > max_id and len(id_.encode("utf-8")) > max_id:
            raise InvalidRequest(f"{op}: ids[{pos}]: id over {max_id} bytes", item=pos)
    return ids


def decode_command(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    *,
    limits: MessageLimits,
) -> Command:
    """Decode and validate one record of the commands topic.

    Arguments:
        key: the record key; must be the index name (UTF-8).
        value: the record value, a JSON object with `op` and `index`.
        headers: the record headers; Spring reply headers ask for an ack.

    Raises:
        InvalidRequest: anything malformed or over a limit (malformed reply headers
            included), with a message naming it and `item` set when one item (or id) is
            to blame. Nothing was applied.
    """
    with _request_faults():
        return _command(key, value, headers, limits)


def _command(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    limits: MessageLimits,
) -> Command:
    body = _parse(value, limits)
    op = body.get("op")
    if op not in COMMAND_OPS:
        raise InvalidRequest(
            f"unknown op {_brief(op)}; commands are {', '.join(COMMAND_OPS)}"
            if "op" in body
            else f"a command needs an op, one of {', '.join(COMMAND_OPS)}"
        )
    _check(op, body)
    index = body["index"]
    _check_key(key, index)
    reply_to = reply_to_from_headers(headers, limits=limits)
    request_id = body.get("request_id")
    if op == "add":
        return AddCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            items=_decode_items(body["items"], limits),
        )
    if op == "delete":
        return DeleteCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            ids=_check_ids(body["ids"], limits, op),
            version=_int(body.get("version"), 0),
        )
    if op == "create":
        params = {
            k: (int(v) if isinstance(v, float) else v)  # integral floats: the schema said integer
            for k, v in body.items()
            if k not in ("op", "index", "request_id")
        }
        if params["dim"] > limits.max_dim:
            raise InvalidRequest(f"create: dim {params['dim']} is over the limit {limits.max_dim}")
        return CreateCommand(index=index, request_id=request_id, reply_to=reply_to, params=params)
    if op == "drop":
        return DropCommand(index=index, request_id=request_id, reply_to=reply_to)
    if op == "merge":
        if body["dest"] == index:
            raise InvalidRequest(f"merge: index {index!r} cannot be merged into itself")
        return MergeCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            dest=body["dest"],
            clear_source=bool(body.get("clear_source", False)),
        )
    if op == "import":
        return ImportCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            source=body["source"],
            format=body.get("format"),
            ids_source=body.get("ids_source"),
            metadata_source=body.get("metadata_source"),
            version=_opt_int(body.get("version")),
            chunk_items=_int(body.get("chunk_items"), 10_000),
        )
    reply = body.get("reply")
    if op == "merge_in":
        if body["source_index"] == index:
            raise InvalidRequest(f"merge_in: index {index!r} cannot be merged into itself")
        return MergeInCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            source_index=body["source_index"],
            export=body["export"],
            merge_id=body["merge_id"],
            origin_partition=int(body["origin_partition"]),
            origin_offset=int(body["origin_offset"]),
            clear_source=bool(body.get("clear_source", False)),
            reply=None if reply is None else ReplyTo.from_wire(reply),
        )
    error = body.get("error")
    return MergeDoneCommand(
        index=index,
        request_id=request_id,
        reply_to=reply_to,
        dest=body["dest"],
        export=body["export"],
        merge_id=body["merge_id"],
        applied=_int(body.get("applied"), 0),
        skipped=_int(body.get("skipped"), 0),
        clear_source=bool(body.get("clear_source", False)),
        error=None
        if error is None
        else ErrorInfo(error["code"], error["message"], _opt_int(error.get("item"))),
        reply=None if reply is None else ReplyTo.from_wire(reply),
    )


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
        raise InvalidRequest("a query needs kafka_replyTopic and kafka_correlationId headers")
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
    if op == "search":
        k = _int(body.get("k"), 10)
        if k > limits.max_k:
            raise InvalidRequest(f"search: k {k} is over the limit {limits.max_k}")
        vectors, multi = _search_vectors(body, limits)
        return SearchQuery(
            index=index,
            reply_to=reply_to,
            request_id=request_id,
            min_offset=min_offset,
            deadline_ms=deadline_ms,
            vectors=vectors,
            multi=multi,
            k=k,
            ef=_opt_int(body.get("ef")),
            filter=_check_filter(body.get("filter"), limits),
            include_metadata=bool(body.get("include_metadata", False)),
            include_vectors=bool(body.get("include_vectors", False)),
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
            ids=ids,
            include_vectors=include_vectors,
            include_metadata=bool(body.get("include_metadata", True)),
            vector_encoding=body.get("vector_encoding", "json"),
        )
    return StatsQuery(
        index=index,
        reply_to=reply_to,
        request_id=request_id,
        min_offset=min_offset,
        deadline_ms=deadline_ms,
    )


# -- encoding -----------------------------------------------------------------------------


def correlation_text(correlation_id: bytes) -> str:
    """A correlation id as it appears in reply bodies: UTF-8 text, else lowercase hex."""
    try:
        return correlation_id.decode("utf-8")
    except UnicodeDecodeError:
        return correlation_id.hex()


def _dumps(body: dict[str, Any]) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _ms(took_ms: float) -> float:
    return round(float(took_ms), 3)


class _HitLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def distance(self) -> float: ...
    @property
    def metadata(self) -> dict[str, Any] | None: ...


class _ItemLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def vector(self) -> np.ndarray | None: ...
    @property
    def metadata(self) -> dict[str, Any] | None: ...


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

    def _hits(self, hits: Sequence[_HitLike]) -> list[dict[str, Any]]:
        if self.include_metadata:
            return [
                {"id": h.id, "distance": float(h.distance), "metadata": h.metadata} for h in hits
            ]
        return [{"id": h.id, "distance": float(h.distance)} for h in hits]

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "correlation_id": correlation_text(self.reply_to.correlation_id),
            "status": "ok",
            "op": "search",
            "index": self.index,
        }
        if self.results is None:
            body["hits"] = self._hits(self.hits)
        elif self.include_metadata:
            body["results"] = [
                {"ids": c.ids, "distances": c.distances, "metadata": c.metadata}
                for c in self.results
            ]
        else:
            body["results"] = [{"ids": c.ids, "distances": c.distances} for c in self.results]
        body["applied_offset"] = self.applied_offset
        body["took_ms"] = _ms(self.took_ms)
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return _dumps(body)


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
                vec = np.asarray(item.vector, dtype="<f4").reshape(-1)
                if self.vector_encoding == "b64":
                    entry["vector_b64"] = base64.b64encode(vec.tobytes()).decode("ascii")
                else:
                    entry["vector"] = vec.tolist()
            if self.include_metadata:
                entry["metadata"] = item.metadata
            clock = getattr(item, "clock", None)
            if clock is not None:
                entry["version"] = int(clock[0])
            out.append(entry)
        body: dict[str, Any] = {
            "correlation_id": correlation_text(self.reply_to.correlation_id),
            "status": "ok",
            "op": "get",
            "index": self.index,
            "items": out,
            "applied_offset": self.applied_offset,
            "took_ms": _ms(self.took_ms),
        }
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return _dumps(body)


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
        body: dict[str, Any] = {
            "correlation_id": correlation_text(self.reply_to.correlation_id),
            "status": "ok",
            "op": "stats",
            "index": self.index,
        }
        body.update(self.stats)
        body["took_ms"] = _ms(self.took_ms)
        if self.request_id is not None:
            body["request_id"] = self.request_id
        return _dumps(body)


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
) -> bytes:
    """`SearchReply` of a one-vector `query`; `hits` are `lhv_index.Hit`s (id, distance,
    metadata). With `results` (a multi-vector query), those are sent instead of `hits`."""
    return SearchReply(
        reply_to=query.reply_to,
        index=query.index,
        hits=hits,
        results=results,
        include_metadata=query.include_metadata,
        applied_offset=applied_offset,
        took_ms=took_ms,
        request_id=query.request_id,
    ).encode()


def encode_search_results(
    query: SearchQuery, rows: Sequence[Columns], *, applied_offset: int, took_ms: float
) -> bytes:
    """`SearchReply` of `query` from the `lhv_index.Columns` of each of its vectors:
    `results` for a multi-vector search, `hits` (of the one row) otherwise."""
    if query.multi:
        return encode_search_reply(
            query, (), applied_offset=applied_offset, took_ms=took_ms, results=rows
        )
    return encode_search_reply(
        query, rows[0].hits(), applied_offset=applied_offset, took_ms=took_ms
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
    """The `Ack` of one command record; `outcome` is a `worker.apply.Outcome`.

    Reads `reply_to`, `offset`, `index`, `op`, `request_id`, `applied`, `skipped` and
    `error` from it.
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
    ).encode()
