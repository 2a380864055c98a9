"""Outgoing records fit their bounds: DLQ records are cut (with the original size and
hash), oversized replies become small error replies, bad reply partitions and missing
topics drop the reply; the cache of missing topics is bounded. Uses an in-memory
stand-in for the outbox's producer side."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import fastjsonschema
import orjson
from aiokafka.errors import UnknownTopicOrPartitionError

from lhv_index.errors import InvalidRequest
from worker.service.outbox import fit_dlq_record, record_size
from worker.service.replies import ReplySender
from worker.wire.headers import ReplyTo, dlq_headers
from worker.wire.schemas import load_schema

DLQ_SCHEMA = fastjsonschema.compile(load_schema("dlq_headers"))
ERRORS = dlq_headers(InvalidRequest("too big"), "lhv.commands", 3, 42)


def fit(value: bytes, headers: list[tuple[str, bytes | None]] | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {"max_record_bytes": 65_536, "max_headers": 64, "max_header_bytes": 4096}
    args.update(kw)
    return fit_dlq_record(b"idx", value, headers or [], ERRORS, **args)


def test_a_dlq_record_that_fits_is_unchanged() -> None:
    rec = fit(b"{}", [("kafka_replyTopic", b"lhv.replies.x")])
    assert rec.value == b"{}" and not rec.truncated
    assert rec.headers == [("kafka_replyTopic", b"lhv.replies.x"), *ERRORS]


def test_a_large_value_is_cut_to_fit_with_its_size_and_hash() -> None:
    value = bytes(range(256)) * 4000  # 1 MB
    rec = fit(value)
    headers = dict(rec.headers)
    assert rec.truncated and value.startswith(rec.value) and len(rec.value) > 60_000
    assert record_size(rec.key, rec.value, rec.headers) <= 65_536
    assert headers["lhv_value_truncated"] == b"true"
    assert headers["lhv_original_value_bytes"] == str(len(value)).encode()
    assert headers["lhv_original_value_sha256"] == hashlib.sha256(value).hexdigest().encode()
    DLQ_SCHEMA({k: v.decode() for k, v in rec.headers})


def test_original_headers_are_bounded_in_count_and_bytes() -> None:
    many = [(f"h{i}", b"x" * 10) for i in range(200)]
    rec = fit(b"{}", many, max_headers=64, max_header_bytes=100_000)
    assert dict(rec.headers)["lhv_original_headers_dropped"] == b"136"
    huge = [("a", b"x" * 3000), ("b", b"y" * 3000), ("c", b"z")]
    rec = fit(b"{}", huge, max_header_bytes=4096)
    names = [k for k, _ in rec.headers]
    assert names[:2] == ["a", "c"] and dict(rec.headers)["lhv_original_headers_dropped"] == b"1"
    DLQ_SCHEMA({k: v.decode() for k, v in rec.headers if k.startswith("lhv_")})


def test_a_huge_key_is_cut() -> None:
    rec = fit_dlq_record(
        b"k" * 100_000,
        b"{}",
        [],
        ERRORS,
        max_record_bytes=65_536,
        max_headers=64,
        max_header_bytes=4096,
    )
    assert rec is not None and rec.key == b"k" * 1024
    assert dict(rec.headers)["lhv_original_key_bytes"] == b"100000"


class FakeOutbox:
    """The outbox's surface seen by `ReplySender`, in memory."""

    def __init__(self, topics: dict[str, int], max_record_bytes: int = 65_536) -> None:
        self.topics = topics
        self.max_record_bytes = max_record_bytes
        self.sent: list[tuple[str, Any]] = []
        self.drops: list[tuple[str, str]] = []
        self.forgotten: list[str] = []

    def forget_topic(self, topic: str) -> None:
        self.forgotten.append(topic)

    async def partitions_for(self, topic: str) -> set[int]:
        if topic not in self.topics:
            raise UnknownTopicOrPartitionError()
        return set(range(self.topics[topic]))

    def dropped(
        self, kind: str, reason: str, topic: str, where: Any, detail: str, **kw: Any
    ) -> None:
        self.drops.append((kind, reason))

    async def send(self, kind: str, topic: str, **kw: Any) -> bool:
        self.sent.append((topic, kw))
        return True


async def test_a_reply_partition_the_topic_does_not_have_drops_the_reply() -> None:
    outbox = FakeOutbox({"lhv.replies.a": 1})
    sender = ReplySender(outbox)  # type: ignore[arg-type]
    assert not await sender.send(ReplyTo("lhv.replies.a", 7, b"c"), b"{}", kind="ack")
    assert outbox.drops == [("ack", "bad_partition")] and not outbox.sent
    assert await sender.send(ReplyTo("lhv.replies.a", 0, b"c"), b"{}", kind="ack")


