"""Property tests: the published JSON Schemas and the decoders agree.

A producer in another language validates its messages against `schemas/`; it must never
be surprised. For every generated document:

- the schema refuses it: the decoder refuses it with `invalid_request` (never `internal`,
  never another exception, never a typed command);
- the schema accepts it: the decoder accepts it, unless it breaks a limit or rule that the
  README or the schema's descriptions document (max items, ids, id bytes, dim, k, ...; a
  merge into itself; vectors of one search of different lengths; a NaN in base64), and
  then it refuses it with `invalid_request`.

The schema side is `jsonschema` (an implementation independent of the `fastjsonschema` the
worker compiles the schemas with), with `$` read as ECMA-262 reads it (end of input, not
before a final newline), as most producers' validators do. Documents are small valid
messages of every op, then mutated: a field replaced by a value of a wrong type or on a
boundary (0, -1, 2**63, 1.0 for 1, booleans for numbers, strings for enums, empty strings
and arrays, unicode, null), removed, or added. The limits are made small so that the
generated documents cross them. Replies and acks of every op, ok and with every error
code, validate against `reply.schema.json` / `ack.schema.json`.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped]
from referencing import Registry, Resource

from lhv_index import IndexParams, Limits
from lhv_index.errors import LhvError, error_for_code
from worker.wire.commands import decode_command
from worker.wire.headers import ReplyTo, dlq_headers
from worker.wire.limits import COMMAND_OPS, QUERY_OPS, MessageLimits
from worker.wire.queries import decode_query
from worker.wire.replies import Ack, DescribeReply, ErrorReply, GetReply, SearchReply, StatsReply
from worker.wire.schemas import SCHEMA_NAMES, load_schema

LIMITS = MessageLimits(
    max_items=3,
    max_ids=3,
    max_dim=6,
    max_id_bytes=12,
    max_k=40,
    max_queries=3,
    max_get_vectors=30,
    max_filter_keys=3,
    max_filter_bytes=80,
    max_metadata_bytes=60,
    max_shards=8,
    max_message_bytes=1500,
)
INDEX_LIMITS = Limits(max_dim=LIMITS.max_dim, max_elements_hint=1000)
HEADERS = [("kafka_replyTopic", b"lhv.replies.t1"), ("kafka_correlationId", b"corr-1")]
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: what `vector_b64` and `vector` must round to: beyond it, float32 is infinite
FLOAT32_BOUND = 2.0**128 - 2.0**103


# -- the schema side ----------------------------------------------------------------------


def _ecma(pattern: str) -> str:
    """`pattern` with a final `$` as ECMA-262 reads it: the end of the input only."""
    return (
        pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
    )


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not re.search(_ecma(pattern), instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_SCHEMAS = {name: load_schema(name) for name in SCHEMA_NAMES}
_REGISTRY: Registry[Any] = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in _SCHEMAS.values()
)
_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _pattern})
REFERENCE = {name: _Validator(s, registry=_REGISTRY) for name, s in _SCHEMAS.items()}


def schema_accepts(kind: str, body: Any) -> bool:
    """What a producer's validator says of `body`: the dispatch schema of `kind` and the
    schema of its op (validated on its own: a `$ref` is read by the stock validator of the
    `$schema` it names, with Python's `$`)."""
    if not REFERENCE[kind].is_valid(body):
        return False
    op = body.get("op", "search" if kind == "query" else None)
    return bool(REFERENCE[op].is_valid(body))


# -- the documented limits and rules the schemas cannot say -------------------------------


def _id_over(id_: str) -> bool:
    return len(id_.encode("utf-8")) > LIMITS.max_id_bytes


def _b64_values(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def _vector_breach(value: Any, field: str) -> str | None:
    if field.endswith("_b64"):
        values = _b64_values(value)
        if len(values) > LIMITS.max_dim:
            return "max_dim"
        return None if np.isfinite(values).all() else "NaN in vector_b64"
    return "max_dim" if len(value) > LIMITS.max_dim else None


def _depth(value: Any) -> int:
    if isinstance(value, dict | list):
        children = value.values() if isinstance(value, dict) else value
        return 1 + max(map(_depth, children), default=0)
    return 0


def documented_refusal(value: bytes) -> str | None:
    """The documented limit or rule a schema-valid body (as the worker reads it) breaks."""
    if len(value) > LIMITS.max_message_bytes:
        return "max_message_bytes"
    wire = orjson.loads(value)
    if _depth(wire) > LIMITS.max_json_depth:
        return "max_json_depth"
    op = wire.get("op", "search")
    if op == "add":
        if len(wire["items"]) > LIMITS.max_items:
            return "max_items"
        for item in wire["items"]:
            if _id_over(item["id"]):
                return "max_id_bytes"
            field = "vector" if "vector" in item else "vector_b64"
            why = _vector_breach(item[field], field)
            if why:
                return why
            meta = item.get("metadata")
            if meta is not None and len(orjson.dumps(meta)) > LIMITS.max_metadata_bytes:
                return "max_metadata_bytes"
    if op in ("delete", "get") and (
        len(wire["ids"]) > LIMITS.max_ids or any(map(_id_over, wire["ids"]))
    ):
        return "max_ids / max_id_bytes"
    if op == "get":
        include_vectors = wire.get("include_vectors")
        if include_vectors is not False and len(wire["ids"]) > LIMITS.max_get_vectors:
            return "max_get_vectors"
    if op == "create":
        if wire["dim"] > LIMITS.max_dim:
            return "max_dim"
        shards = wire.get("shards") or 1
        if shards > LIMITS.max_shards:
            return "max_shards"
        member = re.fullmatch(r".*#(\d+)", wire["index"])
        if member and int(member[1]) >= shards:
            return "a member name needs shards past it"
        if (wire.get("max_elements_hint") or 0) > INDEX_LIMITS.max_elements_hint:
            return "max_elements_hint"
    if op == "merge" and wire["dest"] == wire["index"]:
        return "merge into itself"
    if op == "alias" and wire["target"] == wire["index"]:
        return "alias of itself"
    if op == "merge_in" and wire["source_index"] == wire["index"]:
        return "merge into itself"
    if op == "search":
        return _search_refusal(wire)
    return None


def _search_refusal(wire: dict[str, Any]) -> str | None:
    k = wire.get("k")
    k = 10 if k is None else k
    if k > LIMITS.max_k:
        return "max_k"
    field = next(f for f in ("vector", "vector_b64", "vectors", "vectors_b64") if f in wire)
    rows = [wire[field]] if field in ("vector", "vector_b64") else wire[field]
    if len(rows) > LIMITS.max_queries:
        return "max_queries"
    one = field.removesuffix("s") if field.startswith("vectors") else field
    for row in rows:
        why = _vector_breach(row, one)
        if why:
            return why
    dims = {len(_b64_values(r)) if one.endswith("_b64") else len(r) for r in rows}
    if len(dims) > 1:
        return "vectors of one search share one length"
    if wire.get("include_vectors") and k * len(rows) > LIMITS.max_get_vectors:
        return "max_get_vectors"
    flt = wire.get("filter")
    if flt and (
        len(flt) > LIMITS.max_filter_keys or len(orjson.dumps(flt)) > LIMITS.max_filter_bytes
    ):
        return "max_filter_keys / max_filter_bytes"
    return None


# -- the check ------------------------------------------------------------------------------


#: how the decoder's refusals name a documented limit or rule
_NAMES_A_LIMIT = re.compile(r"limit|over \d+ bytes|itself|share one length|NaN|needs shards")


def assert_agree(kind: str, body: Any) -> None:
    """`body` (a command if `kind` is "command", else a query) is refused by the schema and
    the decoder alike, or accepted by both (the decoder refusing only what a documented
    limit or rule refuses, with `invalid_request`)."""
    valid = schema_accepts(kind, body)
    value = json.dumps(body).encode("utf-8")
    index = body.get("index") if isinstance(body, dict) else None
    key = index.encode("utf-8") if isinstance(index, str) else b"docs"
    why = documented_refusal(value) if valid else None
    try:
        if kind == "command":
            got: Any = decode_command(key, value, [], limits=LIMITS)
            if got.op == "create":  # as the worker reads them when it applies the create
                IndexParams.from_dict(got.params, limits=INDEX_LIMITS)
        else:
            got = decode_query(key, value, HEADERS, limits=LIMITS)
    except LhvError as exc:
        assert exc.code == "invalid_request", f"{exc.code}: {exc.message} for {body!r}"
        if valid:
            assert why, f"the schema accepts, the decoder refuses: {exc.message}"
            assert _NAMES_A_LIMIT.search(exc.message), f"{why}, refused as {exc.message!r}"
        return
    assert valid, f"the schema refuses, the decoder accepts {body!r}"
    assert why is None, f"decoded past a documented limit ({why}): {body!r}"
    assert got.op == body.get("op", "search")


# -- valid documents ------------------------------------------------------------------------


def b64(values: Any) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


INDEX = st.sampled_from(["docs", "d", "A.b_c-9", "x" * 128, "docs#0", "docs#7", "docs#9999"])
NAME = st.sampled_from(["docs", "other", "A-1", "y" * 128])
REQUEST_ID = st.none() | st.text(max_size=6) | st.just("r" * 256)
ID = st.text(min_size=1, max_size=5)
NUMBER = (
    st.floats(width=32, allow_nan=False, allow_infinity=False)
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([3.4028234663852886e38, -3.4028235e38, 3.4028235677973362e38, 1e-45])
)
VECTOR = st.lists(NUMBER, min_size=1, max_size=7)
VECTOR_B64 = st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=7).map(b64)
VERSION = st.none() | st.integers(0, 2**63 - 1)
SCALAR = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5)
JSON_VALUE = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
OBJECT = st.dictionaries(st.text(max_size=4), JSON_VALUE, max_size=4)
ORIGIN = st.fixed_dictionaries(
    {
        "partition": st.integers(0, 2**31 - 1),
        "offset": st.integers(0, 2**63 - 1),
        "part": st.integers(0, 2**31 - 1),
    }
)
OFFSET = st.none() | st.integers(-1, 2**63 - 1)
S3 = st.sampled_from(["s3://bucket/x.npy", "s3://my-bucket.a/k/e.npz", "s3://abc/x y.lhv"])
REPLY = st.none() | st.fixed_dictionaries(
    {
        "topic": st.text(min_size=1, max_size=8),
        "correlation_id_b64": st.binary(max_size=6).map(
            lambda b: base64.b64encode(b).decode("ascii")
        ),
    },
    optional={"partition": st.none() | st.integers(0, 2**31)},
)
FORWARDED = {"origin": ORIGIN, "via_alias": NAME}


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


