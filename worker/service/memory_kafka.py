"""An in-memory command log and reply bus for fast unit tests of the service, in the
spirit of httpx's `MockTransport`: the real `Worker`, runners, ownership, search server
and merge protocol run over it, with no broker.

    broker = MemoryKafka({"lhv.commands": 2, "lhv.search": 2})
    async with Worker(config, kafka=broker.client(), blobs=MemoryBlobStore()) as w:
        task = asyncio.create_task(w.run())
        await broker.clients[0].assign([0, 1])      # the group gives this worker p0, p1
        broker.produce("lhv.commands", b"docs", b'{"op": "create", ...}')
        ...
        broker.records("lhv.replies.me")            # the replies and acks it sent
        broker.committed("lhv")                     # the offsets it committed

`MemoryKafka` is the broker: topics of partitions of records (offsets, keys, values,
headers, timestamps), a topic created on first produce unless `strict`, and the
committed offsets of each group. `MemoryClient` (one per worker, `broker.client()`)
implements `KafkaTransport`: assignment and revocation happen when a test calls
`assign(...)` (the listener sees revoked-then-assigned, as with aiokafka's eager
protocol); `poll` returns the records of assigned, unpaused partitions from their
positions (a partition never sought starts at its committed offset, else at the end, as
`auto_offset_reset="latest"`); a commit of a partition not assigned fails with
`CommitFailedError`, as a zombie's would. Its reply producer writes replies, acks and
DLQ records into the same broker. Nothing here is used by a running worker process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndTimestamp

from worker.wire.topics import home_partition

__all__ = ["MemoryClient", "MemoryKafka", "MemoryRecord"]


@dataclass(slots=True)
class MemoryRecord:
    """One record, shaped like aiokafka's `ConsumerRecord` where the worker reads it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0
    """milliseconds since the epoch (CreateTime)"""

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


class MemoryKafka:
    """The in-memory broker (module docstring).

    Arguments:
        topics: topic -> partition count, created up front.
        strict: producing to a topic not created fails (as with auto-creation off);
            otherwise a topic is created with one partition on first produce (replies).
    """

    def __init__(self, topics: Mapping[str, int] | None = None, *, strict: bool = False) -> None:
        self._logs: dict[str, list[list[MemoryRecord]]] = {}
        self._log_start: dict[TopicPartition, int] = {}
        self._commits: dict[str, dict[TopicPartition, int]] = {}
        self.commit_history: list[tuple[str, TopicPartition, int]] = []
        """every commit, in order: (group, partition, offset)"""
        self.strict = strict
        self.clients: list[MemoryClient] = []
        self._arrived: asyncio.Event | None = None
        for name, n in (topics or {}).items():
            self.create_topic(name, n)

    # -- topics and records --------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        if name not in self._logs:
            self._logs[name] = [[] for _ in range(partitions)]

    def partitions_of(self, topic: str) -> int:
        """Partition count of `topic`. Raises `UnknownTopicOrPartitionError`."""
        log = self._logs.get(topic)
        if log is None:
            raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist")
        return len(log)

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        headers: Sequence[tuple[str, bytes | None]] = (),
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> MemoryRecord:
        """Append one record; `partition` defaults to the key's (Kafka's murmur2
        partitioner), or 0 without a key."""
        if topic not in self._logs:
            if self.strict:
                raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist")
            self.create_topic(topic)
        parts = self._logs[topic]
        if partition is None:
            partition = home_partition(key, len(parts)) if key is not None else 0
        if not 0 <= partition < len(parts):
            raise UnknownTopicOrPartitionError(f"{topic!r} has no partition {partition}")
        log = parts[partition]
        rec = MemoryRecord(
            topic=topic,
            partition=partition,
            offset=self._log_start.get(TopicPartition(topic, partition), 0) + len(log),
            key=key,
            value=value,
            headers=[(k, v if v is not None else b"") for k, v in headers],
            timestamp=timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
        )
        log.append(rec)
        self._wake()
        return rec

    def records(self, topic: str, partition: int | None = None) -> list[MemoryRecord]:
        """The records of `topic` (all partitions, or one) still in the log."""
        parts = self._logs.get(topic, [])
        if partition is not None:
            return list(parts[partition]) if partition < len(parts) else []
        return [rec for log in parts for rec in log]

    def delete_records(self, topic: str, partition: int, before: int) -> None:
        """Drop the records before offset `before` (retention): the log starts there."""
        tp = TopicPartition(topic, partition)
        start = self._log_start.get(tp, 0)
        log = self._logs[topic][partition]
        drop = max(0, min(before - start, len(log)))
        del log[:drop]
        self._log_start[tp] = start + drop

    def log_start(self, tp: TopicPartition) -> int:
        self.partitions_of(tp.topic)
        return self._log_start.get(tp, 0)

    def log_end(self, tp: TopicPartition) -> int:
        return self.log_start(tp) + len(self._logs[tp.topic][tp.partition])

    def read(self, tp: TopicPartition, offset: int, max_records: int) -> list[MemoryRecord]:
        start = self.log_start(tp)
        log = self._logs[tp.topic][tp.partition]
        first = max(offset - start, 0)
        return log[first : first + max_records]

    # -- groups --------------------------------------------------------------------------

    def committed(self, group: str) -> dict[TopicPartition, int]:
        """The offsets committed by `group` (a copy)."""
        return dict(self._commits.get(group, {}))

    def commit(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        commits = self._commits.setdefault(group, {})
        for tp, offset in offsets.items():
            commits[tp] = offset
            self.commit_history.append((group, tp, offset))

    def client(self, group: str = "lhv") -> MemoryClient:
        """A new consumer of `group` (one worker's transport)."""
        client = MemoryClient(self, group)
        self.clients.append(client)
        return client

    # -- waiting for records -------------------------------------------------------------

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None

    async def wait_for_records(self, timeout_s: float) -> None:
        """Wait until a record is produced, at most `timeout_s`."""
        if self._arrived is None:
            self._arrived = asyncio.Event()
        arrived = self._arrived
        try:
            async with asyncio.timeout(timeout_s):
                await arrived.wait()
        except TimeoutError:
            pass


class _Future:
    """Shared helper: an already delivered future for the reply producer."""

    @staticmethod
    def done() -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class MemoryProducer:
    """The `Outbox`'s producer over the broker: every record is delivered at once."""

    def __init__(self, broker: MemoryKafka) -> None:
        self._broker = broker

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        if topic not in self._broker._logs and not self._broker.strict:
            self._broker.create_topic(topic)
        return set(range(self._broker.partitions_of(topic)))

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        partition: int | None,
    ) -> asyncio.Future[None]:
        self._broker.produce(topic, key, value, headers=headers, partition=partition)
        return _Future.done()


