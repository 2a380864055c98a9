"""A warm standby's copy of one partition: restored from the owner's manifest, kept warm
by tailing the commands topic with a consumer of its own.

A read replica's `Follower` (follower.py) runs its copies on the worker's own group
consumer and runners, so it cannot sit inside an owner next to the partitions that owner
holds; a `WarmCopy` has a consumer of its own. What it applies, and how, is the same: it
reads the partition's manifest, takes its state (`Partition.take_manifest_state`: the
catalog, forwarding marks and members) and loads the snapshots it names (a segment gone
under it, garbage-collected by the owner, means the manifest moved on: it reads the
manifest again and starts over), then reads the commands partition (manually assigned,
no group, no commits) and applies each batch with the worker's own `apply_records` and
the replicas' read-only barrier steps (`MergeProtocol` over `follower.ReadOnlyWrites`):
every command kind, sharded creates, plain-name writes split at the home, forwarded
records, aliases, merge steps and imports. It writes nothing: no manifest, snapshot,
commit, ack, DLQ record, forwarded or protocol record, export or marker. So its state is
what the owner's is at the same offset.

A step that cannot be taken read-only (an export or import object gone, and a manifest
past the step's record: its owner finished it, `RestoreNeeded`) makes the copy load the
newest manifest again, as a replica restores again. While it loads, the copy is cold: not
reported, so the group never prefers it.

What only an owner produces for a record is handed over with the state: the records it
forwards (the home of a sharded index or alias) and the outcomes that ask for an ack or
are rejected, past the owner's last checkpoint seen (`Warm.unreported`); the new owner
produces them before it applies anything. What cannot be handed over (an export written
and a `merge_in` produced by a merge to another partition, a merge marker written by a
`merge_in`, or forwards dropped past `max_unreported`) is named by
`Warm.owner_steps_at`: a promotion from a manifest older than that offset restores from
the manifest instead, whose replay takes those steps again.

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
from lhv_index.errors import LhvError
from worker.kafka import positions
from worker.kafka.config import KafkaConfig
from worker.service.apply import (
    BarrierSteps,
    Outcome,
    RestoreNeeded,
    apply_records,
    decode_records,
)
from worker.service.catalog import CatalogEntry
from worker.service.partition import Partition
from worker.storage.snapshots import SnapshotGone, SnapshotStore
from worker.telemetry.logs import log_context
from worker.wire.commands import MergeCommand, MergeInCommand
from worker.wire.limits import MessageLimits
from worker.wire.topics import home_partition

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
    last checkpoint seen that forward records, asked for an ack or were rejected: the
    old owner may not have produced or reported them, a new owner does"""
    catalog: dict[str, CatalogEntry] = field(default_factory=dict)
    forwarded: dict[int, tuple[int, int]] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)
    """the partition's state beside its indexes (`Partition`), at `offset`"""
    owner_steps_at: int = -1
    """the newest offset applied here whose owner-only steps are not handed over (module
    docstring): a promotion from a manifest before it restores from the manifest"""

    @classmethod
    def of(cls, partition: Partition, **kw: Any) -> Warm:
        """`partition`'s state at its applied offset."""
        return cls(
            partition.number,
            dict(partition.indexes),
            partition.applied_offset,
            catalog=dict(partition.catalog),
            forwarded=dict(partition.forwarded),
            members=dict(partition.members),
            **kw,
        )


class LogReader(Protocol):
    """One partition of the commands topic, read without a group."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def bounds(self) -> tuple[int, int]:
        """(first offset held, log end)."""
        ...

    def seek(self, offset: int) -> None: ...

    async def read(self, *, timeout_ms: int, max_records: int) -> Sequence[Any]: ...

    def highwater(self) -> int | None:
        """The end of what can be read, as of the last read (None before one): the last
        stable offset, as `KafkaPort.highwater`."""
        ...

    async def position(self) -> int | None:
        """The offset read next, when known now; past transaction markers and aborted
        transactions' records, as `KafkaPort.position`."""
        ...


class KafkaLogReader:
    """`LogReader` over an aiokafka consumer with no group: assigned by hand, never
    committing."""

    def __init__(self, kafka: KafkaConfig, tp: TopicPartition, *, max_fetch_bytes: int) -> None:
        self._tp = tp
        self._consumer = AIOKafkaConsumer(
            **kafka.consumer_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max_fetch_bytes,
        )

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign([self._tp])

    async def stop(self) -> None:
        """Close the consumer, started or not (aiokafka's stop is idempotent)."""
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

    def highwater(self) -> int | None:
        return positions.readable_end(self._consumer, self._tp)

    async def position(self) -> int | None:
        return await positions.known_position(self._consumer, self._tp)