ITEM = st.one_of(
    st.fixed_dictionaries(
        {"id": ID, "vector": VECTOR},
        optional={"metadata": st.none() | OBJECT, "version": VERSION},
    ),
    st.fixed_dictionaries(
        {"id": ID, "vector_b64": VECTOR_B64},
        optional={"metadata": st.none() | OBJECT, "version": VERSION},
    ),
)
COMMANDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "create": st.fixed_dictionaries(
        {"op": st.just("create"), "index": INDEX, "dim": st.integers(1, 8)},
        optional={
            "request_id": REQUEST_ID,
            "shards": _maybe(st.integers(1, 10)),
            "space": st.sampled_from(["cosine", "l2", "ip", None]),
            "engine": st.sampled_from(["hnsw", "exact", "annoy", None]),
            "M": _maybe(st.integers(2, 512)),
            "ef_construction": _maybe(st.integers(1, 100_000)),
            "ef_search": _maybe(st.integers(1, 100_000)),
            "n_trees": _maybe(st.integers(1, 1000)),
            "search_k": _maybe(st.integers(-1, 10_000_000)),
            "max_elements_hint": _maybe(st.integers(0, 2000)),
            **FORWARDED,
        },
    ),
    "drop": st.fixed_dictionaries(
        {"op": st.just("drop"), "index": INDEX},
        optional={"request_id": REQUEST_ID, **FORWARDED},
    ),
    "add": st.fixed_dictionaries(
        {"op": st.just("add"), "index": INDEX, "items": st.lists(ITEM, min_size=1, max_size=4)},
        optional={"request_id": REQUEST_ID, **FORWARDED},
    ),
    "delete": st.fixed_dictionaries(
        {"op": st.just("delete"), "index": INDEX, "ids": st.lists(ID, min_size=1, max_size=4)},
        optional={"request_id": REQUEST_ID, "version": VERSION, **FORWARDED},
    ),
    "merge": st.fixed_dictionaries(
        {"op": st.just("merge"), "index": INDEX, "dest": NAME},
        optional={"request_id": REQUEST_ID, "clear_source": _maybe(st.booleans()), **FORWARDED},
    ),
    "import": st.fixed_dictionaries(
        {"op": st.just("import"), "index": INDEX, "source": S3},
        optional={
            "request_id": REQUEST_ID,
            "format": st.sampled_from(["npy", "npz", "lhv", None]),
            "ids_source": _maybe(S3),
            "metadata_source": _maybe(S3),
            "version": VERSION,
            "chunk_items": _maybe(st.integers(1, 100_000)),
            **FORWARDED,
        },
    ),
    "merge_in": st.fixed_dictionaries(
        {
            "op": st.just("merge_in"),
            "index": INDEX,
            "source_index": INDEX,
            "export": st.sampled_from(["merges/m1.lhv", "a", "p/merges/x=1/y.lhv"]),
            "merge_id": st.sampled_from(["m1", "0:12:docs", "a" * 128]),
            "origin_partition": st.integers(0, 2**31 - 1),
            "origin_offset": st.integers(0, 2**63 - 1),
        },
        optional={
            "request_id": REQUEST_ID,
            "clear_source": st.booleans(),
            "reply": REPLY,
            "dim": st.integers(1, 10),
            "space": st.sampled_from(["l2", "cosine", ""]),
            "origin": ORIGIN,
        },
    ),
    "merge_done": st.fixed_dictionaries(
        {
            "op": st.just("merge_done"),
            "index": INDEX,
            "dest": NAME,
            "export": st.just("merges/m1.lhv"),
            "merge_id": st.just("m1"),
        },
        optional={
            "request_id": REQUEST_ID,
            "applied": st.integers(0, 2**63),
            "skipped": st.integers(0, 10),
            "clear_source": st.booleans(),
            "error": st.none()
            | st.fixed_dictionaries(
                {
                    "code": st.sampled_from(["invalid_request", "dim_mismatch", "internal"]),
                    "message": st.text(max_size=5),
                },
                optional={"item": st.integers(0, 10)},
            ),
            "reply": REPLY,
            "dest_shard": st.integers(0, 9999),
            "dest_shards": st.integers(2, 10_000),
        },
    ),
    "alias": st.fixed_dictionaries(
        {"op": st.just("alias"), "index": NAME, "target": NAME},
        optional={"request_id": REQUEST_ID},
    ),
    "unalias": st.fixed_dictionaries(
        {"op": st.just("unalias"), "index": NAME}, optional={"request_id": REQUEST_ID}
    ),
}
COMMON_QUERY = {
    "request_id": REQUEST_ID,
    "min_offset": OFFSET,
    "deadline_ms": _maybe(st.integers(0, 2**63 - 1)),
}
SHARDED_QUERY = {
    "min_offsets": _maybe(
        st.dictionaries(
            st.sampled_from(["docs#0", "docs#3", "a#9999"]), st.integers(-1, 99), max_size=2
        )
    ),
    "allow_partial": _maybe(st.booleans()),
    "via_alias": NAME,
}
QUERY_VECTOR = st.one_of(
    VECTOR.map(lambda v: {"vector": v}),
    VECTOR_B64.map(lambda v: {"vector_b64": v}),
    st.lists(st.lists(NUMBER, min_size=2, max_size=2), min_size=1, max_size=4).map(
        lambda v: {"vectors": v}
    ),
    st.lists(VECTOR_B64, min_size=1, max_size=4).map(lambda v: {"vectors_b64": v}),
)
ENCODING = st.sampled_from(["json", "b64", None])
QUERIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "search": st.tuples(
        st.fixed_dictionaries(
            {"index": INDEX},
            optional={
                "op": st.just("search"),
                **COMMON_QUERY,
                **SHARDED_QUERY,
                "k": _maybe(st.integers(1, 50)),
                "ef": _maybe(st.integers(1, 100_000)),
                "filter": _maybe(OBJECT),
                "include_metadata": _maybe(st.booleans()),
                "include_vectors": _maybe(st.booleans()),
                "vector_encoding": ENCODING,
            },
        ),
        QUERY_VECTOR,
    ).map(lambda pair: {**pair[0], **pair[1]}),
    "get": st.fixed_dictionaries(
        {"op": st.just("get"), "index": INDEX, "ids": st.lists(ID, min_size=1, max_size=4)},
        optional={
            **COMMON_QUERY,
            **SHARDED_QUERY,
            "include_vectors": _maybe(st.booleans()),
            "include_metadata": _maybe(st.booleans()),
            "vector_encoding": ENCODING,
        },
    ),
    "stats": st.fixed_dictionaries(
        {"op": st.just("stats"), "index": INDEX}, optional={**COMMON_QUERY, **SHARDED_QUERY}
    ),
    "describe": st.fixed_dictionaries(
        {"op": st.just("describe"), "index": INDEX}, optional=COMMON_QUERY
    ),
}