class MemoryClient:
    """One worker's `KafkaTransport` over a `MemoryKafka` (module docstring)."""

    def __init__(self, broker: MemoryKafka, group: str) -> None:
        self.broker = broker
        self.group = group
        self._topics: list[str] = []
        self._listener: ConsumerRebalanceListener | None = None
        self._assigned: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._highwater: dict[TopicPartition, int] = {}
        self.started = False
        self.stopped = False
        self.fail_sends = 0
        """`send_internal` fails this many times before it produces again (tests)"""
        self.send_error: Exception | None = None
        """what those failures raise (default `KafkaConnectionError`)"""

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        self._assigned.clear()

    # -- the group (driven by the test) ----------------------------------------------------

    def subscribe(self, topics: Sequence[str], *, listener: ConsumerRebalanceListener) -> None:
        self._topics = list(topics)
        self._listener = listener

    async def assign(self, partitions: Iterable[int]) -> None:
        """A rebalance: this worker now owns `partitions` of every subscribed topic. The
        listener is told of the revoked (the whole old assignment), then the assigned."""
        if self._listener is None:
            raise RuntimeError("assign() before subscribe()")
        old = sorted(self._assigned)
        await self._listener.on_partitions_revoked(old)
        self._assigned = set()
        new = {TopicPartition(t, p) for t in self._topics for p in partitions}
        for tp in old:
            self._positions.pop(tp, None)
            self._paused.discard(tp)
        self._assigned = new
        await self._listener.on_partitions_assigned(sorted(new))

    # -- KafkaTransport --------------------------------------------------------------------

    async def poll(self, *, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        out = self._fetch(max_records)
        if not out:
            await self.broker.wait_for_records(timeout_ms / 1000)
            out = self._fetch(max_records)
        return out

    def _fetch(self, max_records: int) -> dict[TopicPartition, list[Any]]:
        out: dict[TopicPartition, list[Any]] = {}
        room = max_records
        for tp in sorted(self._assigned):
            if tp in self._paused or room <= 0:
                continue
            position = self._position(tp)
            records = self.broker.read(tp, position, room)
            self._highwater[tp] = self.broker.log_end(tp)
            if records:
                out[tp] = list(records)
                self._positions[tp] = records[-1].offset + 1
                room -= len(records)
        return out

    def _position(self, tp: TopicPartition) -> int:
        position = self._positions.get(tp)
        if position is None:
            committed = self.broker.committed(self.group).get(tp)
            position = committed if committed is not None else self.broker.log_end(tp)
            self._positions[tp] = position
        return position

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.broker.partitions_of(topic)))

    def reply_producer(self) -> MemoryProducer:
        return MemoryProducer(self.broker)

    # -- KafkaPort -------------------------------------------------------------------------

    def _check(self, tp: TopicPartition) -> None:
        if tp not in self._assigned:
            raise CommitFailedError(f"{tp} is not assigned to this consumer")

    def _held(self, *partitions: TopicPartition) -> None:
        """aiokafka's check before pause, resume and seek."""
        for tp in partitions:
            if tp not in self._assigned:
                raise IllegalStateError(f"no longer assigned: {tp}")

    def pause(self, *partitions: TopicPartition) -> None:
        self._held(*partitions)
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._held(*partitions)
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._held(partition)
        self._positions[partition] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def highwater(self, partition: TopicPartition) -> int | None:
        return self._highwater.get(partition)

    def held_back(self, partition: TopicPartition) -> int:
        return 0  # no transactions here

    async def position(self, partition: TopicPartition) -> int | None:
        return self._positions.get(partition) if partition in self._assigned else None

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        await asyncio.sleep(0)
        for tp in offsets:
            self._check(tp)
        self.broker.commit(self.group, offsets)

    async def committed(self, partition: TopicPartition) -> int | None:
        return self.broker.committed(self.group).get(partition)

    async def beginning_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return {tp: self.broker.log_start(tp) for tp in partitions}

    async def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.broker.log_end(tp) for tp in partitions}

    async def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        out: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, since_ms in timestamps.items():
            found = next(
                (r for r in self.broker.read(tp, 0, 1 << 62) if r.timestamp >= since_ms), None
            )
            out[tp] = None if found is None else OffsetAndTimestamp(found.offset, found.timestamp)
        return out

    async def send_internal(
        self,
        topic: str,
        *,
        key: bytes,
        value: bytes,
        partition: int,
        headers: Sequence[tuple[str, bytes]],
    ) -> int:
        await asyncio.sleep(0)
        if self.fail_sends:
            self.fail_sends -= 1
            raise self.send_error or KafkaConnectionError("send failed (MemoryClient.fail_sends)")
        return self.broker.produce(topic, key, value, headers=headers, partition=partition).offset

    async def flush(self) -> None:
        pass
