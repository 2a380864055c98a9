"""Spring reply headers, the reply-topic policy and the DLQ header set."""

from __future__ import annotations

import fastjsonschema
import pytest

from lhv_index.errors import (
    DimMismatch,
    IndexNotFound,
    Internal,
    InvalidRequest,
    LhvError,
    WrongPartition,
)
from worker.wire.headers import (
    DLQ_MESSAGE_MAX_BYTES,
    ReplyTo,
    build_reply_headers,
    dlq_headers,
    reply_key,
    reply_to_from_headers,
)
from worker.wire.schemas import load_schema
from worker.wire.topics import FORBIDDEN_REPLY_TOPICS, ReplyTopicPolicy

DLQ_SCHEMA = fastjsonschema.compile(load_schema("dlq_headers"))


@pytest.mark.parametrize(
    "correlation_id", [b"corr-1", b"\x00\xff\x10binary", bytes(range(16))], ids=repr
)
def test_reply_headers_and_key_carry_the_request_correlation_id_unchanged(
    correlation_id: bytes,
) -> None:
    request = [
        ("kafka_replyTopic", b"lhv.replies.client-1"),
        ("kafka_replyPartition", (4).to_bytes(4, "big")),
        ("kafka_correlationId", correlation_id),
    ]
    reply_to = reply_to_from_headers(request)
    assert reply_to == ReplyTo("lhv.replies.client-1", 4, correlation_id)
    assert build_reply_headers(reply_to) == [("kafka_correlationId", correlation_id)]
    assert reply_key(reply_to) == correlation_id


def test_policy_allows_topics_matching_the_pattern() -> None:
    policy = ReplyTopicPolicy()
    assert policy.pattern == "lhv.replies.*"
    for topic in ("lhv.replies.client-1", "lhv.replies.a.b_c", "lhv.replies.x"):
        assert policy.allows(topic)
        policy.check(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "lhv.commands",
        "lhv.search",
        "lhv.commands.dlq",
        "lhv.replies",
        "lhv_replies.x",
        "LHV.REPLIES.X",
        "other.lhv.replies.x",
        "lhv.replies.x/y",
        "lhv.replies.x\n",
        "lhv.replies." + "x" * 240,
        "",
    ],
)
def test_policy_refuses_other_topics(topic: str) -> None:
    policy = ReplyTopicPolicy()
    assert not policy.allows(topic)
    with pytest.raises(InvalidRequest) as err:
        policy.check(topic)
    assert err.value.code == "invalid_request"


def test_command_and_search_topics_are_refused_even_by_a_catch_all_pattern() -> None:
    policy = ReplyTopicPolicy("*")
    assert policy.allows("anything.else")
    for topic in FORBIDDEN_REPLY_TOPICS:
        with pytest.raises(InvalidRequest):
            policy.check(topic)
    custom = ReplyTopicPolicy("*", forbidden=["prod.commands", "prod.search"])
    with pytest.raises(InvalidRequest):
        custom.check("prod.commands")
    assert custom.allows("prod.replies.x")


def test_policy_patterns_are_shell_style() -> None:
    policy = ReplyTopicPolicy("team-?.replies.[ab]*")
    assert policy.allows("team-1.replies.abc")
    assert not policy.allows("team-12.replies.abc")
    assert not policy.allows("team-1.replies.cde")
    with pytest.raises(ValueError):
        ReplyTopicPolicy("")


def _as_dict(headers: list[tuple[str, bytes]]) -> dict[str, str]:
    assert len({k for k, _ in headers}) == len(headers)
    return {k: v.decode("utf-8") for k, v in headers}


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("items[3] (id 'x'): vector has NaN", item=3),
        DimMismatch("expected dim 4, got 3", item=0),
        IndexNotFound("index 'docs' does not exist"),
        WrongPartition("index 'docs' lives on partition 2"),
        Internal("boom"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_dlq_headers_say_why_and_where_from(error: LhvError) -> None:
    headers = dlq_headers(error, "lhv.commands", 5, 1234)
    values = _as_dict(headers)
    DLQ_SCHEMA(values)
    assert values["lhv_error_code"] == error.code
    assert values["lhv_error_message"] == error.message
    assert values["lhv_source_topic"] == "lhv.commands"
    assert (values["lhv_source_partition"], values["lhv_source_offset"]) == ("5", "1234")
    if error.item is None:
        assert "lhv_error_item" not in values
    else:
        assert values["lhv_error_item"] == str(error.item)


def test_dlq_message_is_cut_on_a_character_boundary() -> None:
    error = InvalidRequest("é" * DLQ_MESSAGE_MAX_BYTES)
    values = dict(dlq_headers(error, "lhv.commands", 0, 0))
    message = values["lhv_error_message"]
    assert len(message) <= DLQ_MESSAGE_MAX_BYTES
    assert message.decode("utf-8") == "é" * (DLQ_MESSAGE_MAX_BYTES // 2)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            [("kafka_replyTopic", b"lhv.replies.a"), ("kafka_correlationId", b"c" * 1025)],
            "kafka_correlationId of 1025 bytes is over the limit of 1024",
        ),
        ([(f"h{i}", b"") for i in range(65)], "65 record headers are over the limit of 64"),
        ([("big", b"x" * 70_000)], "record headers of 70003 bytes are over the limit of 65536"),
    ],
)
def test_headers_over_the_limits_get_no_reply(
    headers: list[tuple[str, bytes]], message: str
) -> None:
    from worker.wire.headers import check_headers
    from worker.wire.limits import MessageLimits

    with pytest.raises(InvalidRequest, match=message):
        check_headers(headers, MessageLimits())
    with pytest.raises(InvalidRequest, match=message):
        reply_to_from_headers(headers)
    relaxed = MessageLimits(
        max_headers=100, max_header_bytes=100_000, max_correlation_id_bytes=2048
    )
    check_headers(headers, relaxed)