async def test_a_reply_too_large_becomes_a_small_error_reply() -> None:
    outbox = FakeOutbox({"lhv.replies.a": 1})
    sender = ReplySender(outbox)  # type: ignore[arg-type]
    big = orjson.dumps(
        {
            "correlation_id": "c",
            "status": "ok",
            "op": "get",
            "index": "docs",
            "items": [{"id": "x" * 100, "metadata": {"index": "evil"}}] * 2000,
        }
    )
    assert await sender.send(ReplyTo("lhv.replies.a", None, b"c"), big)
    ((_topic, kw),) = outbox.sent
    reply = orjson.loads(kw["value"])
    assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request"
    assert (
        reply["index"] == "docs"
        and reply["op"] == "get"
        and "ask for less" in reply["error"]["message"]
    )
    assert outbox.drops == [("reply", "replaced_too_large")]
    # an ack is never replaced: it is dropped
    assert not await sender.send(ReplyTo("lhv.replies.a", None, b"c"), big, kind="ack")
    assert outbox.drops[-1] == ("ack", "too_large")


async def test_the_cache_of_missing_reply_topics_is_bounded() -> None:
    outbox = FakeOutbox({})
    dropped = []
    sender = ReplySender(outbox, max_missing=100, on_drop=lambda: dropped.append(1))  # type: ignore[arg-type]
    for i in range(1000):
        assert not await sender.send(ReplyTo(f"lhv.replies.gone-{i}", None, b"c"), b"{}")
    assert sender.missing_topics == 100 and len(dropped) == 1000
    # the most recent ones are remembered: no second metadata wait for them
    outbox.topics["lhv.replies.gone-999"] = 1
    assert not await sender.send(ReplyTo("lhv.replies.gone-999", None, b"c"), b"{}")


def test_edge_limits_come_from_the_environment() -> None:
    from worker.service.config import WorkerConfig

    config = WorkerConfig.from_env(
        {
            "LHV_MAX_HEADERS": "10",
            "LHV_MAX_HEADER_BYTES": "2048",
            "LHV_MAX_CORRELATION_ID_BYTES": "64",
            "LHV_OUT_MAX_REQUEST_BYTES": "2000000",
            "LHV_BROKER_MAX_MESSAGE_BYTES": "500000",
            "LHV_ACK_REPLAY_MAX_AGE_MS": "1000",
            "LHV_MAX_MISSING_REPLY_TOPICS": "7",
        }
    )
    assert (config.limits.max_headers, config.limits.max_header_bytes) == (10, 2048)
    assert config.limits.max_correlation_id_bytes == 64
    assert config.delivery.max_record_bytes == 500_000
    assert config.delivery.ack_replay_max_age_ms == 1000
    assert config.delivery.max_missing_reply_topics == 7


class HangingOutbox(FakeOutbox):
    """Metadata of a topic that does not exist never comes (the broker does not answer
    for it): a lookup waits until it is cancelled."""

    def __init__(self, topics: dict[str, int]) -> None:
        super().__init__(topics)
        self.lookups = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def partitions_for(self, topic: str) -> set[int]:
        self.lookups += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if topic not in self.topics:
                await asyncio.Event().wait()
            return set(range(self.topics[topic]))
        finally:
            self.in_flight -= 1


async def test_the_reply_topics_of_a_batch_are_looked_up_together() -> None:
    """Acks to 200 distinct topics that do not exist cost one metadata wait together,
    then none each: a producer naming many missing topics cannot hold a partition for
    200 waits."""
    outbox = HangingOutbox({"lhv.replies.here": 1})
    sender = ReplySender(outbox, wait_s=0.05)  # type: ignore[arg-type]
    gone = [f"lhv.replies.gone-{i}" for i in range(200)]
    await sender.look_up([*gone, "lhv.replies.here", *gone])
    assert outbox.lookups == 201 and outbox.most_in_flight == 201 and outbox.in_flight == 0
    assert sender.missing_topics == 200
    for topic in gone:
        assert not await sender.send(ReplyTo(topic, None, b"c"), b"{}", kind="ack")
    assert await sender.send(ReplyTo("lhv.replies.here", None, b"c"), b"{}", kind="ack")
    assert outbox.lookups == 202  # the topic that exists, once more; the missing ones not
    assert outbox.drops == [("ack", "missing_topic")] * 200
    assert sorted(outbox.forgotten) == sorted(gone)  # the producer stops tracking them


def test_original_headers_named_like_the_dlq_headers_are_left_out() -> None:
    """A record sent back from the DLQ (or a producer's own `lhv_error_*`) and rejected
    again: its DLQ record names this rejection only, not an item or a cut of another."""
    stale = [
        ("lhv_error_code", b"index_not_found"),
        ("lhv_error_item", b"7"),
        ("lhv_source_offset", b"1"),
        ("lhv_value_truncated", b"true"),
        ("lhv_original_value_bytes", b"99"),
        ("kafka_replyTopic", b"lhv.replies.x"),
    ]
    rec = fit(b"{}", stale)
    assert rec.headers == [("kafka_replyTopic", b"lhv.replies.x"), *ERRORS]
    assert not rec.truncated
