"""The narrow interfaces the parts of the worker use instead of the `Worker` itself.

`Worker` builds the parts and hands each the ports it needs, as aiokafka gives its
fetcher and group coordinator a shared client and subscription state and never the
consumer facade:

| part | gets |
| --- | --- |
| `Runner` (runner.py) | its `Partition`, a `KafkaPort` (resume), a checkpoint step, a `Reporter`, the barrier, `IndexObserver`, `Metrics`, the `HealthTracker`, `RunnerLimits` |
| `Ownership` (ownership.py) | a `PartitionRegistry`, a `KafkaPort`, `SearchPartitions`, the `SnapshotStore`, a `TaskOwner`, `IndexObserver`, `Metrics`, `CheckpointPolicy` and two settings |
| `SearchServer` (search.py) | a `PartitionRegistry` (read only), a `KafkaPort`, a `ReplyPort`, the reply-topic policy, a `TaskOwner`, `IndexObserver`, `Metrics`, `QueryPolicy`, `MessageLimits` and two settings |
| `MergeProtocol` (merge.py) | a `PartitionRegistry` (read only), a `KafkaPort` (protocol records), the `BlobStore`, a `TaskOwner`, the settings of merge and import |

`Metrics` (`worker.telemetry.metrics`) is itself the observer of counters and timings:
parts call it directly. `KafkaTransport` is what the `Worker` itself drives: the port
plus the poll, the subscription and the reply producer; `AiokafkaTransport`
(transport.py) is the real one, `MemoryKafka` (memory_kafka.py) the in-memory stand-in
for unit tests.

No module of `service/` but `worker.py` imports `worker.service.worker`
(`tests/unit/test_layout.py` checks it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from worker.service.outbox import Kind, ReplyProducer
from worker.service.partition import Partition
from worker.wire.headers import ReplyTo

if TYPE_CHECKING:  # apply.py imports sharding.py, which imports this module
    from worker.service.apply import Outcome

__all__ = [
    "KafkaPort",
    "KafkaTransport",
    "PartitionRegistry",
    "ReplyPort",
    "ReplyProducer",
    "Reports",
    "SearchPartitions",
    "TaskOwner",
]


class KafkaPort(Protocol):
    """The consumer's positions and offsets, and the producer of internal records.

    The consumer calls are aiokafka's (`AIOKafkaConsumer`), with its meaning: `pause`,
    `resume` and `seek` act on the next fetch; offsets are Kafka offsets.
    """

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    def highwater(self, partition: TopicPartition) -> int | None:
        """The end of what the consumer can read of `partition`, as of its last fetch
        (None: nothing fetched): the last stable offset, since records of a transaction
        still open are read once it ends."""
        ...

    def held_back(self, partition: TopicPartition) -> int:
        """Records past the last stable offset as of the last fetch: written after the
        first record of a transaction still open, so not readable yet (0 without)."""
        ...

    async def position(self, partition: TopicPartition) -> int | None:
        """The offset the consumer reads `partition` from next, when known now (never
        waits; None when not known or not assigned). It moves past the offsets that hold
        no record to read: transaction markers and aborted transactions' records."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit `offsets` for the group. Raises `KafkaError` (e.g. `CommitFailedError`
        once the partition is someone else's)."""
        ...

    async def committed(self, partition: TopicPartition) -> int | None: ...

    async def beginning_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]: ...

    async def end_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]: ...

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]: ...

    async def send_internal(
        self,
        topic: str,
        *,
        key: bytes,
        value: bytes,
        partition: int,
        headers: Sequence[tuple[str, bytes]],
    ) -> int:
        """Produce one internal record (a merge protocol step, a forwarded record) and
        wait until the broker took it (acks=all, idempotent); returns its offset. Records
        sent one after the other to one partition keep their order. Raises `KafkaError`."""
        ...

    async def flush(self) -> None:
        """Wait until the internal records sent so far are delivered."""
        ...


class KafkaTransport(KafkaPort, Protocol):
    """The `KafkaPort` plus what only the `Worker` uses: start and stop, the subscription
    with its rebalance listener, the poll, topic metadata, and the reply producer."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None: ...

    async def poll(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        """Records of the assigned, unpaused partitions (at most `max_records`), as
        `Intake.poll` returns them; waits at most `timeout_ms` for the first."""
        ...

    async def partitions_for(self, topic: str) -> set[int]:
        """The partitions of `topic`. Raises `KafkaError` when it does not exist."""
        ...

    def reply_producer(self) -> ReplyProducer | None:
        """The producer the `Outbox` uses; None: the `Outbox` makes its own (aiokafka)."""
        ...


class ReplyPort(Protocol):
    """Sends one reply or ack to a requester (`ReplySender`). Never raises."""

    async def look_up(self, topics: Iterable[str]) -> None:
        """Look up the reply topics of a batch of acks together, so that sending them
        waits for missing topics once, not once each. Never raises."""
        ...

    async def send(
        self,
        reply_to: ReplyTo,
        value: bytes,
        *,
        kind: Kind = "reply",
        where: tuple[int, int] | None = None,
    ) -> bool: ...


class Reports(Protocol):
    """What a runner does with the outcomes of an applied batch: the owner's `Reporter`
    sends acks and DLQ records; a read replica's sends nothing (its owner does)."""

    async def report(
        self,
        partition: Partition,
        outcomes: list[Outcome],
        *,
        timestamps: dict[int, int] | None = None,
    ) -> None:
        """Never raises (cancellation aside)."""
        ...


class PartitionRegistry(Protocol):
    """The partitions this worker owns, and their runners."""

    @property
    def partitions(self) -> dict[int, Partition]:
        """Owned partitions by number (restoring, serving or refused)."""
        ...

    @property
    def num_partitions(self) -> int:
        """Partitions of the commands (and search) topic; 0 before the worker started."""
        ...

    def start_runner(self, partition: Partition) -> None:
        """Start applying `partition`'s command records (it restored)."""
        ...

    async def stop_runner(self, number: int) -> None:
        """Let the runner finish its batch in flight, then stop it."""
        ...

    def forget_partition(self, number: int, indexes: Iterable[str] = ()) -> None:
        """The partition is gone: cancel its runner, drop its queries, metrics and health."""
        ...


class SearchPartitions(Protocol):
    """What ownership tells the search server about search partitions."""

    def assign(self, partitions: Iterable[int]) -> None: ...

    async def release(self, p: int) -> None: ...


class TaskOwner(Protocol):
    """Runs background tasks (`Supervisor` in tasks.py).

    `start`: a long-lived task; its crash ends `Worker.run()` with its error. `spawn`: a
    best-effort step; its failure is logged and counted, never fatal.
    """

    def start(self, coro: Coroutine[Any, Any, Any], *, name: str) -> Any: ...

    def spawn(self, coro: Awaitable[Any], *, name: str) -> None: ...
