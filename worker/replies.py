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
`max_missing` topics, least recently used forgotten first). A `kafka_replyPartition` that
the topic does not have drops the reply with a warning, and a reply too large to send is
replaced by a small `invalid_request` error reply; records go out through the worker's
`Outbox` (`worker/outbox.py`), which bounds their size and confines any failure to the
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
from fnmatch import translate

from aiokafka.errors import KafkaError

from lhv_index.errors import InvalidRequest, LhvError
from worker.messages import ReplyTo, encode_error_reply
from worker.outbox import Kind, Outbox, record_size

__all__ = [
    "DLQ_MESSAGE_MAX_BYTES",
    "FORBIDDEN_REPLY_TOPICS",
    "ReplySender",
    "ReplyTopicPolicy",
    "build_reply_headers",
    "dlq_headers",
    "reply_key",
]

#: the default command, search and dead-letter topics: never a reply topic
FORBIDDEN_REPLY_TOPICS = frozenset({"lhv.commands", "lhv.search", "lhv.commands.dlq"})
#: `lhv_error_message` is cut to this many UTF-8 bytes (on a character boundary)
DLQ_MESSAGE_MAX_BYTES = 4096

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")

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

    async def send(
        self,
        producer: object,
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
            producer: not used: replies go through `outbox`; kept for callers that pass
                the worker's producer.
            where: (partition, offset) of the request, for the logs.
        """
        del producer
        topic = reply_to.topic
        if self._is_missing(topic):
            self._on_drop()
            self.outbox.dropped(kind, "missing_topic", topic, where, "missing", quiet=True)
            return False
        try:
            async with asyncio.timeout(self.wait_s):
                partitions = await self.outbox.partitions_for(topic)
        except (TimeoutError, KafkaError) as exc:
            self._remember_missing(topic)
            self._on_drop()
            log.warning(
                "reply topic %r is missing or unreachable (%s): its replies are dropped for %.0f s",
                topic,
                type(exc).__name__,
                self.forget_after_s,
            )
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
                f"kafka_replyPartition {reply_to.partition} is not one of its "
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
    error = InvalidRequest(
        f"the reply is {size} bytes, over the limit of {limit} bytes for one reply record: "
        "ask for less (a smaller k, fewer ids or query vectors, or without include_vectors "
        "and include_metadata)"
    )
    return encode_error_reply(
        reply_to, fields.get("index", ""), error, took_ms=0.0, op=fields.get("op")
    )


def build_reply_headers(reply_to: ReplyTo) -> list[tuple[str, bytes]]:
    """Headers of a reply or ack record: `kafka_correlationId`, the request's bytes."""
    return [("kafka_correlationId", reply_to.correlation_id)]


def reply_key(reply_to: ReplyTo) -> bytes:
    """Record key of a reply or ack: the correlation id."""
    return reply_to.correlation_id


class ReplyTopicPolicy:
    """Which topics replies and acks may be written to.

    Arguments:
        pattern: fnmatch-style pattern of allowed topics (see the module doc).
        forbidden: topics refused even when they match; pass the configured command,
            search and DLQ topics when they differ from the defaults.
    """

    __slots__ = ("_forbidden", "_regex", "pattern")

    def __init__(
        self, pattern: str = "lhv.replies.*", *, forbidden: Iterable[str] = FORBIDDEN_REPLY_TOPICS
    ) -> None:
        if not pattern:
            raise ValueError("the reply-topic pattern is empty")
        self.pattern = pattern
        self._regex = re.compile(translate(pattern))
        self._forbidden = frozenset(forbidden)

    def allows(self, topic: str) -> bool:
        return (
            _TOPIC.fullmatch(topic) is not None
            and topic not in self._forbidden
            and self._regex.match(topic) is not None
        )

    def check(self, topic: str) -> None:
        """Return quietly when replies may go to `topic`.

        Raises:
            InvalidRequest: `topic` does not match the pattern, is forbidden, or is not a
                legal topic name.
        """
        if not self.allows(topic):
            raise InvalidRequest(
                f"reply topic {topic!r} is not allowed: replies go only to topics matching "
                f"{self.pattern!r}"
            )

    def __repr__(self) -> str:
        return f"ReplyTopicPolicy({self.pattern!r})"


def dlq_headers(
    error: LhvError, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """The headers that say why a command went to the DLQ (`schemas/dlq_headers.schema.json`).

    Values are UTF-8 text; numbers are decimal. `lhv_error_item` is present only when one
    item of the command is to blame. The caller adds them to the original headers.
    """
    message = error.message.encode("utf-8", "replace")
    if len(message) > DLQ_MESSAGE_MAX_BYTES:  # cut, then drop a split character
        message = message[:DLQ_MESSAGE_MAX_BYTES].decode("utf-8", "ignore").encode("utf-8")
    out = [
        ("lhv_error_code", error.code.encode("ascii")),
        ("lhv_error_message", message),
        ("lhv_source_topic", topic.encode("utf-8")),
        ("lhv_source_partition", str(partition).encode("ascii")),
        ("lhv_source_offset", str(offset).encode("ascii")),
    ]
    if error.item is not None:
        out.append(("lhv_error_item", str(error.item).encode("ascii")))
    return out
