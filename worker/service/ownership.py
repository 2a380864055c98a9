"""Partition ownership: restore on assignment, checkpoint on revoke, fencing.

The consumer group decides which worker owns partition p of the commands topic (and,
with a co-partitioning assignor and equal partition counts, the same p of the search
topic).
This module turns those decisions into state:

- assigned: pause p, read its manifest, load its snapshots, claim the manifest (a
  conditional write with a higher generation, which fences any older owner), seek to
  `manifest.offset + 1`, resume, and serve once the replay reaches the log end seen at
  assignment. If the log no longer holds `manifest.offset + 1`, refuse p loudly unless
  the worker was told to accept data loss. When this worker keeps a warm standby copy of
  p (standby.py), the copy is promoted instead of loading the snapshots: the manifest is
  claimed all the same, the copy's indexes are kept, and the replay starts at the copy's
  applied offset + 1.
- checkpoint at offset O (the runner's policy, a revoke, a stop): two parts.
  1. The capture, between two batches, while the runner waits (`begin_checkpoint`): each
     dirty index is captured under its lock in a thread (a delta of what changed since
     its last snapshot, or a base, as the store's `DeltaPolicy` decides from the manifest
     entry and `Partition.persisted` allows), a copy that needs no lock afterwards. The
     capture also drops the tombstones below the horizon: one past the newest durable
     checkpoint at least `tombstone_retention_ms` old. The dirty set, the drop flag and
     the policy's counters then start again from O: an index changed after its capture
     is dirty for the next checkpoint.
  2. The rest, in a background task (`checkpoint-<p>`, `Partition.checkpointing`) while
     the runner goes on applying: flush the records sent so far, encode and upload each
     capture (no lock held), write the manifest naming O (conditional on the ETag we
     hold), commit O + 1, then garbage collection and the merge steps O covers. If an
     upload or the manifest write fails, what was captured is dirty again and, its change
     tracking being spent, its next snapshot is a base; the next attempt waits for a
     backoff.
  At most one checkpoint of a partition is in flight: the runner starts the next one only
  once it ended; `checkpoint` (revoke, stop, tests) waits for the one in flight, then takes
  its own and waits for it. A memory note: all dirty indexes of O are captured before the
  first upload (the manifest names one offset for all, and only the runner's wait keeps
  the indexes at O), so a checkpoint holds their captures together at first (a base's
  engine part is an unlinked temporary file, page cache rather than process memory; the
  rest are copies); each capture is released (its files closed) as soon as its upload
  ends, not with the checkpoint, and at once when the checkpoint fails, is fenced or is
  cancelled. `Fenced` (the manifest write) means the partition is someone else's now: its
  state is dropped (cancelling a checkpoint in flight) and the next owner replays; a
  failed commit after the manifest is only logged (restores start from the manifest).
- revoked: finish the batch in flight, wait for the checkpoint in flight, checkpoint,
  commit the search offset, and park the state (past half the rebalance timeout, the
  checkpoint in flight is cancelled and awaited: no manifest is written by a worker that
  let the partition go); if the same partition comes back and its manifest is still
  ours, the parked state is reused instead of reloaded from S3.

What runs where: captures in worker threads, with the runner waiting; flush, uploads
(encoding in a thread), manifest, commit in the `checkpoint-<p>` task on the loop; the
restore in the `restore-<p>` task; the rebalance callbacks where the Kafka consumer calls
them during a rebalance.

Partition p of the search topic is positioned by the search server when it is assigned
(its committed offset, else the first record younger than the maximum query age; see
worker/service/search.py), and its offset is committed by the search server on its own cadence:
the checkpoint commits only the commands offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from lhv_index import Base, Delta, Index
from lhv_index.errors import LhvError
from worker.service import failpoints
from worker.service.apply import Outcome
from worker.service.config import CheckpointPolicy
from worker.service.observer import IndexObserver
from worker.service.partition import Partition, PartitionStatus
from worker.service.ports import KafkaPort, PartitionRegistry, SearchPartitions, TaskOwner
from worker.service.standby import Standbys
from worker.service.warm import Warm, changed_since
from worker.storage.snapshots import (
    Fenced,
    IndexEntry,
    Manifest,
    SegmentKind,
    SnapshotStore,
    capture_in_thread,
)
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import Metrics
from worker.wire.topics import TopicsConfig

__all__ = ["Ownership"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: deferred items inserted per call after a restore (the index's lock is held for one)
DEFERRED_CHUNK = 512


@dataclass(slots=True)
class _Snapshot:
    """One dirty index captured for a checkpoint."""

    name: str
    index: Index
    """the index object captured (`Partition.persisted` names it once the manifest is
    written)"""
    entry: IndexEntry | None
    """the manifest entry a delta extends; None for a base"""
    data: Base | Delta | None
    """the capture; None once uploaded or abandoned (`release`)"""

    def release(self) -> None:
        """Drop the capture, closing a base's engine files (idempotent)."""
        if isinstance(self.data, Base):
            self.data.close()
        self.data = None


