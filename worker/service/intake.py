"""Reading records from the consumer so that no record can stop it.

aiokafka parses a fetched batch while `getmany` hands it out, and some records make that
parsing raise: a header key that is not UTF-8 (Kafka does not check header keys, so any
producer can write one) raises `UnicodeDecodeError` from the C parser, or
`CorruptRecordException` from the pure-Python one. The consumer's position does not
move, so every later poll (and every worker that takes the partition over) fails on the
same record. `Intake.poll` confines such a failure to the record:

1. It drains one partition per `getmany` call: the call that waits takes at most one
   record, and the rest is drained partition by partition. A failing call then loses
   nothing of other partitions (aiokafka advances the position of every partition a
   call drained before one failed, and those records would be lost).
2. The partition at fault is the one named in the failing call (or, for the waiting
   call, found in aiokafka's traceback; failing that, by draining the assigned
   partitions one at a time with a short wait until one fails again).
3. The batch at the partition's position is read again with a FetchRequest of our own
   (a separate `AIOKafkaClient`, started on first use; `read_committed`, as the
   consumer reads) and parsed by the lenient reader (`worker.service.recordbatch`), which leaves
   out aborted transactions' records as the consumer does. Its readable records are
   handed on as usual; each record that cannot be read becomes a `RejectedRecord`; then
   the consumer seeks past the batches read.
4. On the commands topic a `RejectedRecord` flows through the runner like any command
   that fails to decode: to the DLQ (built from its raw key, value and headers, header
   keys escaped) with `invalid_request`, and the applied offset moves past it. On the
   search topic it is logged, counted (`lhv_unreadable_records{topic}`) and skipped: a
   query without readable headers has nowhere to be answered.

Query records whose headers are over the limits (`MessageLimits.max_headers`,
`max_header_bytes`, `max_correlation_id_bytes`) are skipped here too (logged, counted in
`lhv_records_refused{reason}`): a reply carrying such a correlation id could not be sent.
Command records over them are refused by their decoder (to the DLQ, without an ack).

Only the parts of aiokafka that the worker cannot avoid are used: `getmany`, `position`,
`seek`, the client, and the fetch request and response layout (as aiokafka's own fetcher
reads it); tests pin them (`tests/unit/test_recordbatch.py`, the intake tests in
`tests/integration/test_kafka_edge.py`).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED
from aiokafka.errors import CorruptRecordException, KafkaError, for_code
from aiokafka.protocol.fetch import FetchRequest

from lhv_index.errors import InvalidRequest
from worker.kafka.config import KafkaConfig
from worker.service.recordbatch import RawRecord, UnreadableRecord, drop_aborted, read_batches
from worker.telemetry.metrics import Metrics
from worker.wire.headers import check_headers
from worker.wire.limits import MessageLimits
from worker.wire.topics import TopicsConfig

__all__ = [
    "HEADER_KEYS_NOT_UTF8",
    "Intake",
    "RejectedRecord",
    "escape_header_key",
]

log = logging.getLogger(__name__)

#: the error of a record whose only fault is a header key that is not UTF-8
HEADER_KEYS_NOT_UTF8 = "record header keys are not UTF-8"
#: how long each partition is waited for while looking for the one at fault
_PROBE_MS = 1000


def escape_header_key(key: bytes) -> str:
    """A header key as text: UTF-8, with the bytes that are not shown as `\\xNN`."""
    return key.decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record the Kafka client could not hand out, refused before decoding.

    It has the attributes of aiokafka's `ConsumerRecord` that the worker reads, so it
    travels the same path, and `error`, why it is refused.
    """

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    """header keys escaped (`escape_header_key`)"""
    error: InvalidRequest
    timestamp_type: int = 0


