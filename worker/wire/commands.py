"""Commands (`lhv.commands`): typed values and `decode_command`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import orjson

from lhv_index import MetadataJson
from lhv_index.errors import InvalidRequest
from worker.wire._body import (
    _brief,
    _check_ids,
    _check_key,
    _int,
    _key_text,
    _opt_int,
    _parse,
    _request_faults,
)
from worker.wire.headers import ReplyTo, reply_to_from_headers
from worker.wire.limits import COMMAND_OPS, MessageLimits
from worker.wire.replies import ErrorInfo
from worker.wire.schemas import _check
from worker.wire.shards import parse_shard_name
from worker.wire.vectors import (
    _NO_VECTOR,
    _b64_bytes,
    _check_finite,
    _json_rows,
    _json_vector,
    encode_vector_b64,
)

__all__ = [
    "AddCommand",
    "AddItem",
    "AliasCommand",
    "Command",
    "CreateCommand",
    "DeleteCommand",
    "DropCommand",
    "ImportCommand",
    "MergeCommand",
    "MergeDoneCommand",
    "MergeInCommand",
    "Origin",
    "UnaliasCommand",
    "command_names",
    "decode_command",
    "forward_value",
    "record_key_text",
]

#: a command record's key as text (InvalidRequest when it is not UTF-8), for the checks
#: made before its value is decoded (its partition)
record_key_text = _key_text


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Origin:
    """Where a forwarded record comes from: the original record's partition and offset,
    and the position of this record among those the home owner made from it. Origins of
    one partition are ordered by (offset, part)."""

    partition: int
    offset: int
    part: int = 0

    @property
    def position(self) -> tuple[int, int]:
        """(offset, part): what the exactly-once high-water mark of `partition` compares."""
        return (self.offset, self.part)

    def to_wire(self) -> dict[str, int]:
        return {"partition": self.partition, "offset": self.offset, "part": self.part}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Base:
    index: str
    """the index the command is about; equals the record key"""
    request_id: str | None = None
    """echoed in the ack"""
    reply_to: ReplyTo | None = None
    """where the ack goes; None: no ack"""
    origin: Origin | None = None
    """set on a forwarded record (signed by a worker; checked before it is applied)"""
    via_alias: str | None = None
    """on a record forwarded from an alias: that alias"""


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateCommand(_Base):
    op: ClassVar[str] = "create"
    params: dict[str, Any]
    """dim, space, engine and engine parameters, as `IndexParams.from_dict` takes them"""
    shards: int = 1
    """1: an ordinary index; S >= 2: a sharded index of S members (`wire.shards`)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class DropCommand(_Base):
    op: ClassVar[str] = "drop"


@dataclass(frozen=True, slots=True)
class AddItem:
    id: str
    vector: np.ndarray
    """float32, 1-D (its length is checked against the index's dim by the index)"""
    metadata: dict[str, Any] | MetadataJson | None
    """None keeps the stored metadata, {} clears it, an object replaces it (decoded
    records carry it as `MetadataJson`: its compact JSON, not a tree of objects)"""
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
    dim: int | None = None
    """the source's dim (the home of a sharded destination checks it before forwarding)"""
    space: str | None = None
    """the source's space, checked like `dim`"""

    def encode(self) -> tuple[bytes, bytes]:
        """(key, value) of the record to produce to the commands topic."""
        return self.index.encode("utf-8"), orjson.dumps(self.body())

    def body(self) -> dict[str, Any]:
        """The record's JSON body (without `origin`)."""
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
        if self.dim is not None:
            body["dim"] = self.dim
        if self.space is not None:
            body["space"] = self.space
        return body


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeDoneCommand(_Base):
    """Merge step back on the source's partition (`index` is the source).

    `applied` items of `export` went into `dest` (or `error` says why none did); with
    `clear_source` the source deletes exactly the exported items, then acks to `reply`.
    From a member of a sharded destination, `dest_shard` of `dest_shards` names the member
    and the source clears only the exported ids of that shard.
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
    dest_shard: int | None = None
    dest_shards: int | None = None

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
        if self.dest_shard is not None and self.dest_shards is not None:
            body["dest_shard"] = self.dest_shard
            body["dest_shards"] = self.dest_shards
        return self.index.encode("utf-8"), orjson.dumps(body)


@dataclass(frozen=True, slots=True, kw_only=True)
class AliasCommand(_Base):
    """Make `index` (the alias) name `target`; replaces the alias's previous target."""

    op: ClassVar[str] = "alias"
    target: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UnaliasCommand(_Base):
    """Remove the alias `index`."""

    op: ClassVar[str] = "unalias"


