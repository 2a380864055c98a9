"""Read-only copies of partitions: restore from the owner's manifest, then tail the log.

A `Follower` keeps a copy of partition p that nobody else depends on: a read replica's
(`lhv worker --replica`). A warm standby inside an owner (warm.py) applies records with
the same apply step and the same read-only ports (`ReadOnlyWrites`), on a consumer of
its own. It never writes: no
manifest, snapshot, DLQ record, ack, merge object or protocol record, and it commits
no command offset (a copy always starts again from the manifest, so its position is
worth nothing to anyone).

- follow p (`follow`, or the replica group's assignment): pause p's commands
  partition, read p's manifest (no claim: no generation bump, no ETag held), load the
  snapshots it names (base + deltas), seek to `manifest.offset + 1`, resume, serve once
  the replay reaches the log end seen at the start. A segment deleted under the load
  (`SnapshotGone`: the owner checkpointed meanwhile and collected it) means the
  manifest is stale: read the newest one and start again, at most `restore_attempts`
  times, with backoff.
- apply: the owner's code (`Runner`, `apply_records`, `MergeProtocol`) with the
  read-only ports this module gives instead of the owner's: `SilentReports` (no acks,
  no DLQ records), `ReadOnlyWrites` (no objects, no protocol records, no steps after a
  checkpoint) and `settle` in place of a checkpoint (the dirty set is simply
  forgotten). Those three are the whole gate: the apply path reaches the outside only
  through them.
- a step it cannot take read-only (the export object of a `merge_in` is gone, so is a
  `merge_done`'s, an `import` source): the owner finished that step and removed what
  it read, so the owner's newest manifest covers the record. The runner stops at the
  record (`RestoreNeeded`) and the copy restores again from that manifest, which puts
  it past the record. A gone object at an offset the manifest does not cover is a
  duplicate step, which the owner skipped too: the copy skips it.
- unfollow p (`release`, revoke): stop the runner, drop the copy.

A drop and re-create of an index follows from the log like any other command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from lhv_index import Index
from lhv_index.errors import Internal, LhvError
from worker.service.apply import Outcome, RestoreNeeded
from worker.service.observer import IndexObserver
from worker.service.partition import Partition, PartitionStatus
from worker.service.ports import KafkaPort, PartitionRegistry, SearchPartitions, TaskOwner
from worker.storage.snapshots import Manifest, SnapshotGone, SnapshotStore
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import Metrics
from worker.wire.topics import TopicsConfig

__all__ = ["FollowPolicy", "Follower", "ReadOnlyWrites", "SilentReports"]

log = logging.getLogger(__name__)

#: a hook run after a restore read the manifest and before it loads the snapshots
#: (tests pause a restore there to make the owner collect what it is about to read)
BeforeLoad = Callable[[int, Manifest | None], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowPolicy:
    """How a copy restores."""

    restore_attempts: int = 8
    """manifests read in a row whose snapshots were collected under the load
    (`SnapshotGone`) before the restore gives up (fatal: the process restarts)"""
    retry_backoff_s: float = 0.2
    retry_backoff_max_s: float = 5.0
    accept_data_loss: bool = False
    """follow a partition whose log lost records past its manifest (as its owner would)"""

    def __post_init__(self) -> None:
        if self.restore_attempts < 1 or self.retry_backoff_s <= 0:
            raise ValueError("follow policy needs restore_attempts >= 1 and a backoff > 0")


class SilentReports:
    """A copy's `Reports`: counts the outcomes, sends nothing (the owner acks and
    dead-letters)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def report(
        self,
        partition: Partition,
        outcomes: list[Outcome],
        *,
        timestamps: dict[int, int] | None = None,
    ) -> None:
        for out in outcomes:
            if out.error is None:
                self._metrics.command_applied(out.op, out.applied)
            else:
                self._metrics.command_rejected(out.op or "unknown", out.error.code)


