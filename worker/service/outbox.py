"""The worker's outgoing records about other producers' input: DLQ records, acks and
query replies.

    outbox = Outbox(kafka_config, delivery_config, metrics)
    await outbox.start()
    await outbox.send("dlq", topic, key=k, value=v, headers=h, where=(partition, offset))
    await outbox.flush()          # before a checkpoint commits what they report on
    await outbox.stop()

Why a producer of their own, and not idempotent. Kafka's idempotent producer numbers the
batches of each partition; after the broker rejects one (a record over
`message.max.bytes`), every later batch to that partition fails with
`OutOfOrderSequenceNumber` until the producer restarts: one oversized reply would silence
a requester's reply topic, or the DLQ, for good. Duplicates are harmless here (acks and
DLQ records are at least once anyway, replies are matched by correlation id), so this
producer is not idempotent, and a rejected record fails alone. The worker's own protocol
records (`merge_in`, `merge_done`) keep the idempotent producer.

Every record is also checked before it is sent against the producer's
`max_request_size` and the broker-side bound (`DeliveryConfig`), so a rejection is the
exception: a DLQ record is cut to fit (`fit_dlq_record`), an ack or reply over the bound
is not sent (the reply sender turns a large reply into a small error reply first).

`send` never raises for one record: whatever fails (the size, an unknown partition, a
producer error) is logged with the source partition and offset, counted in
`lhv_outgoing_dropped{kind, reason}`, and the caller goes on. Delivery is tracked: a
record the broker rejects later is logged and counted the same way (a DLQ record the
broker refuses for its size is sent again without its value), and `flush()` waits for
everything in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.kafka.config import KafkaConfig
from worker.service.config import DeliveryConfig
from worker.telemetry.metrics import Metrics
from worker.wire.headers import (
    DLQ_HEADER_NAMES,
    ORIGINAL_HEADERS_DROPPED,
    ORIGINAL_KEY_BYTES,
    ORIGINAL_VALUE_BYTES,
    ORIGINAL_VALUE_SHA256,
    VALUE_TRUNCATED,
)

__all__ = ["DlqRecord", "Kind", "Outbox", "ReplyProducer", "fit_dlq_record", "record_size"]

log = logging.getLogger(__name__)

Kind = Literal["dlq", "ack", "reply"]
Headers = list[tuple[str, bytes | None]]

#: a DLQ record's key is cut to this many bytes (index names are at most 128)
DLQ_KEY_MAX_BYTES = 1024
#: bound on waiting for the producer to take one record (its buffer, or metadata)
SEND_TIMEOUT_S = 10.0


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, Any]]) -> int:
    """Upper bound of one record's bytes in a batch of its own (batch header included),
    as aiokafka's producer computes it for `max_request_size`."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """A DLQ record that fits the bounds, and whether anything was cut to make it fit."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    truncated: bool


def fit_dlq_record(
    key: bytes | None,
    value: bytes | None,
    original_headers: Sequence[tuple[str, bytes | None]],
    error_headers: Sequence[tuple[str, bytes]],
    *,
    max_record_bytes: int,
    max_headers: int,
    max_header_bytes: int,
) -> DlqRecord | None:
    """The DLQ record for a rejected record: its key, value and headers, then the error
    headers, cut to fit `max_record_bytes` (`schemas/dlq_headers.schema.json`).

    - Original headers are kept in order up to `max_headers` of them and
      `max_header_bytes` in all; `lhv_original_headers_dropped` counts the rest. Those
      named like the headers added here (`DLQ_HEADER_NAMES`) are left out: they would
      describe another rejection (a record sent back from the DLQ) or none.
    - A key over 1 KiB is cut; `lhv_original_key_bytes` gives its size.
    - A value that does not fit is cut to what does (possibly nothing), with
      `lhv_value_truncated: true`, `lhv_original_value_bytes` and
      `lhv_original_value_sha256` (hex) of the whole value.

    Returns None only when even the error headers alone do not fit (a bound far too
    small). CPU: a hash of the value when it is cut; run it in a thread for large values.
    """
    headers: Headers = []
    total = dropped = 0
    for hkey, hvalue in original_headers:
        if hkey in DLQ_HEADER_NAMES:
            continue
        size = len(hkey.encode("utf-8", "backslashreplace")) + len(hvalue or b"")
        if len(headers) >= max_headers or total + size > max_header_bytes:
            dropped += 1
            continue
        headers.append((hkey, hvalue))
        total += size
    truncated = False
    if dropped:
        headers.append((ORIGINAL_HEADERS_DROPPED, str(dropped).encode()))
        truncated = True
    headers.extend(error_headers)
    if key is not None and len(key) > DLQ_KEY_MAX_BYTES:
        headers.append((ORIGINAL_KEY_BYTES, str(len(key)).encode()))
        key = key[:DLQ_KEY_MAX_BYTES]
        truncated = True
    if record_size(key, value, headers) <= max_record_bytes:
        return DlqRecord(key, value, headers, truncated)
    assert value is not None  # a None value is one byte: only the headers can be too big
    headers.extend(_cut_headers(value))
    room = max_record_bytes - record_size(key, b"", headers) - 8  # the length varint grows
    if room < 0:
        return None
    return DlqRecord(key, value[:room], headers, True)


def _cut_headers(value: bytes) -> Headers:
    return [
        (VALUE_TRUNCATED, b"true"),
        (ORIGINAL_VALUE_BYTES, str(len(value)).encode()),
        (ORIGINAL_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()),
    ]