@dataclass(slots=True)
class _Poll:
    """What one `Intake.poll` gathered, call by call.

    A poll makes several `getmany` calls, with awaits between them, and a rebalance can
    run during any of them. Records that a call returned before a rebalance belong to
    the assignment before it: the partitions' new owners (this worker again, perhaps)
    seek where they resume, and those records come again from there. Handing them on
    would apply them out of order, ahead of the records before them. So each call's
    records are kept with the rebalance count at their return, and `records` keeps only
    the calls that returned after the last rebalance. (A call during which a rebalance
    ran returns records of the new assignment only: aiokafka waits for the assignment
    and drops what was fetched for the old one, and new partitions stay paused until
    their owner seeks.)
    """

    rebalances: Callable[[], int]
    calls: list[tuple[int, dict[TopicPartition, list[Any]]]] = field(default_factory=list)
    count: int = 0

    def add(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        if records:
            self.add_all({tp: list(records)})

    def add_all(self, data: Mapping[TopicPartition, Sequence[Any]]) -> None:
        kept = {tp: list(recs) for tp, recs in data.items() if recs}
        if kept:
            self.calls.append((self.rebalances(), kept))
            self.count += sum(len(recs) for recs in kept.values())

    @property
    def records(self) -> dict[TopicPartition, list[Any]]:
        """The records of the calls that returned after the last rebalance, in order."""
        now = self.rebalances()
        out: dict[TopicPartition, list[Any]] = {}
        for seen, data in self.calls:
            if seen != now:
                continue
            for tp, recs in data.items():
                out.setdefault(tp, []).extend(recs)
        return out


class Intake:
    """Polls a consumer; a record the client cannot parse stops neither the loop nor its
    partition (module docstring).

    Arguments:
        consumer: the worker's started consumer.
        kafka: how to reach Kafka (for the client that re-reads a failed batch).
        topics: the commands and search topics.
        limits: header limits of query records.
        metrics: counts unreadable and refused records.
        fetch_max_bytes: bytes asked for when a batch is re-read (a batch larger than
            that is still returned whole by the broker).
        max_inflated_bytes: a compressed batch that inflates past this is unreadable.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        kafka: KafkaConfig,
        topics: TopicsConfig,
        limits: MessageLimits,
        metrics: Metrics,
        fetch_max_bytes: int,
        max_inflated_bytes: int,
    ) -> None:
        self._consumer = consumer
        self._kafka = kafka
        self._topics = topics
        self._limits = limits
        self._metrics = metrics
        self._fetch_max_bytes = fetch_max_bytes
        self._max_inflated_bytes = max_inflated_bytes
        self._client: AIOKafkaClient | None = None
        self._closed = False
        self.rebalances = 0
        """rebalances seen (revoked or assigned callbacks): `note_rebalance` counts them"""

    def note_rebalance(self) -> None:
        """A rebalance is running: records already fetched are of the old assignment."""
        self.rebalances += 1

    async def stop(self) -> None:
        """Close the client that re-reads batches, if one was started. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def poll(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        """Records of every assigned partition, as `getmany` returns them, at most
        `max_records`; a command record that could not be read is a `RejectedRecord`.

        Raises:
            KafkaError: what `getmany` raises for the consumer as a whole (not a record).
        """
        poll = _Poll(lambda: self.rebalances)
        await self._drain((), timeout_ms, 1, poll)  # waits for the first record
        if poll.count == 0:
            return self._screen(poll.records)
        paused = self._consumer.paused()
        for tp in sorted(self._consumer.assignment()):
            room = max_records - poll.count
            if room <= 0:
                break
            if tp not in paused:
                await self._drain((tp,), 0, room, poll)
        return self._screen(poll.records)

    async def _drain(
        self, tps: tuple[TopicPartition, ...], timeout_ms: int, max_records: int, poll: _Poll
    ) -> None:
        try:
            data = await self._consumer.getmany(
                *tps, timeout_ms=timeout_ms, max_records=max_records
            )
        except CorruptRecordException as exc:
            await self._fault(tps, exc, poll)
        except KafkaError:
            raise
        except Exception as exc:
            await self._fault(tps, exc, poll)
        else:
            poll.add_all(data)

    async def _fault(
        self, tps: tuple[TopicPartition, ...], exc: BaseException, poll: _Poll
    ) -> None:
        tp = tps[0] if len(tps) == 1 else _partition_in_traceback(exc)
        if tp is None:
            tp = await self._find_fault(poll)
        if tp is None:
            log.warning("a poll failed and no partition could be blamed: %r", exc)
            await asyncio.sleep(0.2)
            return
        log.warning(
            "the Kafka client could not parse a record of %s/%d (%s: %s): reading it again "
            "leniently",
            tp.topic,
            tp.partition,
            type(exc).__name__,
            exc,
            extra={"partition": tp.partition},
        )
        try:
            async with asyncio.timeout(self._kafka.request_timeout_ms / 1000 * 2 + 10):
                await self._rescue(tp, poll)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the next poll meets the record again and retries
            log.warning(
                "re-reading %s/%d failed (%r): retrying at the next poll",
                tp.topic,
                tp.partition,
                err,
                extra={"partition": tp.partition},
            )
            await asyncio.sleep(0.5)

    async def _find_fault(self, poll: _Poll) -> TopicPartition | None:
        """Drain each assigned partition on its own, waiting a little, until one fails."""
        paused = self._consumer.paused()
        for tp in sorted(self._consumer.assignment()):
            if tp in paused:
                continue
            try:
                data = await self._consumer.getmany(tp, timeout_ms=_PROBE_MS)
            except CorruptRecordException:
                return tp
            except KafkaError:
                raise
            except Exception:
                return tp
            poll.add(tp, data.get(tp, []))
        return None

    async def _rescue(self, tp: TopicPartition, poll: _Poll) -> None:
        """Read the batches at `tp`'s position leniently, hand them on, seek past them."""
        consumer = self._consumer
        position = await consumer.position(tp)
        data, aborted = await self._fetch(tp, position)
        batches = await asyncio.to_thread(
            read_batches, data, max_inflated_bytes=self._max_inflated_bytes
        )
        batches = drop_aborted(batches, aborted)
        records: list[Any] = []
        end = position
        rejected = 0
        for batch in batches:
            if batch.next_offset <= position:
                continue
            end = batch.next_offset
            if batch.is_control:
                continue
            for raw in batch.records:
                if raw.offset < position:
                    continue
                rec = self._convert(tp, raw)
                if isinstance(rec, RejectedRecord):
                    rejected += 1
                    self._metrics.unreadable_record(_topic_label(tp, self._topics))
                    log.warning(
                        "record rejected at intake: %s",
                        rec.error.message,
                        extra={"partition": tp.partition, "offset": rec.offset},
                    )
                    if tp.topic != self._topics.commands:
                        continue  # a query: nowhere to answer it
                records.append(rec)
        if end == position:
            log.warning(
                "re-reading %s/%d at %d returned no complete batch: polling again",
                tp.topic,
                tp.partition,
                position,
                extra={"partition": tp.partition},
            )
            await asyncio.sleep(0.2)
            return
        if tp not in consumer.assignment() or await consumer.position(tp) != position:
            return  # revoked or moved meanwhile: the records are read again from there
        consumer.seek(tp, end)
        log.info(
            "read %s/%d offsets %d..%d leniently: %d records handed on, %d rejected",
            tp.topic,
            tp.partition,
            position,
            end - 1,
            len(records),
            rejected,
            extra={"partition": tp.partition},
        )
        poll.add(tp, records)

    def _convert(self, tp: TopicPartition, raw: RawRecord | UnreadableRecord) -> Any:
        if isinstance(raw, UnreadableRecord):
            return RejectedRecord(
                topic=tp.topic,
                partition=tp.partition,
                offset=raw.offset,
                timestamp=0,
                key=None,
                value=raw.raw,
                headers=(),
                error=InvalidRequest(f"{raw.error} (the DLQ value is the raw record bytes)"),
            )
        if not raw.header_keys_are_utf8:
            return RejectedRecord(
                topic=tp.topic,
                partition=tp.partition,
                offset=raw.offset,
                timestamp=raw.timestamp,
                timestamp_type=raw.timestamp_type,
                key=raw.key,
                value=raw.value,
                headers=tuple((escape_header_key(k), v) for k, v in raw.headers),
                error=InvalidRequest(HEADER_KEYS_NOT_UTF8),
            )
        return ConsumerRecord(
            topic=tp.topic,
            partition=tp.partition,
            offset=raw.offset,
            timestamp=raw.timestamp,
            timestamp_type=raw.timestamp_type,
            key=raw.key,
            value=raw.value,
            checksum=None,
            serialized_key_size=len(raw.key) if raw.key is not None else -1,
            serialized_value_size=len(raw.value) if raw.value is not None else -1,
            headers=[(k.decode("utf-8"), v) for k, v in raw.headers],
        )

    async def _fetch(self, tp: TopicPartition, offset: int) -> tuple[bytes, list[tuple[int, int]]]:
        """The record set at `offset` of `tp` as the broker returns it to a
        `read_committed` consumer (up to the last stable offset), and the aborted
        transactions among it (producer id, first offset)."""
        async with asyncio.timeout(self._kafka.request_timeout_ms / 1000 + 5):
            client = await self._raw_client()
            await client.add_topic(tp.topic)
            leader = client.cluster.leader_for_partition(tp)
            if leader is None or leader < 0:
                await client.force_metadata_update()
                leader = client.cluster.leader_for_partition(tp)
            if leader is None or leader < 0:
                raise KafkaError(f"no leader known for {tp}")
            request = FetchRequest(
                0,  # max wait: the data is there
                1,
                self._fetch_max_bytes,
                READ_COMMITTED,  # as the consumers read (`KafkaConfig.consumer_kwargs`)
                [(tp.topic, [(tp.partition, offset, self._fetch_max_bytes)])],
            )
            response = await client.send(leader, request)
        for _topic, partitions in response.topics:
            for partition, error_code, _highwater, *part_data in partitions:
                if partition != tp.partition:
                    continue
                if error_code:
                    raise for_code(error_code)(f"re-reading {tp} at {offset}")
                return bytes(part_data[-1] or b""), _aborted(response.API_VERSION, part_data)
        return b"", []

    async def _raw_client(self) -> AIOKafkaClient:
        if self._closed:
            raise RuntimeError("intake stopped")
        if self._client is None:
            client = AIOKafkaClient(**self._kafka.client_kwargs())
            await client.bootstrap()
            self._client = client
        return self._client

    def _screen(self, data: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """Skip query records whose headers are over the limits (logged and counted)."""
        for tp, records in data.items():
            if tp.topic != self._topics.search:
                continue
            kept = []
            for rec in records:
                try:
                    check_headers(rec.headers or (), self._limits)
                except InvalidRequest as exc:
                    self._metrics.record_refused("headers_over_limits")
                    log.warning(
                        "query skipped unanswered: %s",
                        exc.message,
                        extra={"partition": tp.partition, "offset": rec.offset},
                    )
                    continue
                kept.append(rec)
            data[tp] = kept
        return {tp: recs for tp, recs in data.items() if recs}


def _aborted(version: int, part_data: list[Any]) -> list[tuple[int, int]]:
    """The aborted transactions of a fetch response's partition (producer id, first
    offset), as aiokafka's fetcher reads them: v11 and later [lso, log start, aborted,
    preferred replica, records]; v4 to v10 [lso, (log start,) aborted, records]."""
    if version >= 11:
        aborted = part_data[2]
    elif version >= 4:
        aborted = part_data[-2]
    else:
        aborted = None
    return [(int(pid), int(first)) for pid, first in aborted or ()]


def _partition_in_traceback(exc: BaseException) -> TopicPartition | None:
    """The partition aiokafka's fetcher was handing out when `exc` was raised: the local
    `tp` of its innermost frame that has one (`fetched_records`, `FetchResult.getall`,
    `PartitionRecords._unpack_records` in aiokafka 0.14)."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if not frame.f_code.co_filename.replace("\\", "/").endswith("aiokafka/consumer/fetcher.py"):
            continue
        tp = frame.f_locals.get("tp")
        if isinstance(tp, TopicPartition):
            found = tp
    return found


def _topic_label(tp: TopicPartition, topics: TopicsConfig) -> str:
    return "commands" if tp.topic == topics.commands else "search"