class ReadOnlyWrites:
    """A copy's `ProtocolWrites` (worker/service/merge.py): writes nothing, produces
    nothing, runs no step after a checkpoint; an object gone under a step makes the
    copy restore when the newest manifest covers the step's record."""

    owner = False

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store

    async def put(self, key: str, data: bytes) -> None:
        log.debug("read-only: not writing %s (the owner does)", key)

    async def delete(self, key: str) -> None:
        log.debug("read-only: not deleting %s (the owner does)", key)

    async def send(
        self, topic: str, *, key: bytes, value: bytes, partition: int, headers: Sequence[Any]
    ) -> None:
        log.debug("read-only: not producing a protocol record to %s:%d", topic, partition)

    def after_checkpoint(
        self, partition: Partition, offset: int, step: Callable[[], Awaitable[None]]
    ) -> None:
        return None

    async def gone(self, partition: Partition, offset: int, what: str) -> None:
        manifest, _ = await self._store.read_manifest(partition.number)
        if manifest is not None and manifest.offset >= offset:
            raise RestoreNeeded(
                offset, f"{what} is gone and the manifest at offset {manifest.offset} covers it"
            )
        log.info(
            "%s is gone and no manifest covers offset %d: a duplicate step, skipped",
            what,
            offset,
            extra={"partition": partition.number, "offset": offset},
        )


