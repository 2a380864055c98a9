"""The wire format: published schemas, decoding into dataclasses, the limits and rules on
bad input, Spring reply headers, the reply-topic policy, and encoded replies and acks
checked against their schemas."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastjsonschema
import numpy as np
import orjson
import pytest

from lhv_index import Hit, Item, MetadataJson
from lhv_index.errors import (
    DeadlineExceeded,
    DimMismatch,
    IndexNotFound,
    InvalidRequest,
    LhvError,
    NotReady,
    error_for_code,
)
from worker.wire.commands import (
    AddCommand,
    CreateCommand,
    DeleteCommand,
    DropCommand,
    ImportCommand,
    MergeCommand,
    decode_command,
)
from worker.wire.headers import ReplyTo, build_reply_headers, dlq_headers, reply_to_from_headers
from worker.wire.limits import MessageLimits
from worker.wire.queries import GetQuery, SearchQuery, StatsQuery, decode_query
from worker.wire.replies import (
    encode_ack,
    encode_error_reply,
    encode_get_reply,
    encode_search_reply,
    encode_stats_reply,
)
from worker.wire.schemas import load_schema
from worker.wire.topics import ReplyTopicPolicy

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.schema.json"))
LIMITS = MessageLimits()
REPLY_HEADERS = [("kafka_replyTopic", b"lhv.replies.me"), ("kafka_correlationId", b"cid-1")]


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def cmd(body: dict[str, Any], *, key: str | None = None, headers: Any = ()) -> Any:
    key_b = (key if key is not None else body.get("index", "docs")).encode()
    return decode_command(key_b, orjson.dumps(body), list(headers), limits=LIMITS)


def query(body: dict[str, Any], *, headers: Any = REPLY_HEADERS) -> Any:
    return decode_query(
        body.get("index", "docs").encode(), orjson.dumps(body), list(headers), limits=LIMITS
    )


def _local(uri: str) -> Any:
    """Resolve a `$ref` between the published schemas (`https://lhv.dev/schemas/<file>`)
    from the files, never the network."""
    return json.loads((SCHEMA_DIR / uri.rsplit("/", 1)[-1]).read_text())


def compile_schema(schema: dict[str, Any]) -> Any:
    return fastjsonschema.compile(schema, handlers={"https": _local, "http": _local})


def validator(name: str) -> Any:
    return compile_schema(load_schema(name))


# -- schemas -----------------------------------------------------------------------------


def test_there_is_a_schema_for_every_message() -> None:
    names = {p.name.removesuffix(".schema.json") for p in SCHEMA_FILES}
    expected = {"create", "drop", "add", "delete", "merge", "import", "merge_in", "merge_done"}
    expected |= {"search", "get", "stats", "reply", "ack", "dlq_headers"}
    assert expected <= names


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_every_schema_is_valid_draft_07(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_every_schema_compiles(path: Path) -> None:
    check = compile_schema(json.loads(path.read_text()))
    assert callable(check)


def test_published_search_schema_checks_vector_elements_the_runtime_leaves_to_numpy() -> None:
    body = {"op": "search", "index": "docs", "vector": ["x", 1]}
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        validator("search")(body)
    with pytest.raises(InvalidRequest, match="numbers"):
        query(body)


# -- good messages -----------------------------------------------------------------------


def test_create_decodes_with_its_params() -> None:
    c = cmd({"op": "create", "index": "docs", "dim": 3, "space": "l2", "M": 8})
    assert isinstance(c, CreateCommand)
    assert c.index == "docs"
    assert {k: c.params[k] for k in ("dim", "space", "M")} == {"dim": 3, "space": "l2", "M": 8}
    assert c.reply_to is None


def test_add_decodes_json_and_b64_vectors_metadata_and_versions() -> None:
    c = cmd(
        {
            "op": "add",
            "index": "docs",
            "request_id": "r1",
            "items": [
                {"id": "a", "vector": [1, 2, 3], "metadata": {"k": "v"}, "version": 4},
                {"id": "b", "vector_b64": b64([0.5, 0.25, -1])},
                {"id": "c", "vector": [0, 0, 1], "metadata": None},
            ],
        },
        headers=REPLY_HEADERS,
    )
    assert isinstance(c, AddCommand)
    assert c.request_id == "r1"
    assert [i.id for i in c.items] == ["a", "b", "c"]
    assert c.items[0].vector.dtype == np.float32
    np.testing.assert_array_equal(c.items[0].vector, [1, 2, 3])
    np.testing.assert_array_equal(c.items[1].vector, [0.5, 0.25, -1])
    assert c.items[0].metadata == MetadataJson(b'{"k":"v"}') and c.items[0].version == 4
    assert c.items[1].metadata is None and c.items[1].version == 0
    assert c.items[2].metadata is None
    assert c.reply_to == ReplyTo("lhv.replies.me", None, b"cid-1")


def test_delete_drop_merge_import_decode() -> None:
    d = cmd({"op": "delete", "index": "docs", "ids": ["a", "b"], "version": 2})
    assert isinstance(d, DeleteCommand) and d.ids == ["a", "b"] and d.version == 2
    assert isinstance(cmd({"op": "drop", "index": "docs"}), DropCommand)
    m = cmd({"op": "merge", "index": "docs", "dest": "other", "clear_source": True})
    assert isinstance(m, MergeCommand) and m.dest == "other" and m.clear_source
    i = cmd({"op": "import", "index": "docs", "source": "s3://bucket/x.npy"})
    assert isinstance(i, ImportCommand) and i.source == "s3://bucket/x.npy"


def test_search_decodes_with_defaults_and_options() -> None:
    q = query({"index": "docs", "vector": [1, 0, 0]})
    assert isinstance(q, SearchQuery)
    assert q.vectors.shape == (1, 3) and q.vectors.dtype == np.float32
    assert (q.k, q.ef, q.filter, q.min_offset, q.deadline_ms) == (10, None, None, None, None)
    q2 = query(
        {
            "op": "search",
            "index": "docs",
            "vector_b64": b64([1, 2]),
            "k": 3,
            "ef": 50,
            "filter": {"lang": "en"},
            "include_metadata": True,
            "min_offset": 41,
            "deadline_ms": 1_700_000_000_000,
        }
    )
    assert isinstance(q2, SearchQuery)
    assert (q2.k, q2.ef, q2.filter, q2.include_metadata) == (3, 50, {"lang": "en"}, True)
    assert (q2.min_offset, q2.deadline_ms) == (41, 1_700_000_000_000)
    assert q2.reply_to.correlation_id == b"cid-1"


def test_get_and_stats_decode() -> None:
    g = query({"op": "get", "index": "docs", "ids": ["a"], "vector_encoding": "b64"})
    assert isinstance(g, GetQuery) and g.ids == ["a"] and g.vector_encoding == "b64"
    assert g.include_vectors and g.include_metadata
    s = query({"op": "stats", "index": "docs"})
    assert isinstance(s, StatsQuery) and s.index == "docs"


# -- bad input ---------------------------------------------------------------------------

BAD_COMMANDS: list[tuple[str, bytes | None, bytes | None, str]] = [
    ("empty value", b"docs", b"", "empty"),
    ("no value", b"docs", None, "empty"),
    ("not JSON", b"docs", b"{nope", "not valid JSON"),
    ("not an object", b"docs", b"[1, 2]", "JSON object"),
    ("no key", None, b'{"op": "drop", "index": "docs"}', "no key"),
    ("key not UTF-8", b"\xff\xfe", b'{"op": "drop", "index": "docs"}', "not UTF-8"),
    ("index differs from key", b"other", b'{"op": "drop", "index": "docs"}', "differs"),
    ("unknown op", b"docs", b'{"op": "explode", "index": "docs"}', "unknown op"),
    ("no op", b"docs", b'{"index": "docs"}', "op"),
    ("bad index name", b"../x", b'{"op": "drop", "index": "../x"}', "drop"),
    ("unknown field", b"docs", b'{"op": "drop", "index": "docs", "extra": 1}', "drop"),
    ("create without dim", b"docs", b'{"op": "create", "index": "docs"}', "dim"),
    ("create with bad space", b"docs", b'{"op": "create", "index": "docs", "dim": 3, "space": "x"}', "create"),
    ("add without items", b"docs", b'{"op": "add", "index": "docs"}', "items"),
    ("add item without vector", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "a"}]}', "add"),
    ("add item with empty id", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "", "vector": [1]}]}', "add"),
    ("vector of strings", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "a", "vector": ["a", "b"]}]}', "numbers"),
    ("nested vector", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "a", "vector": [[1, 2]]}]}', "vector"),
    ("bad base64", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "a", "vector_b64": "@@@"}]}', "add"),
    ("base64 not whole floats", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "a", "vector_b64": "AAAA AA=="}]}', "add"),
    ("metadata not an object", b"docs", b'{"op": "add", "index": "docs", "items": [{"id": "a", "vector": [1], "metadata": [1]}]}', "add"),
    ("delete without ids", b"docs", b'{"op": "delete", "index": "docs"}', "ids"),
    ("negative version", b"docs", b'{"op": "delete", "index": "docs", "ids": ["a"], "version": -1}', "delete"),
    ("self merge", b"docs", b'{"op": "merge", "index": "docs", "dest": "docs"}', "itself"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [pytest.param(k, v, m, id=what) for what, k, v, m in BAD_COMMANDS],
)
def test_bad_command_raises_invalid_request_naming_the_problem(
    key: bytes | None, value: bytes | None, match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        decode_command(key, value, [], limits=LIMITS)
    assert info.value.code in ("invalid_request", "dim_mismatch")
    assert info.value.message


def test_nan_and_infinity_in_a_b64_vector_are_rejected_with_the_item_position() -> None:
    items = [{"id": "ok", "vector": [1, 2]}, {"id": "bad", "vector_b64": b64([1, float("nan")])}]
    with pytest.raises(InvalidRequest, match="NaN") as info:
        cmd({"op": "add", "index": "docs", "items": items})
    assert info.value.item == 1 and "'bad'" in info.value.message
    with pytest.raises(InvalidRequest, match="infinite"):
        cmd({"op": "add", "index": "docs", "items": [{"id": "x", "vector_b64": b64([np.inf])}]})


def test_limits_are_enforced_before_anything_is_built() -> None:
    small = MessageLimits(
        max_message_bytes=10_000,
        max_items=2,
        max_dim=4,
        max_metadata_bytes=20,
        max_id_bytes=5,
        max_k=5,
        max_ids=2,
    )

    def c(body: dict[str, Any]) -> Any:
        return decode_command(b"docs", orjson.dumps(body), [], limits=small)

    def q(body: dict[str, Any]) -> Any:
        return decode_query(b"docs", orjson.dumps(body), REPLY_HEADERS, limits=small)

    item = {"id": "a", "vector": [1, 2]}
    cases = [
        (lambda: c({"op": "add", "index": "docs", "items": [item] * 3}), "3 items"),
        (lambda: c({"op": "add", "index": "docs", "items": [{"id": "a", "vector": [1] * 5}]}), "dimensions"),
        (lambda: c({"op": "add", "index": "docs", "items": [{"id": "a", "vector_b64": b64([1] * 5)}]}), "dimensions"),
        (lambda: c({"op": "add", "index": "docs", "items": [{**item, "metadata": {"k": "x" * 30}}]}), r"metadata.* over"),
        (lambda: c({"op": "add", "index": "docs", "items": [{**item, "id": "abcdef"}]}), r"id.* over"),
        (lambda: c({"op": "delete", "index": "docs", "ids": ["a", "b", "c"]}), "3 ids"),
        (lambda: c({"op": "create", "index": "docs", "dim": 5}), "dim 5"),
        (lambda: q({"index": "docs", "vector": [1], "filter": {"x": "y" * 20_000}}), "bytes"),
        (lambda: q({"index": "docs", "vector": [1], "k": 6}), "k 6"),
        (lambda: q({"op": "get", "index": "docs", "ids": ["a", "b", "c"]}), "3 ids"),
    ]  # fmt: skip
    for call, match in cases:
        with pytest.raises(InvalidRequest, match=match):
            call()


BAD_QUERIES: list[tuple[str, dict[str, Any], str]] = [
    ("no vector", {"index": "docs", "k": 3}, "search"),
    ("both vector forms", {"index": "docs", "vector": [1], "vector_b64": b64([1])}, "search"),
    ("k zero", {"index": "docs", "vector": [1], "k": 0}, "search"),
    ("unknown query op", {"op": "delete", "index": "docs", "ids": ["a"]}, "unknown op"),
    ("negative deadline", {"index": "docs", "vector": [1], "deadline_ms": -5}, "search"),
    ("min offset below -1", {"index": "docs", "vector": [1], "min_offset": -2}, "search"),
    ("filter not an object", {"index": "docs", "vector": [1], "filter": [1]}, "search"),
    ("get without ids", {"op": "get", "index": "docs"}, "get"),
    ("bad vector encoding", {"op": "get", "index": "docs", "ids": ["a"], "vector_encoding": "hex"}, "get"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "match"), [pytest.param(b, m, id=what) for what, b, m in BAD_QUERIES]
)
def test_bad_query_raises_invalid_request_naming_the_problem(
    body: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        query(body)


def test_a_query_without_reply_headers_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="kafka_replyTopic"):
        query({"index": "docs", "vector": [1]}, headers=[])


def test_dim_mismatch_is_an_invalid_request_with_its_own_code() -> None:
    assert issubclass(DimMismatch, InvalidRequest)
    assert DimMismatch("x").code == "dim_mismatch"


# -- reply headers -----------------------------------------------------------------------


def test_spring_reply_partition_is_a_4_byte_big_endian_int() -> None:
    headers = [
        ("kafka_replyTopic", b"lhv.replies.java"),
        ("kafka_replyPartition", struct.pack(">i", 2)),
        ("kafka_correlationId", bytes(range(16))),
    ]
    reply_to = reply_to_from_headers(headers)
    assert reply_to == ReplyTo("lhv.replies.java", 2, bytes(range(16)))
    # a big partition number survives too
    big = reply_to_from_headers(
        [*headers[:1], ("kafka_replyPartition", struct.pack(">i", 300)), headers[2]]
    )
    assert big is not None and big.partition == 300


def test_ascii_reply_partition_is_accepted() -> None:
    reply_to = reply_to_from_headers([*REPLY_HEADERS, ("kafka_replyPartition", b"7")])
    assert reply_to is not None and reply_to.partition == 7


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ([("kafka_replyTopic", b"lhv.replies.x")], "without kafka_correlationId"),
        ([("kafka_replyTopic", b"\xff"), ("kafka_correlationId", b"c")], "not UTF-8"),
        ([*REPLY_HEADERS, ("kafka_replyPartition", struct.pack(">i", -1))], "(?i)partition"),
        ([*REPLY_HEADERS, ("kafka_replyPartition", b"\x01\x02")], "partition number"),
    ],
    ids=["no correlation id", "topic not UTF-8", "negative partition", "short partition"],
)
def test_bad_reply_headers_raise_invalid_request(headers: Any, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        reply_to_from_headers(headers)


def test_no_reply_topic_means_no_reply() -> None:
    assert reply_to_from_headers([("kafka_correlationId", b"c")]) is None


def test_reply_headers_round_trip_the_correlation_id_bytes_unchanged() -> None:
    cid = b"\x00\xff\x10binary\x80"
    reply_to = reply_to_from_headers(
        [("kafka_replyTopic", b"lhv.replies.a"), ("kafka_correlationId", cid)]
    )
    assert reply_to is not None
    headers = build_reply_headers(reply_to)
    assert headers == [("kafka_correlationId", cid)]
    # what a requester reads back identifies its request
    assert dict(headers)["kafka_correlationId"] == cid


def test_reply_topic_policy_refuses_the_commands_topic_and_odd_names() -> None:
    policy = ReplyTopicPolicy()
    assert policy.allows("lhv.replies.abc")
    for topic in ("lhv.commands", "lhv.search", "lhv.commands.dlq", "lhv.replies", "", "x" * 300):
        assert not policy.allows(topic), topic
    assert not policy.allows("lhv.replies.a/b")
    with pytest.raises(InvalidRequest, match=r"lhv\.commands"):
        policy.check("lhv.commands")


def test_reply_topic_policy_follows_a_configured_pattern() -> None:
    policy = ReplyTopicPolicy("team-a.replies.*")
    assert policy.allows("team-a.replies.7")
    assert not policy.allows("lhv.replies.7")


def test_dlq_headers_validate_against_their_schema() -> None:
    err = InvalidRequest("bad vector", item=3)
    headers = dlq_headers(err, "lhv.commands", 2, 41)
    as_text = {k: v.decode() for k, v in headers}
    validator("dlq_headers")(as_text)
    assert as_text["lhv_error_item"] == "3" and as_text["lhv_source_offset"] == "41"


# -- encoded replies and acks ------------------------------------------------------------


def test_search_reply_validates_and_carries_the_correlation_id() -> None:
    q = query({"index": "docs", "vector": [1, 0], "include_metadata": True})
    hits = [Hit("a", np.float32(0.25), {"k": 1}), Hit("b", 0.5, None)]
    body = orjson.loads(encode_search_reply(q, hits, applied_offset=12, took_ms=1.23456))
    validator("reply")(body)
    assert body["correlation_id"] == "cid-1" and body["status"] == "ok"
    assert body["hits"] == [
        {"id": "a", "distance": 0.25, "metadata": {"k": 1}},
        {"id": "b", "distance": 0.5, "metadata": None},
    ]
    assert body["applied_offset"] == 12 and body["took_ms"] == 1.235


def test_get_reply_validates_in_both_vector_encodings() -> None:
    from lhv_index import Clock

    item = Item("a", np.array([1.5, -2], dtype=np.float32), {"k": "v"}, Clock(3, 9, 0))
    for encoding in ("json", "b64"):
        q = query({"op": "get", "index": "docs", "ids": ["a"], "vector_encoding": encoding})
        body = orjson.loads(encode_get_reply(q, [item], applied_offset=9, took_ms=0.5))
        validator("reply")(body)
        entry = body["items"][0]
        assert entry["version"] == 3 and entry["metadata"] == {"k": "v"}
        if encoding == "json":
            assert entry["vector"] == [1.5, -2.0]
        else:
            raw = base64.b64decode(entry["vector_b64"])
            assert np.frombuffer(raw, "<f4").tolist() == [1.5, -2.0]


def test_stats_reply_validates() -> None:
    q = query({"op": "stats", "index": "docs"})
    stats = {
        "count": 3,
        "deleted": 1,
        "dim": 2,
        "space": "l2",
        "engine": "hnsw",
        "params": {"M": 16},
        "applied_offset": 5,
        "checkpoint_offset": 4,
    }
    body = orjson.loads(encode_stats_reply(q, stats, took_ms=0.1))
    validator("reply")(body)
    assert body["count"] == 3 and body["op"] == "stats"


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("bad", item=2),
        DimMismatch("dim 3, expected 4"),
        IndexNotFound("no such index"),
        NotReady("restoring"),
        DeadlineExceeded("too late"),
    ],
    ids=lambda e: e.code,
)
def test_error_replies_validate_and_name_a_code_the_client_maps_back(error: LhvError) -> None:
    reply_to = ReplyTo("lhv.replies.x", None, b"\xff\x00")
    body = orjson.loads(encode_error_reply(reply_to, "docs", error, took_ms=2))
    validator("reply")(body)
    assert body["status"] == "error" and body["correlation_id"] == "ff00"
    again = error_for_code(body["error"]["code"], body["error"]["message"])
    assert type(again) is type(error) and again.message == error.message


def test_acks_validate_for_applied_and_rejected_commands() -> None:
    reply_to = ReplyTo("lhv.replies.x", 0, b"c-9")
    ok = SimpleNamespace(
        reply_to=reply_to,
        error=None,
        op="add",
        index="docs",
        request_id="r",
        offset=17,
        applied=3,
        skipped=1,
    )
    body = orjson.loads(encode_ack(ok))
    validator("ack")(body)
    assert (body["status"], body["offset"], body["applied"], body["skipped"]) == ("ok", 17, 3, 1)
    bad = SimpleNamespace(**{**vars(ok), "error": DimMismatch("item 0", item=0), "applied": 0})
    body = orjson.loads(encode_ack(bad))
    validator("ack")(body)
    assert body["status"] == "error" and body["error"]["code"] == "dim_mismatch"
    assert body["error"]["item"] == 0


def test_a_query_by_a_sharded_name_carries_each_members_offset_and_allow_partial() -> None:
    offsets = {"docs#0": 12, "docs#3": -1}
    for body in (
        {"op": "search", "index": "docs", "vector": [1.0, 0.0]},
        {"op": "get", "index": "docs", "ids": ["a"]},
        {"op": "stats", "index": "docs"},
    ):
        q = query({**body, "min_offsets": offsets, "allow_partial": True})
        assert q.min_offsets == offsets and q.allow_partial is True
        plain = query(body)
        assert plain.min_offsets is None and plain.allow_partial is False
    with pytest.raises(InvalidRequest):
        query({"op": "stats", "index": "docs", "min_offsets": {"docs": 3}})
