"""Wire messages: the published schemas, decoding into typed commands and queries, the
rules and limits on bad input, and replies and acks that validate against their schemas."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastjsonschema
import numpy as np
import orjson
import pytest

from lhv_index import Columns, MetadataJson
from lhv_index.errors import (
    DeadlineExceeded,
    IndexNotFound,
    InvalidRequest,
    LhvError,
    error_for_code,
)
from worker.wire.commands import (
    AddCommand,
    AddItem,
    CreateCommand,
    DeleteCommand,
    DropCommand,
    ImportCommand,
    MergeCommand,
    MergeDoneCommand,
    MergeInCommand,
    Origin,
    decode_command,
    forward_value,
)
from worker.wire.gather import merge_search_reply, merge_stats_reply
from worker.wire.headers import ReplyTo, correlation_text, reply_to_from_headers
from worker.wire.limits import COMMAND_OPS, QUERY_OPS, MessageLimits
from worker.wire.queries import GetQuery, SearchQuery, StatsQuery, decode_query
from worker.wire.replies import (
    Ack,
    ErrorInfo,
    ErrorReply,
    GetReply,
    SearchReply,
    StatsReply,
    encode_ack,
    encode_error_reply,
    encode_get_reply,
    encode_search_reply,
    encode_search_results,
    encode_stats_reply,
)
from worker.wire.schemas import SCHEMA_NAMES, load_schema
from worker.wire.vectors import decode_vector_b64

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
LIMITS = MessageLimits()
HEADERS = [("kafka_replyTopic", b"lhv.replies.t1"), ("kafka_correlationId", b"corr-1")]
REPLY_TO = ReplyTo("lhv.replies.t1", None, b"corr-1")


def b64(values: Any) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def command(body: Any, *, key: bytes | None = b"docs", headers: Any = ()) -> Any:
    value = body if isinstance(body, bytes) else orjson.dumps(body)
    return decode_command(key, value, list(headers), limits=LIMITS)


def query(body: Any, *, key: bytes | None = b"docs", headers: Any = HEADERS) -> Any:
    value = body if isinstance(body, bytes) else orjson.dumps(body)
    return decode_query(key, value, list(headers), limits=LIMITS)


def _from_files(uri: str) -> Any:
    """`$ref`s between the published schemas resolve to the files, never the network."""
    return json.loads((SCHEMA_DIR / uri.rsplit("/", 1)[-1]).read_text(encoding="utf-8"))


def published(name: str) -> Any:
    return fastjsonschema.compile(
        load_schema(name), handlers={"https": _from_files}, use_default=False
    )


REPLY_SCHEMA = published("reply")
ACK_SCHEMA = published("ack")


# -- the schema files --------------------------------------------------------------------


def test_every_message_has_a_schema_file_and_nothing_else_is_there() -> None:
    on_disk = {p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.schema.json")}
    assert on_disk == set(SCHEMA_NAMES)
    assert set(COMMAND_OPS) | set(QUERY_OPS) | {"reply", "ack", "dlq_headers"} <= on_disk


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_07_with_title_and_description(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["$id"].endswith(f"/{name}.schema.json")
    assert schema["title"] and schema["description"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_compiles_with_fastjsonschema(name: str) -> None:
    assert callable(published(name))


@pytest.mark.parametrize("op", [*COMMAND_OPS, *QUERY_OPS])
def test_request_schemas_reject_unknown_fields_and_check_index_names(op: str) -> None:
    schema = load_schema(op)
    assert schema["additionalProperties"] is False
    name = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
    member = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(#(0|[1-9][0-9]{0,3}))?$"
    pattern = schema["properties"]["index"]["pattern"]
    # the ops that reach a member index NAME#s of a sharded index also take its name
    plain = ("alias", "unalias")
    assert pattern == (name if op in plain else member)


def test_schemas_load_from_the_installed_package_or_the_checkout() -> None:
    for name in SCHEMA_NAMES:
        on_disk = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
        assert load_schema(name) == on_disk


def test_dispatch_schemas_route_on_op() -> None:
    commands, queries = published("command"), published("query")
    commands({"op": "add", "index": "docs", "items": [{"id": "a", "vector": [1.0]}]})
    commands({"op": "drop", "index": "docs"})
    queries({"index": "docs", "vector": [1.0]})  # op defaults to search
    queries({"op": "stats", "index": "docs"})
    bad = [
        (commands, {"op": "add", "index": "docs", "items": [{"id": "a", "vectr": [1.0]}]}),
        (commands, {"op": "explode", "index": "docs"}),
        (commands, {"index": "docs"}),
        (queries, {"op": "get", "index": "docs"}),
        (queries, {"index": "docs", "vector": [1.0], "op": "add"}),
    ]
    for check, body in bad:
        with pytest.raises(fastjsonschema.JsonSchemaValueException):
            check(body)


# The runtime checks vectors with numpy instead of per element in the schema validator:
# every vector the published schema refuses, the decoder refuses too (module doc).
BAD_VECTOR_ITEMS: list[dict[str, Any]] = [
    {"id": "a", "vector": ["1.5", 2.0]},
    {"id": "a", "vector": [1.0, True]},
    {"id": "a", "vector": [False, 0.5]},
    {"id": "a", "vector": [1.0, None]},
    {"id": "a", "vector": [[1.0, 2.0]]},
    {"id": "a", "vector": [1.0, {"x": 1}]},
    {"id": "a", "vector": []},
    {"id": "a", "vector_b64": "AAAA!AAA"},
    {"id": "a", "vector_b64": "AAAAA"},
    {"id": "a", "vector_b64": "AAAA"},
    {"id": "a", "vector_b64": "AAAAAA=A"},
    {"id": "a"},
    {"id": "a", "vector": [1.0], "vector_b64": b64([1.0])},
]


@pytest.mark.parametrize("item", BAD_VECTOR_ITEMS, ids=lambda i: repr(i)[:40])
def test_decoder_refuses_every_vector_the_published_schema_refuses(item: dict[str, Any]) -> None:
    body = {"op": "add", "index": "docs", "items": [{"id": "ok", "vector": [0.5, 0.5]}, item]}
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        published("add")(body)
    with pytest.raises(InvalidRequest) as err:
        command(body)
    assert err.value.item == 1


@pytest.mark.parametrize("item", BAD_VECTOR_ITEMS[:7], ids=lambda i: repr(i)[:40])
def test_decoder_refuses_the_same_vectors_in_a_search(item: dict[str, Any]) -> None:
    body = {"index": "docs", "vector": item["vector"]}
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        published("search")(body)
    with pytest.raises(InvalidRequest):
        query(body)


# -- good messages -----------------------------------------------------------------------


def test_create_keeps_only_the_params_given() -> None:
    c = command({"op": "create", "index": "docs", "dim": 3, "space": "l2", "M": 8.0})
    assert isinstance(c, CreateCommand) and c.op == "create"
    assert c.params == {"dim": 3, "space": "l2", "M": 8}
    assert isinstance(c.params["M"], int)
    assert (c.index, c.request_id, c.reply_to) == ("docs", None, None)


def test_add_decodes_json_and_b64_vectors_to_float32_rows() -> None:
    c = command(
        {
            "op": "add",
            "index": "docs",
            "request_id": "r-7",
            "items": [
                {"id": "a", "vector": [1, 2.5, -3], "metadata": {"k": "v"}, "version": 4},
                {"id": "b", "vector_b64": b64([0.5, 0.25, -1])},
                {"id": "c", "vector": [0, 0, 1], "metadata": None, "version": 2.0},
                {"id": "d", "vector_b64": b64([1, 2, 3]), "metadata": {}},
            ],
        },
        headers=HEADERS,
    )
    assert isinstance(c, AddCommand) and c.op == "add"
    assert c.request_id == "r-7" and c.reply_to == REPLY_TO
    assert [i.id for i in c.items] == ["a", "b", "c", "d"]
    for item in c.items:
        assert isinstance(item, AddItem)
        assert item.vector.dtype == np.float32 and item.vector.shape == (3,)
    np.testing.assert_array_equal(c.items[0].vector, [1, 2.5, -3])
    np.testing.assert_array_equal(c.items[1].vector, [0.5, 0.25, -1])
    np.testing.assert_array_equal(c.items[3].vector, [1, 2, 3])
    assert [_meta(i.metadata) for i in c.items] == [{"k": "v"}, None, None, {}]
    assert [i.version for i in c.items] == [4, 0, 2, 0]
    assert isinstance(c.items[2].version, int)


def test_add_with_vectors_of_different_lengths_decodes_each_for_the_index_to_judge() -> None:
    c = command(
        {
            "op": "add",
            "index": "docs",
            "items": [{"id": "a", "vector": [1, 2]}, {"id": "b", "vector": [1, 2, 3]}],
        }
    )
    assert [i.vector.shape for i in c.items] == [(2,), (3,)]


def test_b64_vectors_are_little_endian_float32() -> None:
    raw = np.array([1.5, -2.0, 3.25], dtype=">f4").astype("<f4").tobytes()
    vec = decode_vector_b64(base64.b64encode(raw).decode(), max_dim=8)
    assert vec.dtype == np.float32 and vec.flags.writeable
    np.testing.assert_array_equal(vec, [1.5, -2.0, 3.25])


def test_delete_drop_merge_import_decode() -> None:
    d = command({"op": "delete", "index": "docs", "ids": ["a", "b"], "version": 3})
    assert isinstance(d, DeleteCommand) and d.ids == ["a", "b"] and d.version == 3
    assert command({"op": "delete", "index": "docs", "ids": ["a"]}).version == 0
    assert isinstance(command({"op": "drop", "index": "docs"}), DropCommand)
    m = command({"op": "merge", "index": "docs", "dest": "docs2", "clear_source": True})
    assert isinstance(m, MergeCommand) and (m.dest, m.clear_source) == ("docs2", True)
    assert command({"op": "merge", "index": "docs", "dest": "x"}).clear_source is False
    i = command(
        {
            "op": "import",
            "index": "docs",
            "source": "s3://bucket/vectors.npy",
            "ids_source": "s3://bucket/ids.txt",
            "metadata_source": "s3://bucket/meta.jsonl",
            "version": 5,
        }
    )
    assert isinstance(i, ImportCommand)
    assert (i.source, i.ids_source, i.metadata_source) == (
        "s3://bucket/vectors.npy",
        "s3://bucket/ids.txt",
        "s3://bucket/meta.jsonl",
    )
    assert (i.format, i.version, i.chunk_items) == (None, 5, 10_000)
    j = command({"op": "import", "index": "docs", "source": "s3://bucket/x", "format": "lhv"})
    assert (j.format, j.version) == ("lhv", None)


def test_merge_steps_round_trip_through_their_own_encoding() -> None:
    origin = ReplyTo("lhv.replies.r", 2, b"\x00\xffbinary")
    step = MergeInCommand(
        index="dest",
        request_id="m-1",
        source_index="src",
        export="exports/lhv.commands/00003/m-1.lhv",
        merge_id="m-1",
        origin_partition=3,
        origin_offset=1234,
        clear_source=True,
        reply=origin,
    )
    key, value = step.encode()
    assert key == b"dest"
    published("merge_in")(orjson.loads(value))
    assert command(value, key=key) == step

    done = MergeDoneCommand(
        index="src",
        dest="dest",
        export=step.export,
        merge_id="m-1",
        applied=10,
        skipped=2,
        clear_source=True,
        error=ErrorInfo.of(IndexNotFound("index 'dest' does not exist")),
        reply=origin,
    )
    key, value = done.encode()
    published("merge_done")(orjson.loads(value))
    back = command(value, key=key)
    assert back == done
    assert isinstance(back.error.to_error(), IndexNotFound)


def test_search_defaults_and_options() -> None:
    q = query({"index": "docs", "vector": [1, 0, 0]})
    assert isinstance(q, SearchQuery) and q.op == "search"
    assert q.vectors.shape == (1, 3) and q.vectors.dtype == np.float32
    assert (q.k, q.ef, q.filter, q.min_offset, q.deadline_ms) == (10, None, None, None, None)
    assert (q.include_metadata, q.include_vectors) == (False, False)
    q2 = query(
        {
            "op": "search",
            "index": "docs",
            "vector_b64": b64([1, 2]),
            "k": 3.0,
            "ef": 50,
            "filter": {"lang": "en"},
            "include_metadata": True,
            "min_offset": 41,
            "deadline_ms": 1_700_000_000_000,
            "request_id": "q-1",
        }
    )
    assert (q2.k, q2.ef, q2.filter, q2.include_metadata) == (3, 50, {"lang": "en"}, True)
    assert isinstance(q2.k, int)
    assert (q2.min_offset, q2.deadline_ms, q2.request_id) == (41, 1_700_000_000_000, "q-1")
    assert q2.reply_to == REPLY_TO
    assert query({"index": "docs", "vector": [1], "filter": {}}).filter is None


def test_null_optional_fields_decode_as_if_absent_and_the_schemas_accept_them() -> None:
    nulls = dict.fromkeys(
        ("k", "ef", "filter", "include_metadata", "include_vectors", "min_offset", "deadline_ms")
    )
    body = {"index": "docs", "vector": [1, 0], "request_id": None}
    assert repr(query({**body, **nulls})) == repr(query(body))  # numpy rows: no ==
    published("search")({**body, **nulls})
    get = {"op": "get", "index": "docs", "ids": ["a"]}
    flags = dict.fromkeys(("include_vectors", "include_metadata", "vector_encoding"))
    assert query({**get, **flags}) == query(get)
    published("get")({**get, **flags})
    create = {"op": "create", "index": "docs", "dim": 4}
    params = dict.fromkeys(("space", "engine", "M", "ef_construction", "ef_search", "shards"))
    assert command({**create, **params}) == command(create)
    published("create")({**create, **params})
    item = {"id": "a", "vector": [1.0, 0.0], "metadata": None}
    add = command({"op": "add", "index": "docs", "items": [{**item, "version": None}]})
    assert add.items[0].version == 0 and add.items[0].metadata is None
    delete = {"op": "delete", "index": "docs", "ids": ["a"]}
    assert command({**delete, "version": None}) == command(delete)
    published("delete")({**delete, "version": None})
    with pytest.raises(InvalidRequest, match="vector"):  # required ones stay required
        query({"index": "docs", "vector": None})


def test_get_and_stats_decode() -> None:
    g = query({"op": "get", "index": "docs", "ids": ["a", "b"], "vector_encoding": "b64"})
    assert isinstance(g, GetQuery) and g.ids == ["a", "b"] and g.vector_encoding == "b64"
    assert (g.include_vectors, g.include_metadata) == (True, True)
    s = query({"op": "stats", "index": "docs", "min_offset": 7})
    assert isinstance(s, StatsQuery) and (s.index, s.min_offset) == ("docs", 7)


# -- bad input ---------------------------------------------------------------------------

_ITEM = {"id": "a", "vector": [1.0, 2.0]}


def nest(levels: int, kind: str = "object") -> Any:
    """A value `levels` objects (or arrays) deep, counting itself."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value} if kind == "object" else [value]
    return value