class Follower(ConsumerRebalanceListener):  # type: ignore[misc]
    """Keeps read-only copies of partitions (module docstring).

    Arguments:
        registry: the copies by partition, and their runners (`start_runner` must build
            the runner with `reports`, `writes`' barrier, `settle` and `restore_again`).
        kafka: pauses, seeks and resumes commands partitions; offsets for the restore.
        search: told of assigned and revoked search partitions (None: a copy that
            answers no queries of its own).
        store: the owners' snapshots and manifests, read only.
        tasks: restores are long-lived tasks (a crash is fatal).

    Attributes:
        before_load: a test seam (`BeforeLoad`), run by each restore between reading
            the manifest and loading its snapshots.
    """

    def __init__(
        self,
        *,
        topics: TopicsConfig,
        registry: PartitionRegistry,
        kafka: KafkaPort,
        search: SearchPartitions | None,
        store: SnapshotStore,
        tasks: TaskOwner,
        observer: IndexObserver,
        metrics: Metrics,
        policy: FollowPolicy,
    ) -> None:
        self._topics = topics
        self._registry = registry
        self._kafka = kafka
        self._search = search
        self._store = store
        self._tasks = tasks
        self._observer = observer
        self._metrics = metrics
        self._policy = policy
        self._restores: dict[int, asyncio.Task[Any]] = {}
        self.reports = SilentReports(metrics)
        self.writes = ReadOnlyWrites(store)
        self.before_load: BeforeLoad | None = None
        self.restores_done = 0
        """restores finished (first ones and again after `RestoreNeeded`)"""
        self.snapshots_gone = 0
        """restores that found a snapshot collected under them and read a newer manifest"""

    # -- rebalance callbacks -------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in revoked if tp.topic == self._topics.commands})
        if numbers:
            log.info("copies revoked: %s", numbers)
            await asyncio.gather(*(self.release(p, park=False) for p in numbers))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if self._search is not None:  # first, before any await (see Ownership)
            self._search.assign(
                sorted({tp.partition for tp in assigned if tp.topic == self._topics.search})
            )
        numbers = sorted({tp.partition for tp in assigned if tp.topic == self._topics.commands})
        log.info("copies assigned: %s", numbers)
        for p in numbers:
            self.follow(p)

    # -- following -----------------------------------------------------------------------

    def follow(self, p: int) -> Partition:
        """Start keeping a copy of p: restore it in a background task, then tail."""
        self._kafka.pause(self._commands_tp(p))
        partition = Partition(number=p)
        self._registry.partitions[p] = partition
        self._start_restore(partition)
        return partition

    def _start_restore(self, partition: Partition) -> None:
        p = partition.number
        self._restores[p] = self._tasks.start(self._restore(partition), name=f"restore-{p}")

    def restore_again(self, partition: Partition, exc: RestoreNeeded) -> None:
        """The runner's callback: a record's step cannot be taken read-only; restore
        from the newest manifest (the runner has ended)."""
        log.warning(
            "copy restores again from the newest manifest: %s",
            exc,
            extra={"partition": partition.number, "offset": exc.offset},
        )
        self._metrics.restore_failed(partition.number)
        self._kafka.pause(self._commands_tp(partition.number))
        partition.status = PartitionStatus.RESTORING
        self._start_restore(partition)

    async def settle(self, partition: Partition, reason: str = "") -> bool:
        """A copy's checkpoint step (whatever the policy's `reason`): nothing is
        persisted, the change tracking of the dirty set and the replay estimate are simply
        forgotten. Always False (no checkpoint started)."""
        partition.pace.captured()
        partition.dirty.clear()
        partition.dropped = False
        partition.records_since_checkpoint = 0
        partition.last_checkpoint = time.monotonic()
        return False

    async def _restore(self, partition: Partition) -> None:
        p = partition.number
        tp = self._commands_tp(p)
        started = time.monotonic()
        with log_context(partition=p):
            try:
                await self._registry.stop_runner(p)  # a runner that asked to restore again
                manifest, indexes = await self._load(p)
                if partition.revoked:
                    return
                start = manifest.offset + 1 if manifest else 0
                log_start = (await self._kafka.beginning_offsets([tp]))[tp]
                log_end = (await self._kafka.end_offsets([tp]))[tp]
                if start < log_start:
                    reason = (
                        f"the log starts at offset {log_start} but the manifest covers only "
                        f"up to {start - 1}"
                    )
                    if not self._policy.accept_data_loss:
                        partition.status = PartitionStatus.REFUSED
                        partition.refused_reason = reason
                        log.error("REFUSING to follow partition %d: %s", p, reason)
                        await partition.notify()
                        return
                    log.warning("accepting data loss on partition %d: %s", p, reason)
                    start = log_start
                partition.indexes = indexes
                partition.take_manifest_state(manifest)  # as the owner restores it
                partition.manifest = manifest
                partition.etag = None
                partition.dirty.clear()
                partition.dropped = False
                partition.after_checkpoint.clear()
                partition.applied_offset = start - 1
                partition.ready_offset = log_end - 1
                partition.status = PartitionStatus.RESTORING
                self._registry.start_runner(partition)
                self._kafka.seek(tp, start)
                self._kafka.resume(tp)
                self.restores_done += 1
                log.info(
                    "copy restored in %.2fs: %d indexes, manifest offset %d, replaying to %d",
                    time.monotonic() - started,
                    len(indexes),
                    partition.checkpoint_offset,
                    partition.ready_offset,
                )
                self._observer.observe_indexes(partition)
                if partition.mark_ready_if_caught_up():
                    log.info("copy serving at offset %d", partition.applied_offset)
                await partition.notify()
            finally:
                if self._restores.get(p) is asyncio.current_task():
                    del self._restores[p]

    async def _load(self, p: int) -> tuple[Manifest | None, dict[str, Index]]:
        """Read p's newest manifest and load what it names: again from a newer manifest
        when a segment was collected under the load (bounded), with backoff on S3 or
        Kafka trouble (unbounded: the owner would wait too)."""
        policy = self._policy
        delay = policy.retry_backoff_s
        gone = 0
        while True:
            try:
                manifest, _etag = await self._store.read_manifest(p)
                if self.before_load is not None:
                    await self.before_load(p, manifest)
                indexes: dict[str, Index] = {}
                if manifest is not None:
                    for name, entry in manifest.indexes.items():
                        with log_context(index=name, offset=entry.offset):
                            indexes[name] = await self._store.load_index(name, entry)
                return manifest, indexes
            except SnapshotGone as exc:
                gone += 1
                self.snapshots_gone += 1
                self._metrics.restore_failed(p)
                if gone >= policy.restore_attempts:
                    raise Internal(
                        f"partition {p}: {gone} manifests in a row named snapshots collected "
                        f"before they could be read: {exc}"
                    ) from exc
                log.warning(
                    "a snapshot was collected under the restore (attempt %d of %d), reading "
                    "the newest manifest in %.1fs: %s",
                    gone,
                    policy.restore_attempts,
                    delay,
                    exc,
                )
            except (LhvError, KafkaError, OSError) as exc:
                self._metrics.restore_failed(p)
                log.warning("restore of the copy failed, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, policy.retry_backoff_max_s)

    async def release(self, p: int, *, park: bool = False) -> None:
        """Stop keeping the copy of p (`park` is ignored: a copy is cheap to forget)."""
        task = self._restores.pop(p, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        partition = self._registry.partitions.get(p)
        if partition is None:
            return
        with log_context(partition=p):
            await self._registry.stop_runner(p)
            if self._search is not None:
                await self._search.release(p)
            partition.status = PartitionStatus.REVOKED
            self._registry.partitions.pop(p, None)
            self._registry.forget_partition(p, list(partition.indexes))
            self._tasks.spawn(partition.notify(), name=f"notify-{p}")

    def _commands_tp(self, p: int) -> TopicPartition:
        return TopicPartition(self._topics.commands, p)

    async def stop(self) -> None:
        """Cancel the restores in progress."""
        tasks = list(self._restores.values())
        self._restores.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
