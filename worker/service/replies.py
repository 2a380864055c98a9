"""Request/reply plumbing: Spring `ReplyingKafkaTemplate` headers, the reply-topic policy,
and the DLQ header set.

A reply (or ack) carries the header `kafka_correlationId` with the request's bytes,
unchanged, and has those bytes as its record key, so Java requesters using Spring Kafka
interoperate. It goes to the request's `kafka_replyTopic` (and `kafka_replyPartition` when
given), but only when that topic matches the configured pattern (default `lhv.replies.*`),
so a request can never make a worker write to `lhv.commands` or any other topic.

A reply topic that does not exist (its client stopped and deleted it: replays re-send
acks, and a late query may outlive its requester) must never stall or stop a partition:
`ReplySender` waits for its metadata at most a few seconds, then drops what goes there
with a warning and remembers the topic as missing for a minute (at most
`max_missing` topics, least recently used forgotten first), and has the outbox's
producer stop asking the broker about it. The reply topics of one
batch of acks are looked up together first (`look_up`), so however many distinct
missing topics a batch names, it waits for them once, not once each. A `kafka_replyPartition` that
the topic does not have drops the reply with a warning, and a reply too large to send is
replaced by a small `invalid_request` error reply; records go out through the worker's
`Outbox` (`worker/service/outbox.py`), which bounds their size and confines any failure to the
record.

Pattern syntax: `fnmatch` (shell style, case-sensitive): `*` matches any run of
characters, dots included, `?` one character, `[...]` a set. The topic must also be a
legal Kafka topic name (`[A-Za-z0-9._-]`, 1 to 249 characters) and not one of the
`forbidden` topics, whatever the pattern says.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from aiokafka.errors import KafkaError

from worker.service.outbox import Kind, Outbox, record_size
from worker.wire.headers import REPLY_PARTITION, ReplyTo, build_reply_headers
from worker.wire.limits import reply_too_large
from worker.wire.replies import encode_error_reply

__all__ = ["ReplySender"]

log = logging.getLogger(__name__)


class ReplySender:
    """Produces replies and acks to requesters' reply topics (module docstring).

    Arguments:
        outbox: where the records go (its own producer, its size bounds).
        wait_s: how long to wait for a reply topic's metadata.
        forget_after_s: how long a missing topic stays missing.
        max_missing: how many missing topics are remembered (least recently used ones
            are forgotten first), so a flood of made-up topic names holds no memory.
        on_drop: called for each reply or ack dropped because its topic is missing.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        wait_s: float = 5.0,
        forget_after_s: float = 60.0,
        max_missing: int = 1024,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self.outbox = outbox
        self.wait_s = wait_s
        self.forget_after_s = forget_after_s
        self.max_missing = max_missing
        self._on_drop = on_drop
        self._missing: OrderedDict[str, float] = OrderedDict()
        """topic -> monotonic time until which it is taken as missing; oldest use first"""

    async def look_up(self, topics: Iterable[str]) -> None:
        """Look up the metadata of `topics` at once, within one wait of `wait_s`: those
        without it by then are remembered as missing (logged, as `send` does), so the
        `send`s that follow find every topic known or missing and wait no more. Without
        this, acks sent one after another would wait `wait_s` for each distinct missing
        topic in turn, and a producer naming many could hold its partition for as long.
        Never raises (cancellation aside)."""
        unknown = [t for t in dict.fromkeys(topics) if not self._is_missing(t)]
        if not unknown:
            return
        lookups = {t: asyncio.ensure_future(self.outbox.partitions_for(t)) for t in unknown}
        await asyncio.wait(lookups.values(), timeout=self.wait_s)
        for topic, lookup in lookups.items():
            if not lookup.done():
                lookup.cancel()
                failed: BaseException | None = TimeoutError()
            else:
                failed = lookup.exception()
            if isinstance(failed, TimeoutError | KafkaError):
                self._missing_now(topic, failed)
        await asyncio.gather(*lookups.values(), return_exceptions=True)

    async def send(
        self,
        reply_to: ReplyTo,
        value: bytes,
        *,
        kind: Kind = "reply",
        where: tuple[int, int] | None = None,
    ) -> bool:
        """Send one reply (or ack); False when it was dropped (logged and counted).

        Dropped: the topic is missing or unreachable; `kafka_replyPartition` is not a
        partition of it; the record is over the size bound (a reply over it is replaced
        by a small `invalid_request` error reply when that fits). Never raises.

        Arguments:
            where: (partition, offset) of the request, for the logs.
        """
        topic = reply_to.topic
        if self._is_missing(topic):
            self._on_drop()
            self.outbox.dropped(kind, "missing_topic", topic, where, "missing", quiet=True)
            return False
        try:
            async with asyncio.timeout(self.wait_s):
                partitions = await self.outbox.partitions_for(topic)
        except (TimeoutError, KafkaError) as exc:
            self._missing_now(topic, exc)
            self._on_drop()
            self.outbox.dropped(kind, "missing_topic", topic, where, "missing", quiet=True)
            return False
        except Exception as exc:  # anything else stays with this reply
            self.outbox.dropped(kind, "error", topic, where, repr(exc))
            return False
        if reply_to.partition is not None and reply_to.partition not in partitions:
            self.outbox.dropped(
                kind,
                "bad_partition",
                topic,
                where,
                f"{REPLY_PARTITION} {reply_to.partition} is not one of its "
                f"{len(partitions)} partitions",
            )
            return False
        headers = build_reply_headers(reply_to)
        limit = self.outbox.max_record_bytes
        size = record_size(reply_to.correlation_id, value, headers)
        if size > limit:
            small = _error_instead(reply_to, value, size, limit) if kind == "reply" else None
            if small is None or record_size(reply_to.correlation_id, small, headers) > limit:
                self.outbox.dropped(kind, "too_large", topic, where, f"{size} bytes over {limit}")
                return False
            self.outbox.dropped(
                kind,
                "replaced_too_large",
                topic,
                where,
                f"{size} bytes over {limit}: an invalid_request error reply is sent instead",
            )
            value = small
        return await self.outbox.send(
            kind,
            topic,
            key=reply_to.correlation_id,
            value=value,
            headers=headers,
            partition=reply_to.partition,
            where=where,
        )

    def _is_missing(self, topic: str) -> bool:
        until = self._missing.get(topic)
        if until is None:
            return False
        if time.monotonic() < until:
            self._missing.move_to_end(topic)
            return True
        del self._missing[topic]
        return False

    def _missing_now(self, topic: str, exc: BaseException) -> None:
        self._remember_missing(topic)
        self.outbox.forget_topic(topic)  # the producer's metadata stays bounded too
        log.warning(
            "reply topic %r is missing or unreachable (%s): its replies are dropped for %.0f s",
            topic,
            type(exc).__name__,
            self.forget_after_s,
        )

    def _remember_missing(self, topic: str) -> None:
        self._missing[topic] = time.monotonic() + self.forget_after_s
        self._missing.move_to_end(topic)
        while len(self._missing) > self.max_missing:
            self._missing.popitem(last=False)

    @property
    def missing_topics(self) -> int:
        """How many reply topics are remembered as missing (at most `max_missing`)."""
        return len(self._missing)


#: `"op":"..."` and `"index":"..."` near the start of an encoded reply (no JSON string can
#: hold them unescaped, so they are the reply's own fields)
_REPLY_FIELDS = re.compile(rb'"(op|index)":"([A-Za-z0-9._-]{0,128})"')


def _error_instead(reply_to: ReplyTo, value: bytes, size: int, limit: int) -> bytes | None:
    """A small `invalid_request` reply standing in for `value`, too large to send."""
    fields: dict[str, str] = {}
    for m in _REPLY_FIELDS.finditer(value[:16384]):  # the first of each: the reply's own
        fields.setdefault(m.group(1).decode(), m.group(2).decode())
    error = reply_too_large(
        "the reply is",
        size,
        limit,
        ask="a smaller k, fewer ids or query vectors, or without include_vectors and "
        "include_metadata",
    )
    return encode_error_reply(
        reply_to, fields.get("index", ""), error, took_ms=0.0, op=fields.get("op")
    )
