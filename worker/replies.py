"""Request/reply plumbing: Spring `ReplyingKafkaTemplate` headers, the reply-topic policy,
and the DLQ header set.

A reply carries `kafka_correlationId` (the request's bytes, unchanged) and the correlation
id as its key, so Java requesters using Spring Kafka interoperate. A reply is only ever
written to a topic matching the configured pattern (default `lhv.replies.*`, fnmatch
style), so a request can never make a worker write to `lhv.commands` or any other topic.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from lhv_index.errors import InvalidRequest, LhvError
from worker.messages import ReplyTo

__all__ = ["ReplyTopicPolicy", "build_reply_headers", "dlq_headers"]

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def build_reply_headers(reply_to: ReplyTo) -> list[tuple[str, bytes]]:
    """Headers of a reply or ack record."""
    return [("kafka_correlationId", reply_to.correlation_id)]


class ReplyTopicPolicy:
    """Which topics replies may go to (fnmatch pattern, e.g. `lhv.replies.*`)."""

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str = "lhv.replies.*") -> None:
        self.pattern = pattern
        self._regex = re.compile(fnmatch.translate(pattern))

    def allows(self, topic: str) -> bool:
        return bool(_TOPIC.match(topic)) and bool(self._regex.match(topic))

    def check(self, topic: str) -> None:
        """Raises InvalidRequest unless replies may be written to `topic`."""
        if not self.allows(topic):
            raise InvalidRequest(
                f"reply topic {topic!r} does not match the reply-topic pattern {self.pattern!r}"
            )

    def __repr__(self) -> str:
        return f"ReplyTopicPolicy({self.pattern!r})"


def dlq_headers(
    error: LhvError, topic: str, partition: int, offset: int
) -> Sequence[tuple[str, bytes]]:
    """The headers that say why a command went to the DLQ (values are UTF-8 text)."""
    out = [
        ("lhv_error_code", error.code.encode()),
        ("lhv_error_message", error.message.encode("utf-8", "replace")[:4096]),
        ("lhv_source_topic", topic.encode()),
        ("lhv_source_partition", str(partition).encode()),
        ("lhv_source_offset", str(offset).encode()),
    ]
    if error.item is not None:
        out.append(("lhv_error_item", str(error.item).encode()))
    return out