def deep_bytes(levels: int) -> bytes:
    """JSON text of `nest(levels)`, for depths orjson refuses to write."""
    return b'{"a":' * levels + b"1" + b"}" * levels


def _add(*items: Any, **extra: Any) -> dict[str, Any]:
    return {"op": "add", "index": "docs", "items": list(items), **extra}


# (name, key, value, expected message fragment, expected item)
BAD_COMMANDS: list[tuple[str, bytes | None, Any, str, int | None]] = [
    ("empty value", b"docs", b"", "empty", None),
    ("undecodable JSON", b"docs", b'{"op": "add", ', "not valid JSON", None),
    ("not UTF-8", b"docs", b'{"op": "\xff"}', "not valid JSON", None),
    ("not an object", b"docs", b"[1, 2]", "an array", None),
    ("unknown op", b"docs", {"op": "explode", "index": "docs"}, "unknown op", None),
    ("no op", b"docs", {"index": "docs"}, "needs an op", None),
    ("missing index", b"docs", {"op": "drop"}, "index", None),
    ("key differs from index", b"other", {"op": "drop", "index": "docs"}, "record key", None),
    ("no key", None, {"op": "drop", "index": "docs"}, "no key", None),
    ("bad index name", b"-docs", {"op": "drop", "index": "-docs"}, "index", None),
    ("index name too long", b"d" * 129, {"op": "drop", "index": "d" * 129}, "index", None),
    ("unknown field", b"docs", {"op": "drop", "index": "docs", "tpyo": 1}, "'tpyo'", None),
    ("unknown item field", b"docs", _add(_ITEM, {**_ITEM, "vectr": [1]}), "'vectr'", 1),
    ("no items", b"docs", _add(), "items", None),
    ("empty id", b"docs", _add(_ITEM, {**_ITEM, "id": ""}), "items[1].id", 1),
    ("id not a string", b"docs", _add({**_ITEM, "id": 7}), "items[0].id", 0),
    ("id too long", b"docs", _add(_ITEM, {**_ITEM, "id": "é" * 300}), "(300 characters)): id of 600 bytes is over the limit 512 (max_id_bytes)", 1),
    ("both vectors", b"docs", _add({**_ITEM, "vector_b64": b64([1, 2])}), "got both", 0),
    ("neither vector", b"docs", _add(_ITEM, {"id": "b"}), "got neither", 1),
    ("b64 not float32", b"docs", _add({"id": "a", "vector_b64": "AAAAAAAA"}), "multiple of 4", 0),
    ("b64 not base64", b"docs", _add({"id": "a", "vector_b64": "AA*A"}), "base64", 0),
    ("NaN via b64", b"docs", _add(_ITEM, {"id": "b", "vector_b64": b64([1, np.nan])}), "NaN", 1),
    ("Inf via b64", b"docs", _add({"id": "a", "vector_b64": b64([np.inf, 1])}), "NaN", 0),
    ("beyond float32", b"docs", _add(_ITEM, {"id": "b", "vector": [1e39, 1.0]}), "NaN", 1),
    ("string element", b"docs", _add(_ITEM, {"id": "b", "vector": [1.0, "2"]}), "numbers", 1),
    ("bool element", b"docs", _add({"id": "a", "vector": [0.5, True]}), "numbers", 0),
    ("too many items", b"docs", _add(*[_ITEM] * 10_001), "10001 items", None),
    ("too many dims", b"docs", _add({"id": "a", "vector": [1.0] * 4097}), "4097 dimensions", 0),
    ("too many b64 dims", b"docs", _add({"id": "a", "vector_b64": b64([1] * 4097)}), "4097", 0),
    ("metadata too big", b"docs", _add({**_ITEM, "metadata": {"t": "x" * 70_000}}), "metadata of 70008 bytes is over the limit 65536 (max_metadata_bytes)", 0),
    ("metadata not an object", b"docs", _add(_ITEM, {**_ITEM, "metadata": [1]}), "metadata", 1),
    ("negative version", b"docs", _add({**_ITEM, "version": -1}), "version", 0),
    ("version beyond int64", b"docs", _add({**_ITEM, "version": 2**63}), "version", 0),
    ("fractional version", b"docs", _add({**_ITEM, "version": 1.5}), "version", 0),
    ("delete without ids", b"docs", {"op": "delete", "index": "docs", "ids": []}, "ids", None),
    ("delete empty id", b"docs", {"op": "delete", "index": "docs", "ids": ["a", ""]}, "ids[1]", 1),
    ("delete id too long", b"docs", {"op": "delete", "index": "docs", "ids": ["a", "i" * 513]}, "ids[1]: id of 513 bytes is over the limit 512 (max_id_bytes)", 1),
    ("too many ids", b"docs", {"op": "delete", "index": "docs", "ids": ["a"] * 10_001}, "ids", None),
    ("create without dim", b"docs", {"op": "create", "index": "docs"}, "dim", None),
    ("create dim 0", b"docs", {"op": "create", "index": "docs", "dim": 0}, "dim", None),
    ("create dim over limit", b"docs", {"op": "create", "index": "docs", "dim": 5000}, "dim", None),
    ("create unknown space", b"docs", {"op": "create", "index": "docs", "dim": 2, "space": "l3"}, "space", None),
    ("self merge", b"docs", {"op": "merge", "index": "docs", "dest": "docs"}, "itself", None),
    ("merge bad dest", b"docs", {"op": "merge", "index": "docs", "dest": "../x"}, "dest", None),
    ("import not s3", b"docs", {"op": "import", "index": "docs", "source": "/etc/passwd"}, "source", None),
    ("merge_in export escapes", b"docs", {"op": "merge_in", "index": "docs", "source_index": "s", "export": "a/../../b", "merge_id": "m", "origin_partition": 0, "origin_offset": 0}, "export", None),
    ("bool for an integer", b"docs", {"op": "delete", "index": "docs", "ids": ["a"], "version": True}, "version", None),
    ("metadata nested past the limit", b"docs", _add(_ITEM, {**_ITEM, "metadata": nest(30)}), "items[1].metadata.a is nested deeper than the limit of 32 levels", None),
    ("metadata nested past orjson's writer", b"docs", b'{"op":"add","index":"docs","items":[{"id":"a","vector":[1],"metadata":' + deep_bytes(300) + b"}]}", "items[0].metadata.a is nested deeper than the limit of 32", None),
    ("array nested past the limit", b"docs", _add({"id": "a", "vector": nest(40, "array")}), "items[0].vector[0] is nested deeper", None),
    ("body nested past the parser", b"docs", b"[" * 2000 + b"]" * 2000, "message is nested deeper than the limit of 32", None),
    ("unknown field nested deep", b"docs", {"op": "drop", "index": "docs", "x": nest(40)}, "x.a.a.a is nested deeper", None),
    ("create M over its bound", b"docs", {"op": "create", "index": "docs", "dim": 2, "M": 4096}, "M must be smaller than or equal to 512", None),
    ("create ef_construction over its bound", b"docs", {"op": "create", "index": "docs", "dim": 2, "ef_construction": 10**6}, "ef_construction", None),
    ("create search_k over its bound", b"docs", {"op": "create", "index": "docs", "dim": 2, "search_k": 10**8}, "search_k", None),
    ("create hint over its bound", b"docs", {"op": "create", "index": "docs", "dim": 2, "max_elements_hint": 2**33}, "max_elements_hint", None),
    ("create dim over its bound", b"docs", {"op": "create", "index": "docs", "dim": 2**17}, "dim", None),
    ("add via_alias without origin", b"docs", {**_add(_ITEM), "via_alias": "live"}, "missing dependency origin for via_alias", None),
    ("create via_alias without origin", b"docs", {"op": "create", "index": "docs", "dim": 2, "via_alias": "live"}, "via_alias", None),
    ("import via_alias without origin", b"docs", {"op": "import", "index": "docs", "source": "s3://bkt/imports/x.npy", "via_alias": "live"}, "via_alias", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "fragment", "item"),
    [case[1:] for case in BAD_COMMANDS],
    ids=[case[0] for case in BAD_COMMANDS],
)
def test_bad_command_is_invalid_request(
    key: bytes | None, value: Any, fragment: str, item: int | None
) -> None:
    with pytest.raises(InvalidRequest) as err:
        command(value, key=key)
    assert type(err.value) is InvalidRequest
    assert err.value.code == "invalid_request"
    assert fragment in err.value.message
    assert err.value.item == item
    assert err.value.to_wire()["code"] == "invalid_request"