class WarmCopy:
    """A read-only, warm copy of partition `number` (module docstring).

    Arguments:
        store: the owner's manifests and snapshots (read only).
        reader: the commands partition, read without a group.
        num_partitions: partitions of the commands topic (home-partition checks).
        steps: the read-only barrier steps (merge, import; the workers' key for forwarded
            and protocol records): a `MergeProtocol` over `follower.ReadOnlyWrites`.
        seed: a state to go on from instead of loading the manifest (this worker owned
            the partition until this rebalance and checkpointed it).
        retry_s: wait between attempts when S3 or Kafka fail, or while no manifest covers
            the record that made the copy reload.
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
        steps: BarrierSteps,
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
        self._steps = steps
        self._max_records = max_records
        self._retry_s = retry_s
        self._manifest_poll_s = manifest_poll_s
        self._max_unreported = max_unreported
        self._unreported: deque[tuple[Outcome, int]] = deque()
        self._polled = 0.0
        self._state: Partition | None = None
        self._changed: dict[str, int] = {}
        self._owner_steps_at = -1
        self._reload_at = -1
        """a step at this offset could not be taken read-only: a manifest must cover it"""
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        """set once the loop applies nothing more (before the reader is closed)"""
        self._task: asyncio.Task[None] | None = None
        if seed is not None:
            self._state = Partition(
                number=number,
                indexes=seed.indexes,
                catalog=dict(seed.catalog),
                forwarded=dict(seed.forwarded),
                members=dict(seed.members),
            )
            self._state.applied_offset = seed.offset
            self._changed = dict(seed.changed)
            self._owner_steps_at = seed.owner_steps_at
        self._seeded = seed is not None
        self.loads = 0
        """manifests loaded (the first one, and again after a step needed a newer one)"""

    @property
    def offset(self) -> int | None:
        """The applied offset of the warm copy; None while it is cold or loading."""
        return self._state.applied_offset if self._state is not None else None

    @property
    def lag(self) -> int | None:
        """Records up to the log end (as of the last read) not yet applied here; None
        while cold, loading or before the first read."""
        hw = self._reader.highwater()
        if self._state is None or hw is None:
            return None
        return max(0, hw - 1 - self._state.applied_offset)

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
        return Warm.of(
            state,
            changed=dict(self._changed),
            unreported=list(self._unreported),
            owner_steps_at=self._owner_steps_at,
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
        if offset < self._reload_at:
            log.debug("standby copy waits for a checkpoint past offset %d", self._reload_at)
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
        state.take_manifest_state(manifest)
        state.applied_offset = offset
        self._state, self._changed, self._owner_steps_at = state, {}, -1
        self._unreported.clear()
        self._polled = time.monotonic()
        self._reader.seek(offset + 1)
        self.loads += 1
        log.info(
            "standby copy loaded: %d indexes at offset %d in %.2fs",
            len(indexes),
            offset,
            time.monotonic() - started,
        )
        return True

    async def _tail(self) -> None:
        """Apply records until stopped or a step needs the newest manifest."""
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
                # offsets that hold nothing to apply (transaction markers, aborted
                # transactions' records) are passed as the owner's runner passes them
                position = await self._reader.position()
                if position is not None and position - 1 > state.applied_offset:
                    state.applied_offset = position - 1
                continue
            decoded = await asyncio.to_thread(
                decode_records,
                records,
                partition=self.number,
                num_partitions=self._num_partitions,
                limits=self._limits,
            )
            try:
                outcomes = await asyncio.to_thread(
                    apply_records,
                    state,
                    records,
                    num_partitions=self._num_partitions,
                    limits=self._limits,
                    index_limits=self._index_limits,
                    barrier=self._steps,
                    decoded=decoded,
                )
            except RestoreNeeded as exc:
                self._reload_at = exc.offset
                self._state = None
                log.info(
                    "standby copy reloads from the newest manifest: %s",
                    exc,
                    extra={"offset": exc.offset},
                )
                return
            last = records[-1].offset
            for name in state.dirty:
                self._changed[name] = last
            state.dirty.clear()
            stamps = {r.offset: r.timestamp for r in records}
            for out in outcomes:
                if self._owner_only(out):
                    self._owner_steps_at = out.offset
                if out.error is not None or out.reply_to is not None or out.forwards:
                    out.command = None  # kept for its forwards, ack or DLQ record
                    if out.error is None:
                        out.value = None
                    self._unreported.append((out, stamps.get(out.offset, 0)))
            while len(self._unreported) > self._max_unreported:
                out, _ = self._unreported.popleft()
                if out.forwards:
                    self._owner_steps_at = max(self._owner_steps_at, out.offset)

    def _owner_only(self, out: Outcome) -> bool:
        """Whether `out`'s record had steps only its owner takes and a promotion cannot
        take later: an export written and `merge_in` produced (a merge to another
        partition), a marker written (a `merge_in` applied)."""
        cmd = out.command
        if isinstance(cmd, MergeInCommand):
            return True  # applied, refused or a duplicate: its marker may be unwritten
        return (
            out.error is None
            and isinstance(cmd, MergeCommand)
            and home_partition(cmd.dest.encode(), self._num_partitions) != self.number
        )

    async def _prune(self) -> None:
        """Forget the outcomes a checkpoint of the owner covers (its owner reported them,
        or a replay from that checkpoint would not report them either)."""
        self._polled = time.monotonic()
        manifest, _ = await self._store.read_manifest(self.number)
        covered = manifest.offset if manifest is not None else -1
        while self._unreported and self._unreported[0][0].offset <= covered:
            self._unreported.popleft()


def changed_since(warm: Warm, offset: int, manifest_names: Mapping[str, Any]) -> set[str]:
    """The indexes of `warm` whose state may differ from a manifest at `offset` naming
    `manifest_names`: changed here after `offset`, or not in the manifest."""
    return {
        name
        for name in warm.indexes
        if warm.changed.get(name, -1) > offset or name not in manifest_names
    }
