"""The worker's Kafka transport over aiokafka: one consumer for both topics, one
idempotent producer for the merge protocol's records, and the intake that polls.

`AiokafkaTransport` implements `KafkaTransport` (ports.py); `MemoryKafka`
(memory_kafka.py) is the in-memory one of unit tests. Replies, acks and DLQ records do
not go through this producer but through the `Outbox`, which has its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.structs import OffsetAndTimestamp

from worker.kafka import joingroup, positions
from worker.kafka.assignor import StandbyAssignor
from worker.kafka.shutdown import stop_consumer
from worker.service.config import WorkerConfig
from worker.service.intake import Intake
from worker.service.outbox import ReplyProducer
from worker.telemetry.metrics import Metrics

__all__ = ["AiokafkaTransport"]


class AiokafkaTransport:
    """`KafkaTransport` over aiokafka (module docstring). `start()` connects; `stop()`
    closes the intake's client, the consumer (leaving the group), then the producer."""

    def __init__(
        self, config: WorkerConfig, metrics: Metrics, *, assignor: StandbyAssignor | None = None
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._assignor = assignor
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._intake: Intake | None = None

    async def start(self) -> None:
        config = self._config
        kw = config.kafka.client_kwargs()
        self._producer = AIOKafkaProducer(
            **kw,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            max_request_size=max(config.limits.max_message_bytes * 2, 1048576),
        )
        await self._producer.start()
        if self._assignor is not None:
            joingroup.install()  # two assignors listed: one JoinGroup per join
        self._consumer = AIOKafkaConsumer(
            **config.kafka.consumer_kwargs(),
            group_id=config.group_id,
            group_instance_id=config.group_instance_id,
            enable_auto_commit=False,
            # used only when a position is out of range: commands partitions are
            # sought by `Ownership`, search partitions by `SearchServer.assign`
            auto_offset_reset="latest",
            # LHV's assignor first; the range assignor is what the group falls back to
            # while a member lists only it (an older worker)
            partition_assignment_strategy=(
                (self._assignor, RangePartitionAssignor)
                if self._assignor is not None
                else (RangePartitionAssignor,)
            ),
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=max(1000, config.session_timeout_ms // 10),
            rebalance_timeout_ms=config.rebalance_timeout_ms,
            max_poll_interval_ms=max(300_000, config.rebalance_timeout_ms),
            max_partition_fetch_bytes=max(config.limits.max_message_bytes, 1048576),
            fetch_max_bytes=64 * 1024 * 1024,
        )
        await self._consumer.start()
        self._intake = Intake(
            self._consumer,
            kafka=config.kafka,
            topics=config.topics,
            limits=config.limits,
            metrics=self._metrics,
            fetch_max_bytes=max(config.limits.max_message_bytes, 1048576),
            max_inflated_bytes=config.max_inflated_batch_bytes,
        )

    async def stop(self) -> None:
        """Close what was started, in order. Idempotent."""
        intake, self._intake = self._intake, None
        if intake is not None:
            await intake.stop()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer)  # also when the broker is unreachable
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("transport not started")
        return self._consumer

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("transport not started")
        return self._producer

    # -- what the worker drives ----------------------------------------------------------

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None:
        intake = self._intake
        if intake is None:
            raise RuntimeError("transport not started")
        self.consumer.subscribe(list(topics), listener=_Counted(listener, intake.note_rebalance))

    async def poll(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        if self._intake is None:
            raise RuntimeError("transport not started")
        return await self._intake.poll(timeout_ms=timeout_ms, max_records=max_records)

    async def partitions_for(self, topic: str) -> set[int]:
        return set(await self.producer.partitions_for(topic))

    def reply_producer(self) -> ReplyProducer | None:
        return None  # the Outbox makes its own aiokafka producer

    # -- KafkaPort -----------------------------------------------------------------------

    def pause(self, *partitions: TopicPartition) -> None:
        self.consumer.pause(*partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.consumer.resume(*partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.seek(partition, offset)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def highwater(self, partition: TopicPartition) -> int | None:
        return positions.readable_end(self.consumer, partition)

    def held_back(self, partition: TopicPartition) -> int:
        return positions.held_back(self.consumer, partition)

    async def position(self, partition: TopicPartition) -> int | None:
        return await positions.known_position(self.consumer, partition)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await self.consumer.commit(dict(offsets))

    async def committed(self, partition: TopicPartition) -> int | None:
        offset: int | None = await self.consumer.committed(partition)
        return offset

    async def beginning_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return dict(await self.consumer.beginning_offsets(list(partitions)))

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return dict(await self.consumer.end_offsets(list(partitions)))

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        return dict(await self.consumer.offsets_for_times(dict(timestamps)))

    async def send_internal(
        self,
        topic: str,
        *,
        key: bytes,
        value: bytes,
        partition: int,
        headers: Sequence[tuple[str, bytes]],
    ) -> int:
        metadata = await self.producer.send_and_wait(
            topic, key=key, value=value, partition=partition, headers=list(headers)
        )
        return int(metadata.offset)

    async def flush(self) -> None:
        await self.producer.flush()


class _Counted(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells the intake of every rebalance before the worker's listener runs, so records
    fetched for the old assignment are never handed on (`intake._Poll`)."""

    def __init__(self, listener: ConsumerRebalanceListener, note: Callable[[], None]) -> None:
        self._listener = listener
        self._note = note

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._note()
        await self._listener.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._note()
        await self._listener.on_partitions_assigned(assigned)