def test_message_over_the_byte_limit_is_refused_before_parsing() -> None:
    small = MessageLimits(max_message_bytes=100)
    value = orjson.dumps(_add(*[_ITEM] * 10))
    with pytest.raises(InvalidRequest, match="over the limit of 100"):
        decode_command(b"docs", value, [], limits=small)


def test_configured_limits_override_the_defaults_both_ways() -> None:
    big = MessageLimits(max_items=20_000, max_dim=8192, max_id_bytes=2048)
    body = _add(*[{"id": "x" * 1000, "vector": [1.0] * 5000}] * 2)
    c = decode_command(b"docs", orjson.dumps(body), [], limits=big)
    assert len(c.items) == 2 and c.items[0].vector.shape == (5000,)
    small = MessageLimits(max_items=1)
    with pytest.raises(InvalidRequest, match="2 items is over the limit 1"):
        decode_command(b"docs", orjson.dumps(_add(_ITEM, _ITEM)), [], limits=small)
    with pytest.raises(ValueError):
        MessageLimits(max_k=0)


BAD_QUERIES: list[tuple[str, Any, str]] = [
    ("undecodable JSON", b"{nope", "not valid JSON"),
    ("unknown op", {"op": "add", "index": "docs", "vector": [1.0]}, "unknown op"),
    ("no vector", {"index": "docs"}, "vector"),
    ("both vectors", {"index": "docs", "vector": [1.0], "vector_b64": b64([1.0])}, "vector"),
    ("k too large", {"index": "docs", "vector": [1.0], "k": 10_001}, "k 10001"),
    ("k zero", {"index": "docs", "vector": [1.0], "k": 0}, "k"),
    ("NaN via b64", {"index": "docs", "vector_b64": b64([np.nan])}, "NaN"),
    ("string element", {"index": "docs", "vector": ["1"]}, "numbers"),
    ("filter not an object", {"index": "docs", "vector": [1.0], "filter": [1]}, "filter"),
    ("negative deadline", {"index": "docs", "vector": [1.0], "deadline_ms": -5}, "deadline_ms"),
    ("get without ids", {"op": "get", "index": "docs"}, "ids"),
    ("get bad encoding", {"op": "get", "index": "docs", "ids": ["a"], "vector_encoding": "hex"}, "vector_encoding"),
    ("get too many ids", {"op": "get", "index": "docs", "ids": ["a"] * 10_001}, "ids"),
    ("stats unknown field", {"op": "stats", "index": "docs", "k": 3}, "'k'"),
    ("index differs from key", {"index": "other", "vector": [1.0]}, "record key"),
    ("vector and vectors", {"index": "docs", "vector": [1.0], "vectors": [[1.0]]}, "vector, vectors"),
    ("empty vectors", {"index": "docs", "vectors": []}, "vectors"),
    ("ragged vectors", {"index": "docs", "vectors": [[1.0, 2.0], [1.0]]}, "vector 1 has 1 dimensions"),
    ("ragged vectors_b64", {"index": "docs", "vectors_b64": [b64([1.0]), b64([1.0, 2.0])]}, "vector 1 has 2"),
    ("NaN in vectors", {"index": "docs", "vectors": [[1.0], [float("nan")]]}, "vector 1"),
    ("bad base64 in vectors_b64", {"index": "docs", "vectors_b64": [b64([1.0]), "!!!!"]}, "vector 1"),
    ("too many vectors", {"index": "docs", "vectors_b64": [b64([1.0])] * 1025}, "1025 vectors"),
    ("vectors not arrays", {"index": "docs", "vectors": [1.0, 2.0]}, "vectors"),
    ("filter nested past the limit", {"index": "docs", "vector": [1.0], "filter": nest(32)}, "filter.a.a.a is nested deeper than the limit of 32 levels"),
    ("filter nested past orjson's writer", b'{"index":"docs","vector":[1.0],"filter":' + deep_bytes(300) + b"}", "filter.a.a.a is nested deeper than the limit of 32"),
    ("query nested past the parser", b'{"index":"docs","vector":[1.0],"filter":' + deep_bytes(1100) + b"}", "message is nested deeper than the limit of 32"),
    ("filter with too many fields", {"index": "docs", "vector": [1.0], "filter": {f"f{i}": i for i in range(65)}}, "filter of 65 fields is over the limit 64 (max_filter_keys)"),
    ("filter too large", {"index": "docs", "vector": [1.0], "filter": {"t": "x" * 20_000}}, "filter of 20008 bytes is over the limit 16384 (max_filter_bytes)"),
    ("ef over its bound", {"index": "docs", "vector": [1.0], "ef": 100_001}, "ef must be smaller than or equal to 100000"),
    ("get too many vectors", {"op": "get", "index": "docs", "ids": ["a"] * 1_001}, "1001 ids with include_vectors is over the limit 1000 (max_get_vectors)"),
    ("search too many vectors", {"index": "docs", "vectors": [[1.0]] * 3, "k": 400, "include_vectors": True}, "k 400 times 3 query vectors with include_vectors is over the limit 1000 (max_get_vectors)"),
    ("search too many hits", {"index": "docs", "vectors": [[1.0]] * 11, "k": 10_000}, "k 10000 times 11 query vectors is over the limit 100000 (max_hits)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "fragment"), [c[1:] for c in BAD_QUERIES], ids=[c[0] for c in BAD_QUERIES]
)
def test_bad_query_is_invalid_request(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        query(value)
    assert type(err.value) is InvalidRequest and fragment in err.value.message
    # the reply headers alone still say where the error reply goes
    assert reply_to_from_headers(HEADERS) == REPLY_TO


def test_a_search_of_max_hits_is_taken() -> None:
    got = query({"index": "docs", "vectors": [[1.0]] * 10, "k": 10_000})
    assert isinstance(got, SearchQuery) and got.k * len(got.vectors) == 100_000


def _meta(metadata: object) -> object:
    """An item's metadata as the object it stands for (decoded items carry its JSON)."""
    if isinstance(metadata, MetadataJson):
        return orjson.loads(metadata.json)
    return metadata


def test_a_decoded_items_metadata_holds_its_json_not_a_tree_of_objects() -> None:
    """A record of metadata made of empty containers would weigh about 20 times its bytes
    as parsed objects while its batch waits for the apply: decoded, each item keeps its
    metadata's compact JSON (the bytes the index stores), which forwards unchanged."""
    import tracemalloc

    meta = {"a": [[]] * 6000, "b": [{}] * 6000}
    body = orjson.dumps(_add(*({**_ITEM, "id": f"i{n}", "metadata": meta} for n in range(100))))
    tracemalloc.start()
    try:
        c = command(body)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * len(body), (held, len(body))
    item = c.items[0]
    assert isinstance(item.metadata, MetadataJson) and orjson.loads(item.metadata.json) == meta
    forwarded = orjson.loads(
        forward_value(c, index="docs#0", origin=Origin(0, 1, 0), positions=[0])
    )
    assert forwarded["items"][0]["metadata"] == meta


def test_nesting_up_to_the_limit_is_accepted() -> None:
    meta = nest(29)  # body, items, the item, then metadata's own 29 levels: 32
    assert _meta(command(_add({**_ITEM, "metadata": meta})).items[0].metadata) == meta
    assert query({"index": "docs", "vector": [1.0], "filter": nest(31)}).filter == nest(31)
    deeper = MessageLimits(max_json_depth=40)
    c = decode_command(
        b"docs", orjson.dumps(_add({**_ITEM, "metadata": nest(35)})), [], limits=deeper
    )
    assert _meta(c.items[0].metadata) == nest(35)
    with pytest.raises(ValueError, match="max_json_depth must be at most 254"):
        MessageLimits(max_json_depth=255)


def test_a_get_without_vectors_may_ask_for_up_to_max_ids() -> None:
    got = query({"op": "get", "index": "docs", "ids": ["a"] * 10_000, "include_vectors": False})
    assert isinstance(got, GetQuery) and len(got.ids) == 10_000


def test_errors_name_a_large_request_value_without_echoing_it() -> None:
    huge = "x" * 100_000
    for value, decode in (
        ({"op": huge, "index": "docs"}, command),
        ({"op": "delete", "index": "docs", "ids": ["a"], huge: 1}, command),
        (_add({"id": huge, "vector": [1.0]}), command),
        ({"op": huge, "index": "docs"}, query),
    ):
        with pytest.raises(InvalidRequest) as err:
            decode(value)
        # the string's own length, not its repr's
        assert len(err.value.message) < 500 and "(100000 characters)" in err.value.message
    with pytest.raises(InvalidRequest, match="record key") as err:
        command({"op": "drop", "index": "docs"}, key=huge.encode())
    assert len(err.value.message) < 500


def test_query_without_reply_headers_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="kafka_replyTopic"):
        query({"index": "docs", "vector": [1.0]}, headers=[])


# -- reply headers -----------------------------------------------------------------------


def test_reply_partition_is_read_as_spring_sends_it_and_as_decimal() -> None:
    spring = [*HEADERS, ("kafka_replyPartition", (7).to_bytes(4, "big"))]
    assert reply_to_from_headers(spring) == ReplyTo("lhv.replies.t1", 7, b"corr-1")
    text = [*HEADERS, ("kafka_replyPartition", b"12")]
    assert reply_to_from_headers(text) == ReplyTo("lhv.replies.t1", 12, b"corr-1")
    four_digits = [*HEADERS, ("kafka_replyPartition", b"1234")]
    assert reply_to_from_headers(four_digits).partition == 1234  # type: ignore[union-attr]


def test_reply_headers_take_the_last_value_and_keep_binary_correlation_ids() -> None:
    headers = [
        ("kafka_replyTopic", b"lhv.replies.old"),
        ("kafka_correlationId", b"\x00\x01\xfe"),
        ("kafka_replyTopic", b"lhv.replies.new"),
    ]
    assert reply_to_from_headers(headers) == ReplyTo("lhv.replies.new", None, b"\x00\x01\xfe")


def test_no_reply_topic_means_no_reply() -> None:
    assert reply_to_from_headers([]) is None
    assert reply_to_from_headers([("kafka_correlationId", b"x")]) is None


@pytest.mark.parametrize(
    "headers",
    [
        [("kafka_replyTopic", b"lhv.replies.t")],
        [("kafka_replyTopic", b""), ("kafka_correlationId", b"c")],
        [("kafka_replyTopic", b"\xff"), ("kafka_correlationId", b"c")],
        [*HEADERS, ("kafka_replyPartition", (-1).to_bytes(4, "big", signed=True))],
        [*HEADERS, ("kafka_replyPartition", b"x1")],
        [*HEADERS, ("kafka_replyPartition", b"")],
    ],
    ids=["no correlation id", "empty topic", "topic not UTF-8", "negative", "junk", "empty"],
)
def test_bad_reply_headers_are_invalid_request(headers: list[tuple[str, bytes]]) -> None:
    with pytest.raises(InvalidRequest):
        reply_to_from_headers(headers)


def test_reply_headers_are_read_even_when_the_body_is_garbage() -> None:
    headers = [*HEADERS, ("kafka_replyPartition", b"\x00\x00\x00\x02")]
    with pytest.raises(InvalidRequest):
        command(b"\x00garbage", headers=headers)
    assert reply_to_from_headers(headers) == ReplyTo("lhv.replies.t1", 2, b"corr-1")


# -- replies and acks --------------------------------------------------------------------


def test_multi_vector_search_decodes_every_row_in_order() -> None:
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    json_body = {"index": "docs", "vectors": rows.tolist(), "k": 3}
    b64_body = {"index": "docs", "vectors_b64": [b64(r) for r in rows], "k": 3}
    for body in (json_body, b64_body):  # valid for producers using the published schemas
        published("search")(body)
        published("query")(body)
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        published("search")(dict(json_body, vector=[1.0, 0.0]))
    from_json = query(json_body)
    from_b64 = query(b64_body)
    single = query({"index": "docs", "vector": [1.0, 0.0]})
    for q in (from_json, from_b64):
        assert isinstance(q, SearchQuery) and q.multi and q.k == 3
        assert q.vectors.dtype == np.float32 and np.array_equal(q.vectors, rows)
    assert not single.multi and single.vectors.shape == (1, 2)
    # the limit on vectors per request is configurable
    few = MessageLimits(max_queries=2)
    body = orjson.dumps({"index": "docs", "vectors": rows.tolist()})
    with pytest.raises(InvalidRequest, match="3 vectors is over the limit 2"):
        decode_query(b"docs", body, HEADERS, limits=few)


def test_multi_vector_search_reply_has_one_result_per_vector() -> None:
    q = query({"index": "docs", "vectors_b64": [b64([1.0, 0.0]), b64([0.0, 1.0])]})
    rows = [Columns(["a", "b"], [0.0, 0.5]), Columns([], [])]
    body = orjson.loads(encode_search_results(q, rows, applied_offset=7, took_ms=0.5))
    REPLY_SCHEMA(body)
    assert "hits" not in body
    assert body["results"] == [
        {"ids": ["a", "b"], "distances": [0.0, 0.5]},
        {"ids": [], "distances": []},
    ]
    with_meta = query(
        {"index": "docs", "vectors": [[1.0, 0.0]], "include_metadata": True}, key=b"docs"
    )
    rows = [Columns(["a"], [0.0], [{"t": 1}])]
    body = orjson.loads(encode_search_results(with_meta, rows, applied_offset=7, took_ms=0.5))
    REPLY_SCHEMA(body)
    assert body["results"] == [{"ids": ["a"], "distances": [0.0], "metadata": [{"t": 1}]}]
    one = query({"index": "docs", "vector": [1.0, 0.0]})
    two = [Columns(["a", "b"], [0.0, 0.5])]
    body = orjson.loads(encode_search_results(one, two, applied_offset=7, took_ms=0.5))
    assert "results" not in body and [h["id"] for h in body["hits"]] == ["a", "b"]


def test_search_vectors_come_as_b64_when_the_query_asks_vector_encoding_b64() -> None:
    stored = {"a": np.array([1.5, -2.0], dtype=np.float32)}
    one = query({"index": "docs", "vector": [1, 0], "include_vectors": True})
    assert one.vector_encoding == "json"
    packed = query(
        {"index": "docs", "vector": [1, 0], "include_vectors": True, "vector_encoding": "b64"}
    )
    rows = [Columns(["a", "gone"], [0.0, 0.5])]
    body = orjson.loads(
        encode_search_results(packed, rows, applied_offset=1, took_ms=0, vectors=stored)
    )
    REPLY_SCHEMA(body)
    assert [set(h) for h in body["hits"]] == [{"id", "distance", "vector_b64"}] * 2
    assert np.frombuffer(base64.b64decode(body["hits"][0]["vector_b64"]), "<f4").tolist() == [
        1.5,
        -2.0,
    ]
    assert body["hits"][1]["vector_b64"] is None  # deleted between the search and the read
    multi = query(
        {"index": "docs", "vectors": [[1, 0]], "include_vectors": True, "vector_encoding": "b64"}
    )
    body = orjson.loads(
        encode_search_results(multi, rows, applied_offset=1, took_ms=0, vectors=stored)
    )
    REPLY_SCHEMA(body)
    assert body["results"][0]["vectors_b64"] == [b64(stored["a"]), None]
    assert "vectors" not in body["results"][0]
    merged = merge_search_reply(
        "docs",
        2,
        [(0, {"hits": [{"id": "a", "distance": 0.0, "vector": [1.5, -2.0]}], "applied_offset": 3})],
        k=2,
        multi=False,
        include_metadata=False,
        include_vectors=True,
        vector_encoding="b64",
    )
    assert merged["hits"] == [{"id": "a", "distance": 0.0, "vector_b64": b64(stored["a"])}]


def test_correlation_ids_are_text_when_utf8_else_hex() -> None:
    assert correlation_text(b"corr-1") == "corr-1"
    assert correlation_text("é".encode()) == "é"
    assert correlation_text(b"\xff\x00\x10") == "ff0010"


def _hit(id_: str, distance: float, metadata: Any = None) -> Any:
    return SimpleNamespace(id=id_, distance=np.float32(distance), metadata=metadata)


def test_search_reply_is_schema_valid_and_has_metadata_only_when_asked() -> None:
    q = query({"index": "docs", "vector": [1.0, 0.0], "include_metadata": True, "request_id": "q"})
    hits = [_hit("a", 0.0, {"t": 1}), _hit("b", 0.5)]
    body = orjson.loads(encode_search_reply(q, hits, applied_offset=41, took_ms=1.23456))
    REPLY_SCHEMA(body)
    assert body == {
        "correlation_id": "corr-1",
        "status": "ok",
        "op": "search",
        "index": "docs",
        "hits": [
            {"id": "a", "distance": 0.0, "metadata": {"t": 1}},
            {"id": "b", "distance": 0.5, "metadata": None},
        ],
        "applied_offset": 41,
        "took_ms": 1.235,
        "request_id": "q",
    }
    plain = SearchReply(
        reply_to=REPLY_TO,
        index="docs",
        hits=hits,
        include_metadata=False,
        applied_offset=0,
        took_ms=0.1,
    )
    assert all("metadata" not in h for h in orjson.loads(plain.encode())["hits"])


def test_get_reply_vectors_as_json_or_b64_are_schema_valid() -> None:
    items = [
        SimpleNamespace(
            id="a", vector=np.array([1.5, -2], np.float32), metadata={"k": 1}, clock=(3, 10, 0)
        ),
        SimpleNamespace(id="b", vector=None, metadata=None, clock=None),
    ]
    g = query({"op": "get", "index": "docs", "ids": ["a", "b"]})
    body = orjson.loads(encode_get_reply(g, items, applied_offset=5, took_ms=0.5))
    REPLY_SCHEMA(body)
    assert body["items"] == [
        {"id": "a", "vector": [1.5, -2.0], "metadata": {"k": 1}, "version": 3},
        {"id": "b", "metadata": None},
    ]
    reply = GetReply(
        reply_to=REPLY_TO,
        index="docs",
        items=items[:1],
        include_vectors=True,
        include_metadata=False,
        vector_encoding="b64",
        applied_offset=5,
        took_ms=0.5,
    )
    body = orjson.loads(reply.encode())
    REPLY_SCHEMA(body)
    assert body["items"] == [{"id": "a", "vector_b64": b64([1.5, -2]), "version": 3}]
    np.testing.assert_array_equal(
        decode_vector_b64(body["items"][0]["vector_b64"], max_dim=2), [1.5, -2]
    )


def test_stats_reply_is_schema_valid() -> None:
    s = query({"op": "stats", "index": "docs"})
    stats = {
        "count": 3,
        "deleted": 1,
        "dim": 2,
        "space": "cosine",
        "engine": "hnsw",
        "params": {"dim": 2, "M": 16},
        "applied_offset": 12,
        "checkpoint_offset": 10,
        "slots": 4,
    }
    body = orjson.loads(encode_stats_reply(s, stats, took_ms=2))
    REPLY_SCHEMA(body)
    assert body["count"] == 3 and body["op"] == "stats" and body["status"] == "ok"
    assert orjson.loads(StatsReply(reply_to=REPLY_TO, index="docs", stats={}, took_ms=0).encode())


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("bad", item=3),
        IndexNotFound("no such index"),
        DeadlineExceeded("late"),
        error_for_code("not_ready", "restoring"),
    ],
    ids=lambda e: e.code,
)
def test_error_reply_carries_the_code_of_the_error_class(error: LhvError) -> None:
    raw = encode_error_reply(REPLY_TO, "docs", error, took_ms=0.2, op="search")
    body = orjson.loads(raw)
    REPLY_SCHEMA(body)
    assert body["status"] == "error" and body["error"]["code"] == error.code
    assert body["error"]["message"] == error.message
    assert body["error"].get("item") == error.item
    blind = ErrorReply(reply_to=ReplyTo("t", None, b"\xff"), index="", error=error, took_ms=0)
    body = orjson.loads(blind.encode())
    REPLY_SCHEMA(body)
    assert body["correlation_id"] == "ff" and "op" not in body


