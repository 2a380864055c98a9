"""`ReplyChannel`'s hand-over of replies, the part the client and the gatherer share,
without a broker: records are handed to `deliver` as the reader would."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lhv_index.errors import Internal, NotReady
from worker.kafka.config import KafkaConfig
from worker.kafka.requests import ReplyChannel, ReplyRecord
from worker.wire.headers import CORRELATION_ID


@dataclass
class _Rec:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def _text(rec: ReplyRecord) -> str:
    if rec.value is None:
        raise Internal("an empty reply")
    return rec.value.decode()


def _channel(seen: list[bytes] | None = None) -> ReplyChannel[str]:
    return ReplyChannel(
        KafkaConfig(bootstrap_servers="127.0.0.1:1"),
        "lhv.replies.unit",
        decode=_text,
        producer_options={},
        on_reply=None if seen is None else seen.append,
    )


async def test_a_reply_goes_to_the_call_waiting_for_its_correlation_header() -> None:
    channel = _channel()
    first, second = channel.expect(b"a"), channel.expect(b"b")
    channel.deliver(_Rec(b"other-key", b"to b", [(CORRELATION_ID, b"b")]))
    assert second.result() == "to b" and not first.done()
    assert list(channel.waiting) == [b"a"]


async def test_a_reply_without_the_header_is_matched_by_its_key() -> None:
    channel = _channel()
    fut = channel.expect(b"a")
    channel.deliver(_Rec(b"a", b"by key"))
    assert fut.result() == "by key" and not channel.waiting


async def test_a_reply_the_decoder_refuses_is_that_calls_error_only() -> None:
    channel = _channel()
    bad, good = channel.expect(b"a"), channel.expect(b"b")
    channel.deliver(_Rec(b"a", None))
    with pytest.raises(Internal, match="empty reply"):
        bad.result()
    channel.deliver(_Rec(b"b", b"fine"))
    assert good.result() == "fine"


async def test_replies_nobody_waits_for_are_dropped_but_seen_by_the_hook() -> None:
    seen: list[bytes] = []
    channel = _channel(seen)
    fut = channel.expect(b"a")
    channel.forget(b"a")
    assert fut.cancelled()
    channel.deliver(_Rec(b"a", b"late"))
    channel.deliver(_Rec(None, b"no id at all"))
    assert seen == [b"a"] and not channel.waiting


async def test_stopping_fails_or_cancels_every_waiting_call() -> None:
    channel = _channel()
    failed = channel.expect(b"a")
    await channel.stop(ConnectionError("closed"))
    with pytest.raises(ConnectionError):
        failed.result()
    cancelled = channel.expect(b"b")
    await channel.stop()
    assert cancelled.cancelled() and not channel.waiting


async def test_sending_before_start_or_after_a_reader_failure_raises() -> None:
    channel = _channel()
    with pytest.raises(NotReady, match="not started"):
        await channel.send("t", key=b"k", value=b"v", headers=[])
    channel.failure = RuntimeError("boom")
    with pytest.raises(Internal, match="the reply reader failed: RuntimeError"):
        channel.check()
