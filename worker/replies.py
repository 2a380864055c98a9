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
with a warning and remembers the topic as missing for a minute.

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
from collections.abc import Callable, Iterable
from fnmatch import translate
from typing import Any

from aiokafka.errors import KafkaError

from lhv_index.errors import InvalidRequest, LhvError
from worker.messages import ReplyTo

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
    """Produces replies and acks to requesters' reply topics (module docstring)."""

    def __init__(
        self,
        *,
        wait_s: float = 5.0,
        forget_after_s: float = 60.0,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self.wait_s = wait_s
        self.forget_after_s = forget_after_s
        self._on_drop = on_drop
        """called for each reply dropped (its topic missing or not answering)"""
        self._missing: dict[str, float] = {}
        """topic -> monotonic time until which it is taken as missing"""

    async def send(self, producer: Any, reply_to: ReplyTo, value: bytes) -> bool:
        """Queue one reply; False (logged) when its topic is missing or unreachable."""
        topic = reply_to.topic
        until = self._missing.get(topic)
        if until is not None:
            if time.monotonic() < until:
                self._on_drop()
                return False
            del self._missing[topic]
        try:
            async with asyncio.timeout(self.wait_s):
                await producer.send(
                    topic,
                    key=reply_to.correlation_id,
                    value=value,
                    partition=reply_to.partition,
                    headers=build_reply_headers(reply_to),
                )
        except (TimeoutError, KafkaError) as exc:
            self._missing[topic] = time.monotonic() + self.forget_after_s
            self._on_drop()
            log.warning(
                "reply topic %r is missing or unreachable (%s): its replies are dropped for %.0f s",
                topic,
                type(exc).__name__,
                self.forget_after_s,
            )
            return False
        return True


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