def test_reply_schema_requires_an_error_on_error_status() -> None:
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        REPLY_SCHEMA({"correlation_id": "c", "status": "error", "index": "d", "took_ms": 1})


@pytest.mark.parametrize(
    ("op", "fields", "needed"),
    [
        ("search", {"hits": [], "applied_offset": 3}, ("hits", "applied_offset")),
        ("get", {"items": [], "applied_offset": 3}, ("items", "applied_offset")),
        (
            "stats",
            {
                "count": 1,
                "deleted": 0,
                "dim": 2,
                "space": "l2",
                "engine": "hnsw",
                "params": {},
                "applied_offset": 3,
                "checkpoint_offset": -1,
            },
            ("count", "deleted", "dim", "params", "applied_offset", "checkpoint_offset"),
        ),
    ],
)
def test_reply_schema_requires_the_fields_design_names_for_each_ok_reply(
    op: str, fields: dict[str, Any], needed: tuple[str, ...]
) -> None:
    body = {"correlation_id": "c", "status": "ok", "op": op, "index": "d", "took_ms": 1}
    REPLY_SCHEMA({**body, **fields})
    for name in needed:
        with pytest.raises(fastjsonschema.JsonSchemaValueException):
            REPLY_SCHEMA({**body, **{k: v for k, v in fields.items() if k != name}})