Command: TypeAlias = (
    CreateCommand
    | DropCommand
    | AddCommand
    | DeleteCommand
    | MergeCommand
    | ImportCommand
    | MergeInCommand
    | MergeDoneCommand
    | AliasCommand
    | UnaliasCommand
)


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
        if len(id_) * 4 > max_id and (size := len(id_.encode("utf-8"))) > max_id:
            raise InvalidRequest(
                f"{where(pos)}: id of {size} bytes is over the limit {max_id} (max_id_bytes)",
                item=pos,
            )
        meta = raw.get("metadata")
        if meta is None:
            continue
        # kept as its compact JSON: parsed, a small object of empty containers weighs up
        # to 20 times its bytes, for as long as the decoded batch waits for its apply
        if type(meta) is dict:
            raw["metadata"] = encoded = MetadataJson.of(meta)
            size = len(encoded.json)
        else:  # not an object: the index refuses it, naming what it is
            size = len(orjson.dumps(meta))
        if size > max_meta:
            raise InvalidRequest(
                f"{where(pos)}: metadata of {size} bytes is over the limit {max_meta} "
                "(max_metadata_bytes)",
                item=pos,
            )

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


#: fields of a `create` body that are not index parameters
_NOT_PARAMS = frozenset({"op", "index", "request_id", "shards", "origin", "via_alias"})


def _check_shards(index: str, shards: int, limits: MessageLimits) -> None:
    """`shards` of a `create` within `max_shards`; a member name's shard within it."""
    if shards > limits.max_shards:
        raise InvalidRequest(
            f"create: shards {shards} is over the limit {limits.max_shards} (max_shards)"
        )
    member = parse_shard_name(index)
    if member is not None and not 0 <= member.shard < shards:
        raise InvalidRequest(
            f"create: {index!r} is shard {member.shard} of {member.base!r}, which needs "
            f"shards of at least {member.shard + 1} (got {shards})"
        )


def forward_value(
    cmd: Command,
    *,
    index: str,
    origin: Origin,
    positions: Sequence[int] | None = None,
    shards: int | None = None,
    via_alias: str | None = None,
) -> bytes:
    """The value of a forwarded record made from `cmd`: the same command keyed `index`,
    with `origin` (and `via_alias`); for an `add` or `delete`, only the items or ids at
    `positions` (in that order; None: all); for a `create`, `shards`.

    Vectors travel as `vector_b64` (little-endian float32: exactly the decoded vector).
    The reply headers and `request_id` of `cmd` stay with the original record (the home
    acknowledges it), so a forwarded record is never acknowledged on its own.
    """
    body: dict[str, Any] = {"op": cmd.op, "index": index, "origin": origin.to_wire()}
    if via_alias is not None:
        body["via_alias"] = via_alias
    if isinstance(cmd, AddCommand):
        picked = cmd.items if positions is None else [cmd.items[p] for p in positions]
        body["items"] = [_item_wire(item) for item in picked]
    elif isinstance(cmd, DeleteCommand):
        body["ids"] = list(cmd.ids) if positions is None else [cmd.ids[p] for p in positions]
        if cmd.version:
            body["version"] = cmd.version
    elif isinstance(cmd, CreateCommand):
        body.update(cmd.params)
        if shards is not None and shards > 1:
            body["shards"] = shards
    elif isinstance(cmd, ImportCommand):
        body["source"] = cmd.source
        for name in ("format", "ids_source", "metadata_source", "version"):
            value = getattr(cmd, name)
            if value is not None:
                body[name] = value
        body["chunk_items"] = cmd.chunk_items
    elif isinstance(cmd, MergeCommand):
        body["dest"] = cmd.dest
        body["clear_source"] = cmd.clear_source
    elif isinstance(cmd, MergeInCommand):
        body = {**cmd.body(), "index": index, "origin": origin.to_wire()}
    elif not isinstance(cmd, DropCommand):
        raise ValueError(f"{cmd.op} records are not forwarded")
    return orjson.dumps(body)


