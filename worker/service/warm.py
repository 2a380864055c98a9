"""A warm standby's copy of one partition: restored from the owner's manifest, kept warm
by tailing the commands topic with a consumer of its own.

This is the smallest read-only copy a standby needs, beside the read replicas'
`Follower` (follower.py), which runs copies on the worker's own group consumer and
runners and so cannot sit inside an owner next to the partitions it owns. A `WarmCopy`
never writes anything: no manifest, snapshot, commit, ack, DLQ record or
protocol record. It reads the partition's manifest and loads the snapshots it names (a
segment gone under it, garbage-collected by the owner, means the manifest moved on: it
reads the manifest again and starts over), then reads the commands partition with a
consumer of its own (manually assigned, no group, no commits) and applies each batch
with the worker's own `apply_records`, so its state is what the owner's is at the same
offset.

Barriers that move items through S3 or Kafka (`merge`, `merge_in`, `merge_done`,
`import`) and anything of sharded indexes (a sharded create, an alias, a forwarded
record) are not applied here: at such a record the copy goes cold, and it is loaded
again from the owner's manifest once one covers that offset. A partition whose manifest
holds sharded state is not followed at all (checked again at each load). A cold copy is
not reported, so the group never prefers it and the partition restores from S3.

`handover()` stops the tail between two batches and gives the state to the caller (a
promotion: the partition was just assigned to this worker); it is what the worker's
`Standbys` (standby.py) hand to `Ownership`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from lhv_index import Index
from lhv_index import Limits as IndexLimits
from lhv_index.errors import Internal, LhvError
from worker.kafka.config import KafkaConfig
from worker.service.apply import Outcome, apply_records, decode_records
from worker.service.partition import Partition
from worker.service.protocol_auth import ProtocolAuth
from worker.storage.snapshots import SnapshotGone, SnapshotStore
from worker.telemetry.logs import log_context
from worker.wire.commands import (
    AliasCommand,
    Command,
    CreateCommand,
    DropCommand,
    ImportCommand,
    MergeCommand,
    MergeDoneCommand,
    MergeInCommand,
    UnaliasCommand,
)
from worker.wire.limits import MessageLimits
from worker.wire.shards import SHARD_SEPARATOR

__all__ = ["KafkaLogReader", "LogReader", "Warm", "WarmCopy", "changed_since"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Warm:
    """A partition's state as a warm copy holds it, handed over on promotion."""

    partition: int
    indexes: dict[str, Index]
    offset: int
    """the last command offset applied (-1: none)"""
    changed: dict[str, int] = field(default_factory=dict)
    """index -> the offset of the last record that changed it here (indexes unchanged
    since the follower loaded them are absent)"""
    unreported: list[tuple[Outcome, int]] = field(default_factory=list)
    """(outcome, record timestamp in ms) of the records applied here past the owner's
    last checkpoint seen that asked for an ack or were rejected: the old owner may not
    have reported them, a new owner does"""