def test_merged_replies_of_a_sharded_index_are_schema_valid() -> None:
    member = {"dim": 2, "space": "l2", "engine": "hnsw", "params": {"M": 16}}
    answers = [
        (0, {**member, "count": 2, "deleted": 0, "applied_offset": 4, "checkpoint_offset": 3}),
        (1, {**member, "count": 1, "deleted": 1, "applied_offset": 9, "checkpoint_offset": -1}),
    ]
    stats = merge_stats_reply("docs", 2, answers)
    REPLY_SCHEMA({"correlation_id": "c", "took_ms": 1, **stats})
    assert (stats["applied_offset"], stats["checkpoint_offset"]) == (4, -1)
    nobody = merge_stats_reply("docs", 2, [], missing=[0, 1])
    REPLY_SCHEMA({"correlation_id": "c", "took_ms": 1, **nobody})
    hits = {"hits": [{"id": "a", "distance": 0.5}], "applied_offset": 4}
    search = merge_search_reply(
        "docs", 2, [(0, hits)], k=3, multi=False, include_metadata=False, missing=[1]
    )
    REPLY_SCHEMA({"correlation_id": "c", "took_ms": 1, **search})


def test_acks_are_schema_valid() -> None:
    ok = SimpleNamespace(
        reply_to=REPLY_TO,
        offset=17,
        index="docs",
        op="add",
        request_id="r1",
        applied=2,
        skipped=1,
        error=None,
    )
    body = orjson.loads(encode_ack(ok))
    ACK_SCHEMA(body)
    assert body == {
        "correlation_id": "corr-1",
        "status": "ok",
        "op": "add",
        "index": "docs",
        "request_id": "r1",
        "offset": 17,
        "applied": 2,
        "skipped": 1,
    }
    rejected = Ack(
        reply_to=REPLY_TO, offset=18, error=InvalidRequest("bad item", item=0), partition=3
    )
    body = orjson.loads(rejected.encode())
    ACK_SCHEMA(body)
    assert body["status"] == "error" and body["error"]["item"] == 0 and body["partition"] == 3
    assert body["applied"] == 0 and body["index"] == "" and body["request_id"] is None


def test_every_limit_is_read_from_its_lhv_variable_and_shared_names_set_both() -> None:
    from worker.service.config import WorkerConfig

    env = {
        "LHV_MAX_JSON_DEPTH": "20",
        "LHV_MAX_FILTER_KEYS": "8",
        "LHV_MAX_GET_VECTORS": "50",
        "LHV_MAX_HITS": "5000",
        "LHV_MAX_DIM": "1024",
        "LHV_MAX_ELEMENTS_HINT": "10000",
    }
    config = WorkerConfig.from_env(env)
    assert (config.limits.max_json_depth, config.limits.max_filter_keys) == (20, 8)
    assert config.limits.max_get_vectors == 50
    assert config.limits.max_hits == 5000
    assert config.limits.max_dim == config.index_limits.max_dim == 1024
    assert config.index_limits.max_elements_hint == 10_000
    assert WorkerConfig.from_env({}).limits == MessageLimits()
