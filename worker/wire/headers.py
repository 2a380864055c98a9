"""Spring `ReplyingKafkaTemplate` request/reply headers and the DLQ header set."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lhv_index.errors import InvalidRequest, LhvError
from worker.wire.limits import _DEFAULT_LIMITS, MessageLimits

__all__ = [
    "CORRELATION_ID",
    "DLQ_HEADER_NAMES",
    "DLQ_MESSAGE_MAX_BYTES",
    "ERROR_CODE",
    "ERROR_ITEM",
    "ERROR_MESSAGE",
    "ORIGINAL_HEADERS_DROPPED",
    "ORIGINAL_KEY_BYTES",
    "ORIGINAL_VALUE_BYTES",
    "ORIGINAL_VALUE_SHA256",
    "PROTOCOL_MAC",
    "REPLY_PARTITION",
    "REPLY_TOPIC",
    "SOURCE_OFFSET",
    "SOURCE_PARTITION",
    "SOURCE_TOPIC",
    "VALUE_TRUNCATED",
    "ReplyTo",
    "build_reply_headers",
    "check_headers",
    "correlation_text",
    "dlq_headers",
    "reply_key",
    "reply_to_from_headers",
    "request_headers",
]

# -- header names: the wire contract (DESIGN section 2, schemas/dlq_headers.schema.json) ------

#: Spring `ReplyingKafkaTemplate`: where a reply goes, and the id it carries back
REPLY_TOPIC = "kafka_replyTopic"
REPLY_PARTITION = "kafka_replyPartition"
CORRELATION_ID = "kafka_correlationId"
#: why a command went to the dead-letter topic, and where it came from
ERROR_CODE = "lhv_error_code"
ERROR_MESSAGE = "lhv_error_message"
ERROR_ITEM = "lhv_error_item"
SOURCE_TOPIC = "lhv_source_topic"
SOURCE_PARTITION = "lhv_source_partition"
SOURCE_OFFSET = "lhv_source_offset"
#: a dead-lettered record cut to fit the topic's bounds
VALUE_TRUNCATED = "lhv_value_truncated"
ORIGINAL_VALUE_BYTES = "lhv_original_value_bytes"
ORIGINAL_VALUE_SHA256 = "lhv_original_value_sha256"
ORIGINAL_KEY_BYTES = "lhv_original_key_bytes"
ORIGINAL_HEADERS_DROPPED = "lhv_original_headers_dropped"
#: every header the worker adds to a DLQ record: an original header of one of these names
#: is not kept (a record sent back from the DLQ and rejected again, or a producer's own
#: headers of these names, would otherwise carry a reason, an item or a cut that is not
#: this rejection's)
DLQ_HEADER_NAMES = frozenset(
    {
        ERROR_CODE,
        ERROR_MESSAGE,
        ERROR_ITEM,
        SOURCE_TOPIC,
        SOURCE_PARTITION,
        SOURCE_OFFSET,
        VALUE_TRUNCATED,
        ORIGINAL_VALUE_BYTES,
        ORIGINAL_VALUE_SHA256,
        ORIGINAL_KEY_BYTES,
        ORIGINAL_HEADERS_DROPPED,
    }
)
#: the HMAC of an internal protocol record (`merge_in`, `merge_done`)
PROTOCOL_MAC = "lhv_internal_mac"


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a reply or ack goes (Spring `ReplyingKafkaTemplate` headers)."""

    topic: str
    partition: int | None
    """None: the producer's partitioner picks (the reply key is the correlation id)"""
    correlation_id: bytes
    """opaque; sent back unchanged as header and key"""

    def to_wire(self) -> dict[str, Any]:
        """The JSON form carried by the internal merge commands."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "correlation_id_b64": base64.b64encode(self.correlation_id).decode("ascii"),
        }

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ReplyTo:
        """Inverse of `to_wire` (the schema has checked the shape)."""
        part = obj.get("partition")
        return cls(
            obj["topic"],
            None if part is None else int(part),
            base64.b64decode(obj["correlation_id_b64"]),
        )


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> bytes | None:
    """The last header named `name` (Kafka's `lastHeader`, as Spring reads it)."""
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def check_headers(headers: Sequence[tuple[str, bytes | None]], limits: MessageLimits) -> None:
    """Refuse a record whose headers are over the limits (count, total bytes, and the
    length of `kafka_correlationId`).

    Raises:
        InvalidRequest: naming the limit and its setting.
    """
    if len(headers) > limits.max_headers:
        raise InvalidRequest(
            f"{len(headers)} record headers are over the limit of {limits.max_headers}"
        )
    cid = _header(headers, CORRELATION_ID)
    if cid is not None and len(cid) > limits.max_correlation_id_bytes:
        raise InvalidRequest(
            f"{CORRELATION_ID} of {len(cid)} bytes is over the limit of "
            f"{limits.max_correlation_id_bytes}"
        )
    total = 0
    for key, value in headers:
        total += len(key) + (len(value) if value is not None else 0)
    if total > limits.max_header_bytes:
        raise InvalidRequest(
            f"record headers of {total} bytes are over the limit of {limits.max_header_bytes}"
        )


def reply_to_from_headers(
    headers: Sequence[tuple[str, bytes]], *, limits: MessageLimits | None = None
) -> ReplyTo | None:
    """Spring's `kafka_replyTopic`, `kafka_replyPartition` and `kafka_correlationId`.

    Reads headers only, so it works whatever the body is and a malformed request can still
    get its error reply. `kafka_replyPartition` is a 4-byte big-endian int (what Spring
    sends) or ASCII decimal digits. With `limits` (the default limits when not given),
    headers over them (`check_headers`) get no reply: an answer carrying them could not
    be sent.

    Returns:
        None when there is no `kafka_replyTopic` (nobody wants an answer).

    Raises:
        InvalidRequest: an empty or non-UTF-8 reply topic, a reply topic without a
            correlation id, an unreadable or negative partition, or headers over the
            limits.
    """
    check_headers(headers, limits or _DEFAULT_LIMITS)
    topic = _header(headers, REPLY_TOPIC)
    if topic is None:
        return None
    try:
        topic_s = bytes(topic).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{REPLY_TOPIC} is not UTF-8") from None
    if not topic_s:
        raise InvalidRequest(f"{REPLY_TOPIC} is empty")
    cid = _header(headers, CORRELATION_ID)
    if not cid:
        raise InvalidRequest(f"{REPLY_TOPIC} without {CORRELATION_ID}")
    raw_part = _header(headers, REPLY_PARTITION)
    partition: int | None = None
    if raw_part is not None:
        raw_part = bytes(raw_part)
        if raw_part.isdigit():  # bytes.isdigit: ASCII digits only
            partition = int(raw_part)
        elif len(raw_part) == 4:
            partition = int.from_bytes(raw_part, "big", signed=True)
        else:
            raise InvalidRequest(f"{REPLY_PARTITION} is not a partition number")
        if not 0 <= partition <= 2**31 - 1:
            raise InvalidRequest(f"{REPLY_PARTITION} {partition} is not a partition number")
    return ReplyTo(topic_s, partition, bytes(cid))


# -- encoding -----------------------------------------------------------------------------


def correlation_text(correlation_id: bytes) -> str:
    """A correlation id as it appears in reply bodies: UTF-8 text, else lowercase hex."""
    try:
        return correlation_id.decode("utf-8")
    except UnicodeDecodeError:
        return correlation_id.hex()


#: `lhv_error_message` is cut to this many UTF-8 bytes (on a character boundary)
DLQ_MESSAGE_MAX_BYTES = 4096


def build_reply_headers(reply_to: ReplyTo) -> list[tuple[str, bytes]]:
    """Headers of a reply or ack record: `kafka_correlationId`, the request's bytes."""
    return [(CORRELATION_ID, reply_to.correlation_id)]


def request_headers(reply_to: ReplyTo) -> list[tuple[str, bytes]]:
    """The request headers that ask for a reply to `reply_to` (the inverse of
    `reply_to_from_headers`): a record passed on for its requester carries them."""
    out = [(REPLY_TOPIC, reply_to.topic.encode("utf-8")), (CORRELATION_ID, reply_to.correlation_id)]
    if reply_to.partition is not None:
        out.append((REPLY_PARTITION, reply_to.partition.to_bytes(4, "big", signed=True)))
    return out


def reply_key(reply_to: ReplyTo) -> bytes:
    """Record key of a reply or ack: the correlation id."""
    return reply_to.correlation_id


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
        (ERROR_CODE, error.code.encode("ascii")),
        (ERROR_MESSAGE, message),
        (SOURCE_TOPIC, topic.encode("utf-8")),
        (SOURCE_PARTITION, str(partition).encode("ascii")),
        (SOURCE_OFFSET, str(offset).encode("ascii")),
    ]
    if error.item is not None:
        out.append((ERROR_ITEM, str(error.item).encode("ascii")))
    return out
