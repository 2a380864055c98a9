"""Property tests: hostile record values never get past the decoder as anything but a typed
command or query, or an `invalid_request` (`dim_mismatch` where that is the cause).

Values are arbitrary bytes, arbitrary JSON (deep, wide, wrong types, huge numbers, NaN
tokens, non-UTF-8 bytes), and valid commands and queries with one field, anywhere in them,
replaced by such a value. Any other exception, or an `internal` error, is a decoder bug: in
the worker it would become `internal` or, on the search path, kill the task that serves
the partition's queries.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lhv_index.errors import LhvError
from worker.wire.commands import decode_command
from worker.wire.limits import COMMAND_OPS, QUERY_OPS, MessageLimits
from worker.wire.queries import decode_query

LIMITS = MessageLimits()
HEADERS = [("kafka_replyTopic", b"lhv.replies.t1"), ("kafka_correlationId", b"corr-1")]
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: the codes a request can earn by itself
REQUEST_CODES = {"invalid_request", "dim_mismatch"}


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


REPLY = {"topic": "lhv.replies.t1", "partition": 0, "correlation_id_b64": "Y29ycg=="}
VALID_COMMANDS: list[dict[str, Any]] = [
    {"op": "create", "index": "docs", "dim": 3, "space": "l2", "M": 8, "max_elements_hint": 10},
    {"op": "drop", "index": "docs"},
    {
        "op": "add",
        "index": "docs",
        "request_id": "r1",
        "items": [
            {"id": "a", "vector": [1.0, 0.0, 0.5], "metadata": {"lang": "en", "n": [1, {"x": 2}]}},
            {"id": "b", "vector_b64": b64([0.0, 1.0, 0.5]), "version": 3},
        ],
    },
    {"op": "delete", "index": "docs", "ids": ["a", "b"], "version": 4},
    {"op": "merge", "index": "docs", "dest": "other", "clear_source": True},
    {"op": "import", "index": "docs", "source": "s3://bucket/x.npy", "chunk_items": 100},
    {
        "op": "merge_in",
        "index": "docs",
        "source_index": "src",
        "export": "merges/m1.lhv",
        "merge_id": "m1",
        "origin_partition": 0,
        "origin_offset": 5,
        "reply": REPLY,
    },
    {
        "op": "merge_done",
        "index": "docs",
        "dest": "dst",
        "export": "merges/m1.lhv",
        "merge_id": "m1",
        "applied": 2,
        "error": {"code": "dim_mismatch", "message": "no", "item": 1},
        "reply": REPLY,
    },
]
VALID_QUERIES: list[dict[str, Any]] = [
    {
        "index": "docs",
        "vector": [1.0, 0.0, 0.5],
        "k": 5,
        "ef": 32,
        "filter": {"lang": "en", "tags": ["a"]},
        "include_metadata": True,
        "min_offset": 3,
        "deadline_ms": 1_700_000_000_000,
    },
    {"op": "search", "index": "docs", "vectors": [[1.0, 0.0], [0.0, 1.0]], "k": 2},
    {"op": "search", "index": "docs", "vectors_b64": [b64([1.0, 2.0]), b64([3.0, 4.0])]},
    {"op": "search", "index": "docs", "vector_b64": b64([1.0, 2.0, 3.0])},
    {"op": "get", "index": "docs", "ids": ["a", "b"], "vector_encoding": "b64"},
    {"op": "stats", "index": "docs"},
]


def nest(depth: int, leaf: Any, kind: str) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if kind == "object" else [value]
    return value


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "AA*A", "AAAA", "docs", "", "\ud800"])
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=40,
)
#: around the limit, past orjson's own write limit (254), up to what `json` can write
DEPTHS = st.sampled_from([28, 29, 30, 31, 32, 33, 200, 254, 255, 300, 900]) | st.integers(1, 900)
DEEP = st.builds(nest, DEPTHS, SCALARS, st.sampled_from(["object", "array"]))
WIDE = st.integers(min_value=1, max_value=20_000).map(lambda n: [0.5] * n) | st.integers(
    min_value=1, max_value=3_000
).map(lambda n: {f"k{i}": i for i in range(n)})
HOSTILE = st.one_of(DEEP, DEEP, JSONISH, WIDE)


def dumps(value: Any) -> bytes:
    """JSON text of any value, deep ones and NaN tokens included (orjson refuses both)."""
    return json.dumps(value, allow_nan=True).encode("utf-8", errors="surrogatepass")


RAW_VALUES = (
    st.binary(max_size=200)
    | HOSTILE.map(dumps)
    | st.integers(min_value=1, max_value=3_000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(min_value=1, max_value=3_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
    | st.sampled_from(
        [
            b'{"op": "add", "index": "docs", "items": [{"id": "a", "vector": [NaN]}]}',
            b'{"op": "add", "index": "docs", "items": [{"id": "\xff\xfe", "vector": [1]}]}',
            b'{"index": "docs", "vector": [1e999]}',
            b'{"index": "docs", "vector": [1], "k": 1e400}',
            b'{"index": "docs", "vector": [1], "k": 123456789012345678901234567890}',
            b'{"op": "delete", "index": "docs", "ids": ["\\ud800"]}',
        ]
    )
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    if not isinstance(value, dict | list):
        return out
    for key, child in value.items() if isinstance(value, dict) else enumerate(value):
        out.append((*prefix, key))
        out.extend(paths(child, (*prefix, key)))
    return out


@st.composite
def mutated(
    draw: st.DrawFn, valid: list[dict[str, Any]], values: st.SearchStrategy[Any] = HOSTILE
) -> bytes:
    """A valid body with one value replaced, one field added (both by one of `values`) or
    one field removed."""
    body = copy.deepcopy(draw(st.sampled_from(valid)))
    path = draw(st.sampled_from(paths(body)))
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "replace", "add", "remove"]))
    if action == "replace":
        parent[path[-1]] = draw(values)
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = draw(values)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return dumps(body)


HEADER_LISTS = st.just(HEADERS) | st.lists(
    st.tuples(
        st.sampled_from(["kafka_replyTopic", "kafka_correlationId", "kafka_replyPartition", "x"]),
        st.binary(max_size=12),
    ),
    max_size=4,
)


def assert_decodes_or_refuses(decode: Any, key: bytes | None, value: bytes, headers: Any) -> None:
    try:
        got = decode(key, value, headers, limits=LIMITS)
    except LhvError as exc:
        assert exc.code in REQUEST_CODES, f"{exc.code}: {exc.message}"
        assert len(exc.message) < 1_000  # names what is wrong, never echoes the request
        return
    assert got.op in (COMMAND_OPS if decode is decode_command else QUERY_OPS)
    assert got.index == "docs"


KEYS = st.just(b"docs") | st.none() | st.binary(max_size=8)


@pytest.mark.parametrize("decode", [decode_command, decode_query], ids=["command", "query"])
@SETTINGS
@given(key=KEYS, value=RAW_VALUES, headers=HEADER_LISTS)
def test_any_record_value_decodes_or_is_refused_as_invalid(
    decode: Any, key: bytes | None, value: bytes, headers: Any
) -> None:
    assert_decodes_or_refuses(decode, key, value, headers)


@SETTINGS
@given(value=mutated(VALID_COMMANDS), headers=HEADER_LISTS)
def test_a_valid_command_with_any_field_mutated_decodes_or_is_refused_as_invalid(
    value: bytes, headers: Any
) -> None:
    assert_decodes_or_refuses(decode_command, b"docs", value, headers)


@SETTINGS
@given(value=mutated(VALID_QUERIES), headers=HEADER_LISTS)
def test_a_valid_query_with_any_field_mutated_decodes_or_is_refused_as_invalid(
    value: bytes, headers: Any
) -> None:
    assert_decodes_or_refuses(decode_query, b"docs", value, headers)


@pytest.mark.parametrize(
    ("decode", "valid"),
    [(decode_command, VALID_COMMANDS), (decode_query, VALID_QUERIES)],
    ids=["command", "query"],
)
@SETTINGS
@given(data=st.data())
def test_a_value_nested_past_every_parser_limit_anywhere_is_refused_as_invalid(
    decode: Any, valid: list[dict[str, Any]], data: st.DataObject
) -> None:
    deep = st.builds(nest, st.sampled_from([255, 300, 900]), SCALARS, st.just("object"))
    value = data.draw(mutated(valid, deep | deep.map(lambda v: [v])))
    assert_decodes_or_refuses(decode, b"docs", value, HEADERS)


def test_the_valid_bodies_mutated_above_do_decode() -> None:
    for body in VALID_COMMANDS:
        assert decode_command(b"docs", dumps(body), HEADERS, limits=LIMITS).op == body["op"]
    for body in VALID_QUERIES:
        assert decode_query(b"docs", dumps(body), HEADERS, limits=LIMITS).index == "docs"