@dataclass(frozen=True, slots=True)
class _Capture:
    """What a checkpoint took between two batches (dirty again if no manifest names it)."""

    entries: dict[str, IndexEntry]
    """the manifest entries of the indexes that did not change"""
    snapshots: list[_Snapshot]
    dropped: bool
    horizon: int | None
    sharded: dict[str, Any]
    """the partition's catalog, forwarding marks and members at the capture (`Manifest`)"""


class Ownership(ConsumerRebalanceListener):  # type: ignore[misc]
    """The worker's rebalance listener and the owner of partition lifecycles.

    Arguments:
        registry: the owned partitions and their runners.
        kafka: pauses, seeks and resumes commands partitions, commits their offsets.
        search: told of assigned search partitions and of revoked ones.
        store: snapshots and manifests.
        flush: waits for every record sent so far (protocol records, acks, DLQ
            records): a checkpoint flushes before it covers their offsets.
        tasks: restores are long-lived tasks (a crash is fatal); garbage collection and
            the steps run after a checkpoint are best effort.
        accept_data_loss: serve a partition whose log lost records past its checkpoint.
        rebalance_timeout_ms: a checkpoint on revoke takes at most half of it.
        report: produces the forwards, then the acks and DLQ records, of what a promoted
            standby copy applied past the manifest (awaited before the runner starts).
    """

    def __init__(
        self,
        *,
        topics: TopicsConfig,
        registry: PartitionRegistry,
        kafka: KafkaPort,
        search: SearchPartitions,
        store: SnapshotStore,
        flush: Callable[[], Awaitable[None]],
        tasks: TaskOwner,
        observer: IndexObserver,
        metrics: Metrics,
        policy: CheckpointPolicy,
        accept_data_loss: bool = False,
        rebalance_timeout_ms: int = 120_000,
        standbys: Standbys | None = None,
        standby_plan: Callable[[], frozenset[int] | None] | None = None,
        report: Callable[[Partition, list[Outcome], dict[int, int]], Awaitable[None]] | None = None,
    ) -> None:
        self._topics = topics
        self._registry = registry
        self._kafka = kafka
        self._search = search
        self._store = store
        self._flush = flush
        self._tasks = tasks
        self._observer = observer
        self._metrics = metrics
        self._policy = policy
        self._accept_data_loss = accept_data_loss
        self._rebalance_timeout_ms = rebalance_timeout_ms
        self._standbys = standbys
        self._standby_plan = standby_plan
        self._report = report
        self._parked: dict[int, Partition] = {}
        self._warm: dict[int, Warm] = {}
        """standby copies taken for a restore in progress"""
        self._late: dict[int, list[tuple[Outcome, int]]] = {}
        """what a promoted copy applied past the manifest, to forward and report first"""
        self._restores: dict[int, asyncio.Task[Any]] = {}

    # -- rebalance callbacks -------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in revoked if tp.topic == self._topics.commands})
        if not numbers:
            return
        self._metrics.rebalance()
        log.info("partitions revoked: %s", numbers)
        for p in numbers:
            task = self._restores.pop(p, None)
            if task is not None:
                task.cancel()
        await asyncio.gather(*(self.release(p, park=True) for p in numbers))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # first, before any await: no search record is fetched from a position not chosen
        self._search.assign(
            sorted({tp.partition for tp in assigned if tp.topic == self._topics.search})
        )
        numbers = sorted({tp.partition for tp in assigned if tp.topic == self._topics.commands})
        log.info("partitions assigned: %s", numbers)
        self._reconcile_standbys(numbers)
        for p in list(self._parked):
            if p not in numbers:
                del self._parked[p]
        for p in numbers:
            self._kafka.pause(self._commands_tp(p))
            partition = Partition(number=p)
            self._registry.partitions[p] = partition
            self._restores[p] = self._tasks.start(self._restore(partition), name=f"restore-{p}")

    def _reconcile_standbys(self, numbers: list[int]) -> None:
        """Keep the standby copies the assignment names (none when the group used another
        protocol); a partition this worker owned until now and keeps as a standby goes on
        from its parked state."""
        if self._standbys is None:
            return
        plan = self._standby_plan() if self._standby_plan is not None else None
        wanted = sorted(set(plan or ()) - set(numbers))
        seeds = {
            p: Warm.of(part)
            for p in wanted
            if (part := self._parked.get(p)) is not None
            and part.checkpoint_offset == part.applied_offset
        }
        if wanted or plan is not None:
            log.info("standby partitions: %s", wanted)
        self._standbys.reconcile(wanted, keep=numbers, seeds=seeds)

    def held(self) -> dict[int, int]:
        """Partition -> applied offset of what this worker owns or parked (its report to
        the group, with its standby copies)."""
        out = {p: part.applied_offset for p, part in self._parked.items()}
        for p, part in self._registry.partitions.items():
            if part.status in (PartitionStatus.SERVING, PartitionStatus.RESTORING):
                out[p] = max(part.applied_offset, out.get(p, -1))
        return out

    # -- restore -------------------------------------------------------------------------

    async def _restore(self, partition: Partition) -> None:
        p = partition.number
        tp = self._commands_tp(p)
        started = time.monotonic()
        with log_context(partition=p):
            try:
                nbytes = await self._retrying(
                    "restore",
                    lambda: self._load(partition),
                    on_error=lambda: self._metrics.restore_failed(p),
                )
                if partition.status is PartitionStatus.REFUSED:
                    await partition.notify()
                    return
                late = self._late.pop(p, None)
                if late and self._report is not None:
                    # before any record is applied: the forwards of the records the copy
                    # applied go first, in origin order, ahead of the runner's own
                    await self._report(
                        partition, [o for o, _ in late], {o.offset: ts for o, ts in late}
                    )
                self._registry.start_runner(partition)
                self._kafka.seek(tp, partition.applied_offset + 1)
                self._kafka.resume(tp)
                log.info(
                    "partition restored in %.2fs: %d indexes, checkpoint offset %d, "
                    "replaying to %d",
                    time.monotonic() - started,
                    len(partition.indexes),
                    partition.checkpoint_offset,
                    partition.ready_offset,
                )
                self._metrics.observe_restore(p, time.monotonic() - started, nbytes)
                self._observer.observe_indexes(partition)
                if partition.mark_ready_if_caught_up():
                    log.info("partition serving at offset %d", partition.applied_offset)
                await partition.notify()
                self._tasks.spawn(self._insert_deferred(partition), name=f"settle-{p}")
            except asyncio.CancelledError:
                raise
            except Fenced as exc:
                log.warning("partition claimed by another worker while restoring: %s", exc)
                self._drop(partition)
            finally:
                self._restores.pop(p, None)
                self._warm.pop(p, None)
                self._late.pop(p, None)

    async def _insert_deferred(self, partition: Partition) -> None:
        """Once `partition` serves, end the deferral its restore turned on
        (`SnapshotStore.load_index`) and insert the deferred items of each index into
        its engine, a chunk per call (`DEFERRED_CHUNK`) so that searches and the runner's
        writes interleave with it. Stops when the partition is revoked."""
        p = partition.number
        with log_context(partition=p):
            while not partition.serves(None):
                if partition.status in (PartitionStatus.REVOKED, PartitionStatus.REFUSED):
                    return
                await partition.wait_for(None, timeout_s=5.0)
            for name, index in list(partition.indexes.items()):
                await asyncio.to_thread(index.defer_inserts, False)
                total = index.pending_inserts
                if not total:
                    continue
                started = time.monotonic()
                log.info(
                    "index %s: inserting %d items deferred by the restore, in the background",
                    name,
                    total,
                    extra={"index": name},
                )
                left = total
                while left and not partition.revoked and partition.indexes.get(name) is index:
                    left = await asyncio.to_thread(index.settle, DEFERRED_CHUNK)
                if not left:
                    log.info(
                        "index %s: %d deferred items inserted in %.1fs",
                        name,
                        total,
                        time.monotonic() - started,
                        extra={"index": name},
                    )

    async def _take_warm(self, p: int) -> Warm | None:
        """p's standby copy here, taken from `Standbys` (kept across the attempts of
        one restore)."""
        if p not in self._warm and self._standbys is not None:
            warm = await self._standbys.promote(p)
            if warm is not None:
                self._warm[p] = warm
        return self._warm.get(p)

    async def _load(self, partition: Partition) -> int | None:
        """Load p's checkpoint and claim p; returns the snapshot bytes read from S3 (None
        when nothing was read)."""
        p = partition.number
        store = self._store
        manifest, etag = await store.read_manifest(p)
        parked = self._parked.pop(p, None)
        warm = await self._take_warm(p)
        tp = self._commands_tp(p)
        log_start = (await self._kafka.beginning_offsets([tp]))[tp]
        log_end = (await self._kafka.end_offsets([tp]))[tp]
        covered = manifest.offset if manifest else -1
        nbytes = None
        if parked is not None and etag is not None and parked.etag == etag:
            partition.indexes = parked.indexes
            partition.persisted = parked.persisted
            partition.history = parked.history
            log.info("reusing in-memory state of partition (manifest unchanged)")
            start, source = covered + 1, "parked"
        elif warm is not None and warm.offset + 1 >= log_start and warm.owner_steps_at <= covered:
            # The warm copy is the state at warm.offset: go on from there (before or past
            # the manifest, replaying from warm.offset + 1 is correct either way). What
            # differs from the manifest's entries is dirty; nothing is a delta on them.
            # The catalog, marks and members are the copy's (a checkpoint writes them).
            names = manifest.indexes if manifest else {}
            partition.indexes = warm.indexes
            partition.catalog = dict(warm.catalog)
            partition.forwarded = dict(warm.forwarded)
            partition.members = dict(warm.members)
            partition.persisted = {}
            partition.history = []
            partition.dirty = changed_since(warm, covered, names)
            partition.dropped = bool(set(names) - set(warm.indexes))
            start, source = warm.offset + 1, "standby"
            log.info(
                "partition %d promoted from standby at offset %d (manifest %d): no snapshot "
                "download",
                p,
                warm.offset,
                covered,
            )
        elif manifest is not None:
            indexes = {}
            for name, entry in manifest.indexes.items():
                with log_context(index=name, offset=entry.offset):
                    indexes[name] = await store.load_index(name, entry, defer=True)
            partition.indexes = indexes
            partition.persisted = dict(indexes)
            partition.history = []
            nbytes = sum(e.bytes + e.delta_bytes for e in manifest.indexes.values())
            start, source = covered + 1, "snapshot"
        else:
            start, source = 0, "empty"
        if source != "standby":
            partition.take_manifest_state(manifest)
        if warm is not None and source != "standby":
            log.info(
                "standby copy of partition %d at offset %d not used (its owner-only steps "
                "at offset %d are past the manifest, or the log moved on)",
                p,
                warm.offset,
                warm.owner_steps_at,
            )
        if start < log_start:
            reason = (
                f"the log starts at offset {log_start} but the checkpoint covers only up to "
                f"{start - 1}: records {start}..{log_start - 1} are gone (retention?)"
            )
            if not self._accept_data_loss:
                partition.status = PartitionStatus.REFUSED
                partition.refused_reason = reason
                log.error(
                    "REFUSING partition %d: %s. Restore the topic, or start the worker with "
                    "--accept-data-loss to serve what is left.",
                    p,
                    reason,
                )
                self._metrics.set_partition(p, PartitionStatus.REFUSED.value, -1, -1, 0)
                return nbytes
            log.warning("accepting data loss on partition %d: %s", p, reason)
            start = log_start
        # Claim: a conditional write with a higher generation fences the previous owner.
        claim = replace(
            manifest or Manifest(topic=self._topics.commands, partition=p),
            generation=(manifest.generation if manifest else 0) + 1,
        )
        partition.manifest, partition.etag = await store.write_manifest(claim, etag=etag)
        self._warm.pop(p, None)
        self._metrics.restored(source)
        if manifest is not None:
            partition.durable(manifest.written_at, manifest.offset)
        partition.applied_offset = start - 1
        partition.ready_offset = log_end - 1
        partition.last_checkpoint = time.monotonic()
        if source == "standby" and warm is not None:
            # What the copy applied past the checkpoint, the old owner may never have
            # forwarded, acknowledged or dead-lettered: produced before the runner starts
            # (`_restore`), as a replay from the checkpoint would (a forward the old owner
            # did produce is skipped as a duplicate by its origin; acks of records older
            # than the replay bound are skipped).
            self._late[p] = [(o, ts) for o, ts in warm.unreported if o.offset > covered]
        return nbytes

    # -- checkpoint ----------------------------------------------------------------------

    async def begin_checkpoint(self, partition: Partition, *, reason: str) -> bool:
        """The runner's step between batches: capture the dirty indexes now (in a thread;
        the runner waits for this part only), then upload, write the manifest and commit
        in the background. False when none was started: none is needed, one is in flight
        (it must end first), or the partition is not served.

        Must be called by the partition's runner: nothing applies to it meanwhile.
        """
        if partition.checkpoint_in_flight or not self._due(partition):
            return False
        captured: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._start(partition, reason, captured)
        waits: set[asyncio.Future[Any]] = {captured, task}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return True

    async def checkpoint(self, partition: Partition, *, reason: str) -> bool:
        """Checkpoint one partition and wait for the end: the checkpoint in flight first,
        then a new one. True when the state is durable, False when S3 failed (retried
        later) or the partition is not ours any more. Cancelled (a revoke past its
        timeout), it cancels the checkpoint in flight.

        Must be called by the partition's runner or after it stopped (revoke, stop).
        """
        await self._settle(partition)
        if not self._serving(partition):
            return False
        if not self._due(partition):
            return True
        captured: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        return await self._start(partition, reason, captured)

    def _serving(self, partition: Partition) -> bool:
        return partition.status in (PartitionStatus.SERVING, PartitionStatus.RESTORING)

    def _due(self, partition: Partition) -> bool:
        return (
            self._serving(partition)
            and partition.manifest is not None
            and partition.needs_checkpoint
        )

    async def _settle(self, partition: Partition) -> None:
        """Wait for the checkpoint in flight, if any (cancelled with the caller)."""
        while (task := partition.checkpointing) is not None and not task.done():
            await asyncio.gather(task, return_exceptions=True)

    async def _abandon(self, partition: Partition) -> None:
        """Cancel the checkpoint in flight, if any, and wait until it has ended."""
        task = partition.checkpointing
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start(
        self, partition: Partition, reason: str, captured: asyncio.Future[None]
    ) -> asyncio.Task[bool]:
        task: asyncio.Task[bool] = self._tasks.start(
            self._checkpoint(partition, reason, captured), name=f"checkpoint-{partition.number}"
        )
        partition.checkpointing = task
        return task

    async def _checkpoint(
        self, partition: Partition, reason: str, captured: asyncio.Future[None]
    ) -> bool:
        """One checkpoint at the applied offset: the capture (`captured` is resolved once
        it is taken, failed or not), then flush, uploads, manifest and commit."""
        p = partition.number
        offset = partition.applied_offset
        started = time.monotonic()
        with log_context(partition=p, offset=offset):
            log.info("checkpoint started (%s)", reason)
            try:
                capture = await self._capture(partition, offset)
            except LhvError as exc:
                self._failed(partition, None, reason, exc)
                partition.pace.ended(started, time.monotonic() - started, durable=False)
                return False
            finally:
                if not captured.done():
                    captured.set_result(None)
            try:
                await self._flush()
                entries = dict(capture.entries)
                for snap in capture.snapshots:
                    with log_context(index=snap.name):
                        entries[snap.name] = await self._upload(partition, snap, offset)
                    snap.release()  # now, not with the last upload
                    failpoints.hit("mid_snapshot")
                assert partition.manifest is not None
                manifest = replace(
                    partition.manifest, offset=offset, indexes=entries, **capture.sharded
                )
                partition.manifest, partition.etag = await self._store.write_manifest(
                    manifest, etag=partition.etag
                )
            except Fenced as exc:
                log.error("checkpoint fenced, dropping partition: %s", exc)
                self._drop(partition)
                return False
            except LhvError as exc:
                self._failed(partition, capture, reason, exc)
                partition.pace.ended(started, time.monotonic() - started, durable=False)
                return False
            except asyncio.CancelledError:
                self._undo(partition, capture)
                partition.pace.ended(started, time.monotonic() - started, durable=False)
                raise
            finally:
                for snap in capture.snapshots:  # the captures not uploaded: abandoned
                    snap.release()
            self._done(partition, capture, reason, time.monotonic() - started)
            partition.pace.ended(started, time.monotonic() - started, durable=True)
            failpoints.hit("after_manifest")
            try:
                await self._kafka.commit({self._commands_tp(p): offset + 1})
            except (CommitFailedError, KafkaError) as exc:
                log.warning("commit failed after checkpoint (ownership moving?): %s", exc)
            self._tasks.spawn(self._store.collect_garbage(partition.manifest), name=f"gc-{p}")
            due = [step for at, step in partition.after_checkpoint if at <= offset]
            partition.after_checkpoint = [
                (at, step) for at, step in partition.after_checkpoint if at > offset
            ]
            for step in due:
                self._tasks.spawn(step(), name=f"after_checkpoint-{p}")
        return True

    def _chain_too_long(self, partition: Partition, entry: IndexEntry) -> bool:
        """A restore loads a base, then takes every delta's items into a buffer searched
        exactly and inserts them into HNSW in the background (`load_index(defer=True)`):
        a chain whose estimated insert time (`Pace.chain_s`) has passed
        `CheckpointPolicy.max_deferred_s` gets a new base, so that background work and
        the exact scan beside it stay bounded however cheap deltas are to write."""
        budget = self._policy.max_deferred_s
        if budget <= 0 or not entry.deltas:
            return False
        chain = partition.pace.chain_s(entry.delta_bytes)
        return chain is not None and chain > budget

    async def _capture(self, partition: Partition, offset: int) -> _Capture:
        """Capture every dirty index at `offset`, each under its lock in a thread: a delta
        when the manifest's entry holds this very index (`Partition.persisted`), the
        store's `DeltaPolicy` allows one and the chain is within its restore budget
        (`_chain_too_long`), else a base; tombstones below the horizon are
        dropped by the capture. Then the dirty set, the drop flag and the policy counters
        start again from `offset` (an index changed from now on is dirty again)."""
        assert partition.manifest is not None
        manifest = partition.manifest
        entries = {
            name: e
            for name, e in manifest.indexes.items()
            if name in partition.indexes and name not in partition.dirty
        }
        horizon = partition.horizon(self._policy.tombstone_retention_ms / 1000, time.time())
        snapshots: list[_Snapshot] = []
        try:
            for name in sorted(partition.dirty):
                index = partition.indexes[name]
                entry = manifest.indexes.get(name)
                if partition.persisted.pop(name, None) is not index:
                    entry = None  # never saved, or replaced, or a capture of it was lost: a base
                # a base would insert every deferred item under the index's lock first:
                # while there are any, the chain is extended (they go in the background)
                if entry is not None and not index.pending_inserts:
                    past_bound = self._store.next_kind(entry) is SegmentKind.BASE
                    if past_bound or self._chain_too_long(partition, entry):
                        entry = None  # the chain is past a bound: a base
                data: Base | Delta
                if entry is None:
                    data = await capture_in_thread(
                        partial(index.capture_base, compact_before=horizon)
                    )
                else:
                    data = await capture_in_thread(
                        partial(index.capture_delta, compact_before=horizon)
                    )
                snapshots.append(_Snapshot(name, index, entry, data))
        except BaseException:  # failed or cancelled: what it took so far is released
            for snap in snapshots:
                snap.release()
            raise
        capture = _Capture(
            entries=entries,
            snapshots=snapshots,
            dropped=partition.dropped,
            horizon=horizon,
            sharded=partition.manifest_state(),
        )
        partition.dirty.difference_update(s.name for s in snapshots)
        partition.dropped = False
        partition.records_since_checkpoint = 0
        partition.pace.captured()
        partition.last_checkpoint = time.monotonic()
        return capture

    async def _upload(self, partition: Partition, snap: _Snapshot, offset: int) -> IndexEntry:
        """Encode and upload one capture (no lock held); returns the index's new entry."""
        started = time.monotonic()
        new: IndexEntry
        data = snap.data
        assert data is not None, "uploaded once"
        try:
            if isinstance(data, Delta):
                assert snap.entry is not None
                segment = await self._store.save_delta(partition.number, data, offset=offset)
                new, nbytes = snap.entry.with_delta(segment), segment.bytes
            else:
                new = await self._store.save_base(partition.number, data, offset=offset)
                nbytes = new.bytes
        except LhvError:
            self._metrics.snapshot_failed()
            raise
        self._metrics.observe_snapshot(time.monotonic() - started, nbytes)
        log.debug("%s snapshot: %d bytes", "delta" if snap.entry else "base", nbytes)
        return new

    def _undo(self, partition: Partition, capture: _Capture | None) -> None:
        """A checkpoint that wrote no manifest: what it captured is dirty again (its
        captures are lost to the indexes' change tracking, so `persisted` keeps them out
        and their next snapshots are bases)."""
        if capture is None:
            return
        # the runner may be applying meanwhile: set operations and plain stores only
        partition.dirty.update(s.name for s in capture.snapshots if s.name in partition.indexes)
        if capture.dropped:
            partition.dropped = True
        partition.last_checkpoint = 0.0  # due again once the backoff ends

    def _failed(
        self, partition: Partition, capture: _Capture | None, reason: str, exc: LhvError
    ) -> None:
        log.warning("checkpoint failed (%s), state kept, will retry: %s", reason, exc)
        self._undo(partition, capture)
        self._metrics.checkpoint_failed(partition.number)
        policy = self._policy
        partition.retry_delay_s = min(
            max(partition.retry_delay_s * 2, policy.retry_backoff_s),
            policy.retry_backoff_max_s,
        )
        partition.retry_at = time.monotonic() + partition.retry_delay_s

    def _done(self, partition: Partition, capture: _Capture, reason: str, elapsed: float) -> None:
        """The manifest naming the captures is written."""
        assert partition.manifest is not None
        manifest = partition.manifest
        partition.persisted = {
            n: i for n, i in partition.persisted.items() if n in manifest.indexes
        }
        for snap in capture.snapshots:
            partition.persisted[snap.name] = snap.index
        partition.durable(manifest.written_at, manifest.offset)
        partition.retry_delay_s = 0.0
        self._metrics.observe_checkpoint(partition.number, elapsed, manifest.offset)
        written = [
            e.deltas[-1].bytes if snap.entry is not None else e.bytes
            for snap in capture.snapshots
            if (e := manifest.indexes.get(snap.name)) is not None
        ]
        bases = sum(1 for snap in capture.snapshots if snap.entry is None)
        log.info(
            "checkpoint (%s): %d snapshots written (%d bases, %d deltas, %d bytes), "
            "%d indexes, tombstone horizon %s, %.2fs",
            reason,
            len(capture.snapshots),
            bases,
            len(capture.snapshots) - bases,
            sum(written),
            len(manifest.indexes),
            capture.horizon,
            elapsed,
        )

    async def release(self, p: int, *, park: bool) -> None:
        """Stop applying to p, checkpoint it, and forget it (parking the state if asked)."""
        partition = self._registry.partitions.get(p)
        if partition is None:
            return
        with log_context(partition=p):
            await self._registry.stop_runner(p)
            if partition.status is PartitionStatus.SERVING or (
                partition.status is PartitionStatus.RESTORING and partition.manifest is not None
            ):
                try:
                    async with asyncio.timeout(self._rebalance_timeout_ms / 2000):
                        done = await self.checkpoint(partition, reason="revoke")
                except TimeoutError:
                    log.warning("checkpoint on revoke timed out; the next owner replays more")
                    done = False
                if done and park and partition.etag is not None:
                    self._parked[p] = partition
            # nothing of this owner's is written once the partition is let go
            await self._abandon(partition)
            await self._search.release(p)
            self._drop(partition)

    def _drop(self, partition: Partition) -> None:
        task = partition.checkpointing
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # no manifest from an owner that let go (its end is not awaited)
        partition.status = PartitionStatus.REVOKED
        self._registry.partitions.pop(partition.number, None)
        self._registry.forget_partition(partition.number, list(partition.indexes))
        self._tasks.spawn(partition.notify(), name=f"notify-{partition.number}")

    async def _retrying(
        self,
        what: str,
        step: Callable[[], Awaitable[T]],
        *,
        on_error: Callable[[], None] | None = None,
    ) -> T:
        """Run `step` until it succeeds; S3/Kafka trouble is retried with backoff
        (`on_error` is told of each failed attempt)."""
        policy = self._policy
        delay = policy.retry_backoff_s
        while True:
            try:
                return await step()
            except (Fenced, asyncio.CancelledError):
                raise
            except (LhvError, KafkaError, OSError) as exc:
                if on_error is not None:
                    on_error()
                log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, policy.retry_backoff_max_s)

    def _commands_tp(self, p: int) -> TopicPartition:
        return TopicPartition(self._topics.commands, p)

    async def stop(self) -> None:
        """Cancel the restores in progress."""
        for task in list(self._restores.values()):
            task.cancel()
        await asyncio.gather(*self._restores.values(), return_exceptions=True)
        self._restores.clear()