# -- mutations ------------------------------------------------------------------------------

#: values of the wrong type, or on a boundary, for any field
WRONG = (
    st.sampled_from(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            1.0,
            2.0,
            1.5,
            -0.5,
            2**31,
            2**63 - 1,
            2**63,
            2**64 - 1,
            2**64,
            -(2**63) - 1,
            1e300,
            3.5e38,
            -3.5e38,
            FLOAT32_BOUND,
            "",
            "x",
            "docs",
            "other",
            "docs\n",
            "é",
            "🙂" * 4,
            "cosine",
            "COSINE",
            "hnsw",
            "b64",
            "search",
            "add",
            "AAAAAAA=",  # 5 bytes: not whole float32 values
            "AACAPw==",  # [1.0]
            "AADAfw==",  # [NaN]
            "AACAfw==",  # [inf]
            "AAAAAAAAAAA=",  # 8 bytes
            "AAAA",
            "a",  # not base64
            "s3://bucket/x.npy",
            "merges/../x",
            [],
            {},
            [1.0],
            [[1.0]],
            [True],
            [1, "a"],
            [2**64 - 1, -1],
            {"a": 1},
            ["a"],
            ["a", ""],
        ]
    )
    | st.text(max_size=4)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict | list):
        for key, child in value.items() if isinstance(value, dict) else enumerate(value):
            out.append((*prefix, key))
            out.extend(paths(child, (*prefix, key)))
    return out