def _item_wire(item: AddItem) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.id,
        "vector_b64": encode_vector_b64(item.vector),
    }
    if isinstance(item.metadata, MetadataJson):
        out["metadata"] = orjson.Fragment(item.metadata.json)
    elif item.metadata is not None:
        out["metadata"] = item.metadata
    if item.version:
        out["version"] = item.version
    return out


def command_names(value: bytes | None, limits: MessageLimits) -> tuple[str, str, str | None]:
    """(op, index, request_id) of a record refused before or while it was decoded, read as
    far as it can be (each '' or None when it cannot): an ack or DLQ record then names
    what the refused command was, as every reply does."""
    if not value or len(value) > limits.max_message_bytes:
        return "", "", None
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return "", "", None
    if not isinstance(body, dict):
        return "", "", None

    def text(field: str, longest: int) -> str | None:
        got = body.get(field)
        ok = isinstance(got, str) and 0 < len(got) <= longest and got.isprintable()
        return got if ok else None

    op = body.get("op")
    return (
        op if isinstance(op, str) and op in COMMAND_OPS else "",
        text("index", 160) or "",
        text("request_id", 256),
    )


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
    raw_origin = body.get("origin")
    origin = (
        None
        if raw_origin is None
        else Origin(
            int(raw_origin["partition"]), int(raw_origin["offset"]), int(raw_origin["part"])
        )
    )
    via_alias = body.get("via_alias")  # the schemas refuse it without origin
    if op == "add":
        return AddCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            origin=origin,
            via_alias=via_alias,
            items=_decode_items(body["items"], limits),
        )
    if op == "delete":
        return DeleteCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            origin=origin,
            via_alias=via_alias,
            ids=_check_ids(body["ids"], limits, op),
            version=_int(body.get("version"), 0),
        )
    if op == "create":
        params = {
            k: (int(v) if isinstance(v, float) else v)  # integral floats: the schema said integer
            for k, v in body.items()
            if k not in _NOT_PARAMS
        }
        if params["dim"] > limits.max_dim:
            raise InvalidRequest(f"create: dim {params['dim']} is over the limit {limits.max_dim}")
        shards = _int(body.get("shards"), 1)
        _check_shards(index, shards, limits)
        return CreateCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            origin=origin,
            via_alias=via_alias,
            params=params,
            shards=shards,
        )
    if op == "drop":
        return DropCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            origin=origin,
            via_alias=via_alias,
        )
    if op == "merge":
        if body["dest"] == index:
            raise InvalidRequest(f"merge: index {index!r} cannot be merged into itself")
        return MergeCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            origin=origin,
            via_alias=via_alias,
            dest=body["dest"],
            clear_source=bool(body.get("clear_source", False)),
        )
    if op == "import":
        return ImportCommand(
            index=index,
            request_id=request_id,
            reply_to=reply_to,
            origin=origin,
            via_alias=via_alias,
            source=body["source"],
            format=body.get("format"),
            ids_source=body.get("ids_source"),
            metadata_source=body.get("metadata_source"),
            version=_opt_int(body.get("version")),
            chunk_items=_int(body.get("chunk_items"), 10_000),
        )
    if op == "alias":
        if body["target"] == index:
            raise InvalidRequest(f"alias: {index!r} cannot be an alias of itself")
        return AliasCommand(
            index=index, request_id=request_id, reply_to=reply_to, target=body["target"]
        )
    if op == "unalias":
        return UnaliasCommand(index=index, request_id=request_id, reply_to=reply_to)
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
            origin=origin,
            dim=_opt_int(body.get("dim")),
            space=body.get("space"),
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
        dest_shard=_opt_int(body.get("dest_shard")),
        dest_shards=_opt_int(body.get("dest_shards")),
    )