class LogReader(Protocol):
    """One partition of the commands topic, read without a group."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def bounds(self) -> tuple[int, int]:
        """(first offset held, log end)."""
        ...

    def seek(self, offset: int) -> None: ...

    async def read(self, *, timeout_ms: int, max_records: int) -> Sequence[Any]: ...


class KafkaLogReader:
    """`LogReader` over an aiokafka consumer with no group: assigned by hand, never
    committing."""

    def __init__(self, kafka: KafkaConfig, tp: TopicPartition, *, max_fetch_bytes: int) -> None:
        self._tp = tp
        self._consumer = AIOKafkaConsumer(
            **kafka.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max_fetch_bytes,
        )
        self._started = False

    async def start(self) -> None:
        await self._consumer.start()
        self._started = True
        self._consumer.assign([self._tp])

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def bounds(self) -> tuple[int, int]:
        first = (await self._consumer.beginning_offsets([self._tp]))[self._tp]
        end = (await self._consumer.end_offsets([self._tp]))[self._tp]
        return int(first), int(end)

    def seek(self, offset: int) -> None:
        self._consumer.seek(self._tp, offset)

    async def read(self, *, timeout_ms: int, max_records: int) -> Sequence[Any]:
        data = await self._consumer.getmany(
            self._tp, timeout_ms=timeout_ms, max_records=max_records
        )
        records: list[Any] = data.get(self._tp, [])
        return records


class _Resync(Internal):
    """A barrier a read-only copy cannot apply: load again from a manifest past it."""


class _ReadOnlySteps:
    """The copy's `BarrierSteps`: every step that moves items through S3 or Kafka makes
    the copy cold instead (module docstring); records that need the workers' key are
    screened out before they are applied (`_cold`)."""

    @property
    def auth(self) -> ProtocolAuth:
        raise _Resync("signed records are not applied by a standby copy")

    def check_import(self, cmd: ImportCommand, index: Index, offset: int) -> None:
        raise _Resync("import")

    def merge(self, partition: Partition, cmd: MergeCommand, out: Outcome) -> None:
        raise _Resync("merge")

    def merge_in(self, partition: Partition, cmd: MergeInCommand, out: Outcome) -> None:
        raise _Resync("merge_in")

    def merge_done(self, partition: Partition, cmd: MergeDoneCommand, out: Outcome) -> None:
        raise _Resync("merge_done")

    def import_(self, partition: Partition, cmd: ImportCommand, out: Outcome) -> None:
        raise _Resync("import")


class WarmCopy:
    """A read-only, warm copy of partition `number` (module docstring).

    Arguments:
        store: the owner's manifests and snapshots (read only).
        reader: the commands partition, read without a group.
        num_partitions: partitions of the commands topic (home-partition checks).
        seed: a state to go on from instead of loading the manifest (this worker owned
            the partition until this rebalance and checkpointed it).
        retry_s: wait between attempts when S3 or Kafka fail, or while no manifest covers
            the record that made the copy cold.
    """

    def __init__(
        self,
        number: int,
        *,
        store: SnapshotStore,
        reader: LogReader,
        num_partitions: int,
        limits: MessageLimits,
        index_limits: IndexLimits,
        seed: Warm | None = None,
        max_records: int = 5_000,
        retry_s: float = 1.0,
        manifest_poll_s: float = 2.0,
        max_unreported: int = 100_000,
    ) -> None:
        self.number = number
        self._store = store
        self._reader = reader
        self._num_partitions = num_partitions
        self._limits = limits
        self._index_limits = index_limits
        self._max_records = max_records
        self._retry_s = retry_s
        self._manifest_poll_s = manifest_poll_s
        self._max_unreported = max_unreported
        self._unreported: deque[tuple[Outcome, int]] = deque()
        self._polled = 0.0
        self._state: Partition | None = None
        self._changed: dict[str, int] = {}
        self._cold_at = -1
        """a barrier at this offset made the copy cold: a manifest must cover it"""
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        """set once the loop applies nothing more (before the reader is closed)"""
        self._task: asyncio.Task[None] | None = None
        if seed is not None:
            self._state = Partition(number=number, indexes=seed.indexes)
            self._state.applied_offset = seed.offset
            self._changed = dict(seed.changed)
        self._seeded = seed is not None

    @property
    def offset(self) -> int | None:
        """The applied offset of the warm copy; None while it is cold or loading."""
        return self._state.applied_offset if self._state is not None else None

    def start(self) -> None:
        assert self._task is None, "a follower starts once"
        self._task = asyncio.create_task(self._run(), name=f"standby-{self.number}")

    async def stop(self) -> None:
        """Stop between two batches and close the reader. Idempotent."""
        self._stopping.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)

    @property
    def closing(self) -> asyncio.Task[None] | None:
        """The follower's task, still closing its reader after `handover`."""
        return self._task

    async def handover(self) -> Warm | None:
        """Stop applying, and give the warm state away (None when the copy was cold: a
        load in progress is abandoned). Returns as soon as no batch is being applied; the
        reader closes in the background (`closing`)."""
        self._stopping.set()
        task = self._task
        if task is not None and not task.done():
            if self._state is None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            else:
                idle = asyncio.ensure_future(self._idle.wait())
                await asyncio.wait({idle, task}, return_when=asyncio.FIRST_COMPLETED)
                idle.cancel()
        state, self._state = self._state, None
        if state is None:
            return None
        return Warm(
            self.number,
            state.indexes,
            state.applied_offset,
            dict(self._changed),
            list(self._unreported),
        )

    async def _run(self) -> None:
        with log_context(partition=self.number):
            try:
                await self._reader.start()
                while not self._stopping.is_set():
                    try:
                        if self._state is None and not await self._load():
                            await self._pause()
                            continue
                        await self._tail()
                    except (LhvError, KafkaError, OSError) as exc:
                        log.warning("standby copy failed, starting again: %s", exc)
                        self._state = None
                        await self._pause()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("standby copy crashed; the partition has no warm copy here")
                self._state = None
            finally:
                self._idle.set()
                try:
                    await self._reader.stop()
                except (KafkaError, OSError) as exc:
                    log.debug("standby reader did not close cleanly: %s", exc)

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._retry_s)

    async def _load(self) -> bool:
        """Load the owner's manifest and snapshots; False when not possible yet."""
        started = time.monotonic()
        manifest, _ = await self._store.read_manifest(self.number)
        offset = manifest.offset if manifest is not None else -1
        if offset < self._cold_at:
            log.debug("standby copy waits for a checkpoint past offset %d", self._cold_at)
            return False
        if manifest is not None and manifest.sharded:
            log.debug("the partition holds sharded indexes: no standby copy of it")
            return False
        indexes = {}
        try:
            for name, entry in (manifest.indexes if manifest else {}).items():
                indexes[name] = await self._store.load_index(name, entry)
        except SnapshotGone as exc:
            log.info("snapshot gone under the standby copy (owner's GC): %s; reloading", exc)
            return False
        first, _end = await self._reader.bounds()
        if offset + 1 < first:
            log.warning(
                "standby copy cannot follow: the log starts at %d, the checkpoint covers up to %d",
                first,
                offset,
            )
            return False
        state = Partition(number=self.number, indexes=indexes)
        state.applied_offset = offset
        self._state, self._changed = state, {}
        self._unreported.clear()
        self._polled = time.monotonic()
        self._reader.seek(offset + 1)
        log.info(
            "standby copy loaded: %d indexes at offset %d in %.2fs",
            len(indexes),
            offset,
            time.monotonic() - started,
        )
        return True

    async def _tail(self) -> None:
        """Apply records until stopped or the copy goes cold."""
        state = self._state
        assert state is not None
        if self._seeded:
            self._seeded = False
            self._reader.seek(state.applied_offset + 1)
        while not self._stopping.is_set():
            if time.monotonic() - self._polled >= self._manifest_poll_s:
                await self._prune()
            reading = asyncio.ensure_future(
                self._reader.read(timeout_ms=200, max_records=self._max_records)
            )
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not reading.done():  # stopped: a promotion waits for no fetch
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
                return
            records = [r for r in reading.result() if r.offset > state.applied_offset]
            if not records:
                continue
            decoded = await asyncio.to_thread(
                decode_records,
                records,
                partition=self.number,
                num_partitions=self._num_partitions,
                limits=self._limits,
            )
            stop = next((i for i, d in enumerate(decoded) if d.command and _cold(d.command)), None)
            outcomes = await asyncio.to_thread(
                apply_records,
                state,
                records[:stop],
                num_partitions=self._num_partitions,
                limits=self._limits,
                index_limits=self._index_limits,
                barrier=_ReadOnlySteps(),
                decoded=decoded[:stop],
            )
            cold = [o.offset for o in outcomes if isinstance(o.error, _Resync)]
            if stop is not None:
                cold.append(records[stop].offset)
            if cold:
                self._cold_at = min(cold)
                self._state = None
                log.info(
                    "standby copy cold at offset %d (not applied read-only); it reloads "
                    "from a checkpoint past it",
                    self._cold_at,
                )
                return
            last = records[-1].offset
            for name in state.dirty:
                self._changed[name] = last
            state.dirty.clear()
            stamps = {r.offset: r.timestamp for r in records}
            for out in outcomes:
                if out.error is not None or out.reply_to is not None:
                    out.command = None  # kept for its ack or DLQ record, not its vectors
                    if out.error is None:
                        out.value = None
                    self._unreported.append((out, stamps.get(out.offset, 0)))
            while len(self._unreported) > self._max_unreported:
                self._unreported.popleft()

    async def _prune(self) -> None:
        """Forget the outcomes a checkpoint of the owner covers (its owner reported them,
        or a replay from that checkpoint would not report them either)."""
        self._polled = time.monotonic()
        manifest, _ = await self._store.read_manifest(self.number)
        covered = manifest.offset if manifest is not None else -1
        while self._unreported and self._unreported[0][0].offset <= covered:
            self._unreported.popleft()


def _cold(cmd: Command) -> bool:
    """Whether a copy goes cold at `cmd`: a barrier that moves items through S3 or Kafka,
    or anything the sharding step must see (as `apply._may_shard`, or a forwarded
    record)."""
    if cmd.origin is not None:
        return True
    if isinstance(cmd, MergeCommand | MergeInCommand | MergeDoneCommand | ImportCommand):
        return True
    if isinstance(cmd, AliasCommand | UnaliasCommand):
        return True
    if isinstance(cmd, CreateCommand):
        return cmd.shards > 1 or SHARD_SEPARATOR in cmd.index
    return isinstance(cmd, DropCommand) and SHARD_SEPARATOR in cmd.index


def changed_since(warm: Warm, offset: int, manifest_names: Mapping[str, Any]) -> set[str]:
    """The indexes of `warm` whose state may differ from a manifest at `offset` naming
    `manifest_names`: changed here after `offset`, or not in the manifest."""
    return {
        name
        for name in warm.indexes
        if warm.changed.get(name, -1) > offset or name not in manifest_names
    }