class ReplyProducer(Protocol):
    """What the `Outbox` sends replies, acks and DLQ records with (aiokafka's producer)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        partition: int | None,
    ) -> Any:
        """Queue one record; returns an awaitable of its delivery (a future)."""
        ...


class Outbox:
    """Sends DLQ records, acks and replies on a producer of their own (module docstring).

    Arguments:
        kafka: how to reach Kafka.
        config: the size bounds.
        metrics: `outgoing_failed(kind, reason)` is called for each record not delivered.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        config: DeliveryConfig,
        metrics: Metrics,
        *,
        producer: ReplyProducer | None = None,
    ) -> None:
        self._kafka = kafka
        self.config = config
        self._metrics = metrics
        self._given = producer
        self._producer: ReplyProducer | AIOKafkaProducer | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def max_record_bytes(self) -> int:
        return self.config.max_record_bytes

    async def start(self) -> None:
        if self._producer is not None:
            raise RuntimeError("outbox already started")
        if self._given is not None:
            self._producer = self._given
            await self._producer.start()
            return
        self._producer = AIOKafkaProducer(
            **self._kafka.client_kwargs(),
            acks="all",
            enable_idempotence=False,  # see the module docstring
            linger_ms=0,
            max_request_size=self.config.max_request_bytes,
        )
        await self._producer.start()

    async def stop(self) -> None:
        """Wait (bounded) for what is in flight, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._producer is not None:
            await self.flush()
            await self._producer.stop()

    async def partitions_for(self, topic: str) -> set[int]:
        """The partitions of `topic` (waits for its metadata).

        Raises:
            KafkaError: the topic does not exist (or metadata could not be had).
        """
        return set(await self._live().partitions_for(topic))

    async def send(
        self,
        kind: Kind,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        partition: int | None = None,
        where: tuple[int, int] | None = None,
        retry_small: bool = False,
    ) -> bool:
        """Queue one record; False (logged, counted) when it was not taken.

        Arguments:
            where: (source partition, source offset) of the record this one is about,
                for the logs.
            retry_small: a DLQ record the broker refuses for its size is sent once more
                without its value (its size and hash are in its headers).

        Never raises (cancellation aside). Delivery is tracked: see `flush()`.
        """
        size = record_size(key, value, headers)
        if size > self.max_record_bytes:
            self.dropped(
                kind, "too_large", topic, where, f"{size} bytes over {self.max_record_bytes}"
            )
            return False
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                fut = await self._live().send(
                    topic, key=key, value=value, headers=headers, partition=partition
                )
        except TimeoutError:
            self.dropped(kind, "timeout", topic, where, "the producer did not take it in time")
            return False
        except Exception as exc:
            self.dropped(kind, _reason(exc), topic, where, repr(exc))
            return False
        self._in_flight.add(fut)
        fut.add_done_callback(
            lambda f: self._delivered(
                f,
                kind,
                topic,
                where,
                (key, value, list(headers), partition) if retry_small else None,
            )
        )
        return True

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything sent so far is delivered or failed (at most `timeout_s`)."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)

    def forget_topic(self, topic: str) -> None:
        """Stop keeping the metadata of `topic` (a reply topic found missing).

        aiokafka's producer adds every topic it is asked about to the set its client
        refreshes, for good, and asks the broker about all of them at each refresh: made-up
        reply topic names would grow that set, and every metadata request, without bound.
        """
        client = getattr(self._producer, "client", None)
        tracked = getattr(client, "_topics", None)
        if isinstance(tracked, set):
            tracked.discard(topic)

    def _live(self) -> ReplyProducer | AIOKafkaProducer:
        if self._producer is None or self._closed:
            raise RuntimeError("outbox not started, or stopped")
        return self._producer

    def _delivered(
        self,
        fut: asyncio.Future[Any],
        kind: Kind,
        topic: str,
        where: tuple[int, int] | None,
        again: tuple[bytes | None, bytes | None, Headers, int | None] | None,
    ) -> None:
        self._in_flight.discard(fut)
        if fut.cancelled():
            self.dropped(kind, "cancelled", topic, where, "cancelled")
            return
        exc = fut.exception()
        if exc is None:
            return
        self.dropped(kind, _reason(exc), topic, where, repr(exc))
        if again is not None and isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
            key, value, headers, partition = again
            if value and not any(k == VALUE_TRUNCATED for k, _ in headers):
                headers = [*headers, *_cut_headers(value)]
            task = asyncio.ensure_future(
                self.send(
                    kind,
                    topic,
                    key=key,
                    value=b"",
                    headers=headers,
                    partition=partition,
                    where=where,
                )
            )
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def dropped(
        self,
        kind: Kind,
        reason: str,
        topic: str,
        where: tuple[int, int] | None,
        detail: str,
        *,
        quiet: bool = False,
    ) -> None:
        """Log (unless `quiet`: already said once) and count one record not sent, or not
        delivered."""
        self._metrics.outgoing_failed(kind, reason)
        if quiet:
            return
        extra: dict[str, Any] = {}
        if where is not None:
            extra = {"partition": where[0], "offset": where[1]}
        level = logging.ERROR if kind == "dlq" else logging.WARNING
        log.log(level, "%s to %r not sent (%s): %s", kind, topic, reason, detail, extra=extra)


def _reason(exc: BaseException) -> str:
    """A short label for a send failure (a metric label value)."""
    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return "too_large"
    if isinstance(exc, AssertionError):
        return "bad_partition"
    if isinstance(exc, KafkaError):
        return type(exc).__name__
    return "error"