EXTRA_NAMES = st.sampled_from(["extra", "op", "index", "Op", "vector", "ids", "origin", ""])


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid document, or one with a value replaced, a field added or one removed."""
    body = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(paths(body)))
        parent: Any = body
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "add", "remove"]))
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(draw(WRONG))
        elif action == "add" and isinstance(parent, dict):
            parent[draw(EXTRA_NAMES)] = copy.deepcopy(draw(WRONG))
        elif action == "add":
            parent.append(copy.deepcopy(draw(WRONG)))
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    return body


# -- the properties -------------------------------------------------------------------------


@pytest.mark.parametrize("op", COMMAND_OPS)
@SETTINGS
@given(data=st.data())
def test_schema_and_decoder_agree_on_every_command(op: str, data: st.DataObject) -> None:
    assert_agree("command", data.draw(mutated(COMMANDS[op])))


@pytest.mark.parametrize("op", QUERY_OPS)
@SETTINGS
@given(data=st.data())
def test_schema_and_decoder_agree_on_every_query(op: str, data: st.DataObject) -> None:
    assert_agree("query", data.draw(mutated(QUERIES[op])))


@SETTINGS
@given(body=st.dictionaries(st.sampled_from(["op", "index", "x"]), WRONG, max_size=3) | WRONG)
def test_schema_and_decoder_agree_on_bodies_of_no_known_op(body: Any) -> None:
    assert_agree("command", body)
    assert_agree("query", body)


# -- replies --------------------------------------------------------------------------------

REPLY_TO = ReplyTo("lhv.replies.t1", 0, b"corr-1")
CODES = (
    "invalid_request",
    "index_not_found",
    "index_exists",
    "dim_mismatch",
    "wrong_partition",
    "not_ready",
    "deadline_exceeded",
    "internal",
)


def _hit(id_: str, distance: float, metadata: Any = None) -> Any:
    return SimpleNamespace(id=id_, distance=np.float32(distance), metadata=metadata)


def _ok_replies() -> dict[str, list[bytes]]:
    vec = np.array([1.5, -2.0], np.float32)
    item = SimpleNamespace(id="é", vector=vec, metadata={"k": [1]}, clock=(3, 10, 0))
    gets = [
        GetReply(
            reply_to=REPLY_TO,
            index="docs",
            items=[item, SimpleNamespace(id="b", vector=None, metadata=None, clock=None)],
            include_vectors=include_vectors,
            include_metadata=include_metadata,
            vector_encoding=encoding,
            applied_offset=5,
            took_ms=0.5,
            request_id=rid,
        ).encode()
        for include_vectors in (True, False)
        for include_metadata in (True, False)
        for encoding in ("json", "b64")
        for rid in (None, "r")
    ]
    searches = [
        SearchReply(
            reply_to=REPLY_TO,
            index="docs#1",
            hits=[_hit("a", 0.0, {"t": 1}), _hit("b", 0.5)],
            vectors={"a": vec, "b": vec} if include_vectors else None,
            vector_encoding=encoding,
            include_metadata=include_metadata,
            applied_offset=-1,
            took_ms=1.23456,
        ).encode()
        for include_vectors in (True, False)
        for include_metadata in (True, False)
        for encoding in ("json", "b64")
    ]
    stats = {
        "count": 3,
        "deleted": 1,
        "dim": 2,
        "space": "cosine",
        "engine": "hnsw",
        "params": {"dim": 2, "M": 16},
        "applied_offset": 12,
        "checkpoint_offset": -1,
    }
    described: list[dict[str, Any]] = [
        {"kind": "index", "params": stats["params"]},
        {"kind": "sharded", "shards": 4, "params": stats["params"]},
        {"kind": "alias", "target": "docs"},
    ]
    return {
        "search": searches,
        "get": gets,
        "stats": [StatsReply(reply_to=REPLY_TO, index="d", stats=stats, took_ms=2).encode()],
        "describe": [
            DescribeReply(reply_to=REPLY_TO, index="d", description=d, took_ms=0).encode()
            for d in described
        ],
    }


def test_ok_replies_of_every_query_op_validate_against_the_reply_schema() -> None:
    replies = _ok_replies()
    assert set(replies) == set(QUERY_OPS)
    for op, encoded in replies.items():
        for raw in encoded:
            body = orjson.loads(raw)
            assert body["op"] == op and body["status"] == "ok"
            REFERENCE["reply"].validate(body)


@pytest.mark.parametrize("code", CODES)
def test_error_replies_acks_and_dlq_headers_of_every_op_and_code_validate_against_their_schemas(
    code: str,
) -> None:
    for op in (*QUERY_OPS, None, "bogus"):
        for item in (None, 0, 7):
            error = error_for_code(code, "what went wrong")
            error.item = item
            for reply_to in (REPLY_TO, ReplyTo("t", None, b"\xff\x00")):
                raw = ErrorReply(
                    reply_to=reply_to,
                    index="" if op is None else "docs",
                    error=error,
                    took_ms=0.25,
                    op=op,
                    applied_offset=None if op is None else 4,
                    request_id=None if op is None else "r",
                ).encode()
                body = orjson.loads(raw)
                REFERENCE["reply"].validate(body)
                assert body["error"]["code"] == code
    for op in (*COMMAND_OPS, ""):
        for failure in (None, error_for_code(code, "no")):
            raw = Ack(
                reply_to=REPLY_TO,
                offset=17,
                index="docs" if op else "",
                op=op,
                request_id="r" if op else None,
                applied=0 if failure else 2,
                skipped=0 if failure else 1,
                error=failure,
                partition=3,
                forwarded={"docs#0": 4} if op in ("add", "delete", "create") else None,
            ).encode()
            body = orjson.loads(raw)
            REFERENCE["ack"].validate(body)
            assert body["status"] == ("ok" if failure is None else "error")
    for item in (None, 0, 7):
        error = error_for_code(code, "é" * 5000)
        error.item = item
        headers = dlq_headers(error, "lhv.commands", 5, 2**63 - 1)
        values = {name: value.decode("utf-8") for name, value in headers}
        REFERENCE["dlq_headers"].validate(values)


# -- the documents that once split them -----------------------------------------------------

_MERGE_IN = {
    "op": "merge_in",
    "index": "docs",
    "source_index": "src",
    "export": "merges/m1.lhv",
    "merge_id": "m1",
    "origin_partition": 0,
    "origin_offset": 5,
}
_ADD = {"op": "add", "index": "docs"}


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("kind", "body", "accepted"),
    [
        # via_alias without origin: the decoder refused it, the schema let it through
        ("command", {"op": "drop", "index": "docs", "via_alias": "alias"}, False),
        ("command", {**_ADD, "items": [{"id": "a", "vector": [1]}], "via_alias": "al"}, False),
        (
            "command",
            {
                "op": "drop",
                "index": "docs",
                "via_alias": "al",
                "origin": {"partition": 0, "offset": 1, "part": 0},
            },
            True,
        ),
        # JSON numbers beyond float32 (infinite once read as float32)
        ("command", {**_ADD, "items": [{"id": "a", "vector": [3.5e38]}]}, False),
        ("command", {**_ADD, "items": [{"id": "a", "vector": [-FLOAT32_BOUND]}]}, False),
        ("command", {**_ADD, "items": [{"id": "a", "vector": [3.4028235677973362e38]}]}, True),
        ("query", {"index": "docs", "vectors": [[1, 3.5e38]]}, False),
        # base64 of bytes that are not whole float32 values (5 and 6 bytes), and of 8
        ("command", {**_ADD, "items": [{"id": "a", "vector_b64": "AAAAAAA="}]}, False),
        ("query", {"index": "docs", "vector_b64": "AAAAAAAA"}, False),
        # vectors of different lengths: the schema cannot say it, its description does
        ("query", {"index": "docs", "vectors_b64": ["AAAAAAAAAAA=", "AACAPw=="]}, True),
        ("query", {"index": "docs", "vectors_b64": ["AAAAAAAAAAA=", "AACAPwAAAAA="]}, True),
        # correlation_id_b64 that is not base64: binascii.Error escaped the decoder
        ("command", {**_MERGE_IN, "reply": {"topic": "t", "correlation_id_b64": "a"}}, False),
        ("command", {**_MERGE_IN, "reply": {"topic": "t", "correlation_id_b64": "Y29y"}}, True),
        (
            "command",
            {
                **_MERGE_IN,
                "op": "merge_done",
                "dest": "d",
                "reply": {"topic": "t", "correlation_id_b64": "!!!!"},
            },
            False,
        ),
        # an index name with a final newline: ECMA-262 `$` refuses it, as the worker does
        ("command", {"op": "drop", "index": "docs\n"}, False),
        # limits the schemas leave to their descriptions and the README
        ("command", {**_ADD, "items": [{"id": "a", "vector": [1], "metadata": _nest(29)}]}, True),
        ("command", {**_ADD, "items": [{"id": "a", "vector": [1], "metadata": _nest(30)}]}, True),
        ("command", {**_ADD, "items": [{"id": "a" * 13, "vector": [1]}]}, True),
        ("query", {"index": "docs", "vector": [1.0], "filter": {"a": "x" * 100}}, True),
        ("command", {"op": "merge", "index": "docs", "dest": "docs"}, True),
        ("command", {"op": "create", "index": "docs#3", "dim": 2, "shards": 2}, True),
        # integers as integral floats, and booleans where integers are expected
        ("command", {"op": "create", "index": "docs", "dim": 3.0, "M": 16.0}, True),
        ("command", {"op": "create", "index": "docs", "dim": True}, False),
        ("query", {"index": "docs", "vector": [1.0, True]}, False),
        ("query", {"index": "docs", "vector": [1.0], "k": 1.5}, False),
    ],
)
def test_schema_and_decoder_agree_on_the_documents_that_once_split_them(
    kind: str, body: dict[str, Any], accepted: bool
) -> None:
    assert schema_accepts(kind, body) is accepted
    assert_agree(kind, body)
