"""One partition's runner: applies its command records in order, checkpoints between
batches.

The poll loop `enqueue`s a poll's records in pieces of at most `max_batch_bytes`; the
runner takes a batch (pieces queued behind each other, within `max_poll_records` and
`max_batch_bytes`), decodes it in a thread (the next batch is decoded while this one
applies), applies it in a thread (`apply_records`), reports acks and DLQ records, moves
the applied offset and wakes waiting queries. Past `max_pending_records` or
`max_pending_bytes` buffered, the poll loop pauses the partition; the runner resumes it
once half is applied. The worker's runners together hold at most `max_read_ahead_bytes`
(`ReadAhead`): the poll loop queues a poll's records only within both byte bounds, seeks
the partition back to the first record it left and pauses it; a paused partition
resumes once its own queue and the worker's are both at half. By the checkpoint policy (the replay budget and the time share
within the records and seconds bounds, worker/service/pacing.py; backoff after a failed
one) it starts a checkpoint between batches (`Ownership.begin_checkpoint`): it waits only
while the dirty indexes are captured, and goes on applying while the captures are
uploaded and the manifest written in the background. At most one checkpoint of the
partition is in flight: the policy is looked at again after the next batch, or as soon as
the one in flight ends when the partition is idle.

The runner is a long-lived task (`TaskOwner.start`): a crash ends the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import TopicPartition

from lhv_index import Limits as IndexLimits
from lhv_index.errors import Internal
from worker.service import failpoints
from worker.service.apply import (
    BarrierSteps,
    Decoded,
    Outcome,
    RestoreNeeded,
    apply_records,
    decode_records,
)
from worker.service.config import CheckpointPolicy, WorkerConfig
from worker.service.intake import RejectedRecord
from worker.service.observer import IndexObserver
from worker.service.pacing import checkpoint_reason, deferred
from worker.service.partition import Partition, PartitionStatus
from worker.service.ports import KafkaPort, Reports, TaskOwner
from worker.service.sharding import Forwarder
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import HealthTracker, Metrics
from worker.wire.limits import MessageLimits

__all__ = ["ReadAhead", "Runner", "RunnerLimits", "records_within"]

log = logging.getLogger(__name__)

_STOP = object()
#: while a checkpoint for the replay budget waits for the time share to fall, an idle
#: runner looks at the policy again this often
_DEFERRED_RECHECK_S = 1.0
#: the replay budget never makes a batch smaller than this (a record larger than a
#: batch still goes alone)
_MIN_BATCH_BYTES = 64 * 1024
#: ops whose items count in the apply-batch histogram
_WRITES = frozenset({"add", "delete"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerLimits:
    """The settings a runner uses (all from `WorkerConfig`)."""

    max_batch_bytes: int
    max_poll_records: int
    max_pending_records: int
    max_pending_bytes: int
    checkpoint: CheckpointPolicy
    limits: MessageLimits
    index_limits: IndexLimits
    max_indexes: int | None = None
    """indexes one partition may hold (None: no bound)"""

    @classmethod
    def of(cls, config: WorkerConfig) -> RunnerLimits:
        return cls(
            max_batch_bytes=config.max_batch_bytes,
            max_poll_records=config.max_poll_records,
            max_pending_records=config.max_pending_records,
            max_pending_bytes=config.max_pending_bytes,
            checkpoint=config.checkpoint,
            limits=config.limits,
            index_limits=config.index_limits,
            max_indexes=config.max_indexes_per_partition,
        )


class ReadAhead:
    """The record bytes queued by all runners of a worker, against `limit_bytes`
    (`LHV_MAX_READ_AHEAD_BYTES`): what a worker reads ahead of its apply threads, however
    many partitions it owns. `runners` is the worker's live map (a runner that ends
    leaves it, and its bytes with it)."""

    def __init__(self, limit_bytes: int, runners: Mapping[int, Runner]) -> None:
        self.limit_bytes = limit_bytes
        self._runners = runners

    @property
    def nbytes(self) -> int:
        return sum(r.pending_bytes for r in self._runners.values())

    def room(self, runner: Runner) -> int:
        """Record bytes `runner` may queue now: within its partition's bound and the
        worker's."""
        own = runner.limits.max_pending_bytes - runner.pending_bytes
        return min(own, self.limit_bytes - self.nbytes)

    @property
    def under_half(self) -> bool:
        return self.nbytes <= self.limit_bytes // 2


def records_within(records: Sequence[Any], room: int, *, at_least_one: bool) -> int:
    """How many of `records`, from the first, fit in `room` bytes of values; at least one
    when `at_least_one` (a record larger than every bound must still pass, alone)."""
    size = 0
    for i, rec in enumerate(records):
        size += len(rec.value) if rec.value is not None else 0
        if size > room:
            return max(i, 1) if at_least_one else i
    return len(records)


class _Piece(NamedTuple):
    """One queue entry: records of one poll, at most `max_batch_bytes` of values."""

    records: list[Any]
    nbytes: int


@dataclass(slots=True, eq=False)
class _Batch:
    """Queue entries applied together, and the decoding of their records when it was
    started ahead."""

    records: list[Any] = field(default_factory=list)
    nbytes: int = 0
    stop: bool = False
    """the stop marker came after these records"""
    decoding: asyncio.Future[list[Decoded]] | None = None


class Runner:
    """Applies one partition's command records in order (module docstring).

    Arguments:
        partition: the partition's state (restored).
        tp: the partition of the commands topic (resumed here after backpressure).
        num_partitions: partitions of the commands topic (home-partition checks).
        checkpoint: starts a checkpoint of the partition and returns once its capture is
            taken (`Ownership.begin_checkpoint`), given why the policy asks for it.
        reporter: sends the acks and DLQ records of applied batches (`Reporter`; a read
            replica's sends nothing).
        barrier: applies merge and import records (`MergeProtocol`), in the apply thread.
        forwarder: produces the records the batch forwarded (sharded indexes, aliases)
            before its acks; no checkpoint starts before they are all taken.
        restore_again: a read-only copy's: called when a record's step cannot be taken
            read-only (`RestoreNeeded`); the runner then ends without applying the batch
            (its partition restores from the newest manifest). None: such a record is
            a crash.
    """

    def __init__(
        self,
        partition: Partition,
        *,
        tp: TopicPartition,
        num_partitions: int,
        settings: RunnerLimits,
        kafka: KafkaPort,
        checkpoint: Callable[[Partition, str], Awaitable[bool]],
        reporter: Reports,
        barrier: BarrierSteps | None,
        observer: IndexObserver,
        metrics: Metrics,
        health: HealthTracker,
        tasks: TaskOwner,
        forwarder: Forwarder | None = None,
        restore_again: Callable[[Partition, RestoreNeeded], None] | None = None,
        read_ahead: ReadAhead | None = None,
    ) -> None:
        self.partition = partition
        self._budget = read_ahead
        self._forwarder = forwarder
        self._tp = tp
        self._num_partitions = num_partitions
        self._settings = settings
        self._kafka = kafka
        self._checkpoint = checkpoint
        self._reporter = reporter
        self._barrier = barrier
        self._observer = observer
        self._metrics = metrics
        self._health = health
        self._restore_again = restore_again
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.pending = 0
        self.pending_bytes = 0
        self._carry: _Piece | None = None
        #: the next batch, taken and being decoded while the current one applies
        self._ahead: _Batch | None = None
        self.paused = False
        self.task: asyncio.Task[Any] = tasks.start(
            self._run(), name=f"partition-{partition.number}"
        )

    def enqueue(self, records: Sequence[Any]) -> None:
        """Queue one poll's records, in pieces of at most `max_batch_bytes` (one poll can
        return everything aiokafka prefetched)."""
        limit = self._batch_bytes()
        piece: list[Any] = []
        size = 0
        for rec in records:
            n = len(rec.value) if rec.value is not None else 0
            if piece and size + n > limit:
                self._put(_Piece(piece, size))
                piece, size = [], 0
            piece.append(rec)
            size += n
        if piece:
            self._put(_Piece(piece, size))

    def _batch_bytes(self) -> int:
        """Record bytes of one batch: `max_batch_bytes`, or less when the replay budget
        asks for smaller batches (a checkpoint starts only between two)."""
        s = self._settings
        cap = self.partition.pace.batch_bytes(s.checkpoint.max_replay_s)
        if cap is None:
            return s.max_batch_bytes
        return max(_MIN_BATCH_BYTES, min(s.max_batch_bytes, cap))

    def _put(self, piece: _Piece) -> None:
        self.pending += len(piece.records)
        self.pending_bytes += piece.nbytes
        self.queue.put_nowait(piece)

    @property
    def over_limit(self) -> bool:
        """Enough is buffered: the partition's fetching is paused until half is applied."""
        s = self._settings
        ahead = self._budget
        return (
            self.pending >= s.max_pending_records
            or self.pending_bytes >= s.max_pending_bytes
            or (ahead is not None and ahead.nbytes >= ahead.limit_bytes)
        )

    @property
    def under_half(self) -> bool:
        """Half is applied: its own queue and the worker's (`ReadAhead`)."""
        s = self._settings
        return (
            self.pending <= s.max_pending_records // 2
            and self.pending_bytes <= s.max_pending_bytes // 2
            and (self._budget is None or self._budget.under_half)
        )

    def pause(self) -> None:
        """Stop fetching the partition (backpressure: enough is buffered) until
        `resume_if_drained`."""
        if not self.paused:
            self.paused = True
            self._kafka.pause(self._tp)

    def resume_if_drained(self) -> None:
        """Fetch the partition again once half of what was buffered is applied (its own
        queue and the worker's, `under_half`)."""
        if self.paused and self.under_half:
            self.paused = False
            self._kafka.resume(self._tp)

    @property
    def limits(self) -> RunnerLimits:
        return self._settings

    async def stop(self) -> None:
        """Finish the batch in flight and what is queued before the stop marker."""
        self.queue.put_nowait(_STOP)
        await asyncio.gather(self.task, return_exceptions=True)

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()

    async def _run(self) -> None:
        p = self.partition
        policy = self._settings.checkpoint
        with log_context(partition=p.number):
            try:
                while True:
                    batch, self._ahead = self._ahead, None
                    if batch is None:
                        item, self._carry = self._carry, None
                        if item is None:
                            now = time.monotonic()
                            wait_s = policy.every_s - (now - p.last_checkpoint)
                            if deferred(policy, p):
                                wait_s = min(wait_s, _DEFERRED_RECHECK_S)
                            wait_s = max(wait_s, p.retry_at - now)
                            item = await self._next(max(0.05, wait_s))
                        batch = _Batch() if item is None else self._collect(item)
                    if batch.records:
                        decoded = await (batch.decoding or self._decode(batch.records))
                        if not batch.stop:
                            self._read_ahead()
                        await self._apply(batch, decoded)
                    if batch.stop:
                        return
                    reason = checkpoint_reason(policy, p, time.monotonic())
                    if reason is not None:
                        await self._checkpoint(p, reason)
                    if p.status is PartitionStatus.REVOKED:
                        return
            except asyncio.CancelledError:
                raise
            except RestoreNeeded as exc:
                if self._restore_again is None:
                    log.exception("partition runner crashed")
                    raise Internal(f"partition {p.number} runner crashed") from exc
                self._restore_again(p, exc)
            except Exception as exc:
                log.exception("partition runner crashed")
                raise Internal(f"partition {p.number} runner crashed") from exc
            finally:
                if self._ahead is not None and self._ahead.decoding is not None:
                    self._ahead.decoding.cancel()  # decoded for nothing: the next owner reads it

    async def _next(self, timeout_s: float) -> Any:
        """The next queue entry; None at the timeout, or (while a checkpoint is in
        flight) when that checkpoint ended first: the policy is then looked at again."""
        inflight = self.partition.checkpointing
        if inflight is None or inflight.done():
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.queue.get()
            except TimeoutError:
                return None
        # no checkpoint starts before this one ends: no timeout, its end wakes the runner
        get = asyncio.ensure_future(self.queue.get())
        try:
            await asyncio.wait({get, inflight}, return_when=FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()  # the entry, if any, stays queued
        return None if get.cancelled() or not get.done() else get.result()

    def _collect(self, item: Any) -> _Batch:
        """A batch starting with queue entry `item`, plus the entries queued behind it
        within the bounds (records, bytes), up to the stop marker."""
        s = self._settings
        batch = _Batch()
        while True:
            if item is _STOP:
                batch.stop = True
                return batch
            batch.records.extend(item.records)
            batch.nbytes += item.nbytes
            if self.queue.empty() or len(batch.records) >= s.max_poll_records:
                return batch
            item = self.queue.get_nowait()
            if item is not _STOP and batch.nbytes + item.nbytes > self._batch_bytes():
                self._carry = item  # the next batch starts with it
                return batch

    def _read_ahead(self) -> None:
        """Take the next batch now, if one is queued, and decode it in a thread while the
        current one is applied (decoding reads no index state; the engine releases the
        GIL, so both cores work)."""
        if self._carry is None and self.queue.empty():
            return
        item, self._carry = self._carry, None
        if item is None:
            item = self.queue.get_nowait()
        batch = self._collect(item)
        if batch.records:
            batch.decoding = asyncio.ensure_future(self._decode(batch.records))
        self._ahead = batch

    def _decode(self, batch: list[Any]) -> Awaitable[list[Decoded]]:
        return asyncio.to_thread(
            _decode_or_reject,
            batch,
            partition=self.partition.number,
            num_partitions=self._num_partitions,
            limits=self._settings.limits,
        )

    async def _apply(self, batch: _Batch, decoded: list[Decoded]) -> None:
        p = self.partition
        started = time.monotonic()
        outcomes = await asyncio.to_thread(self._apply_in_thread, batch.records, decoded)
        # before the acks, and before the policy may start a checkpoint covering these
        # records: a checkpoint never covers an origin whose forwards are not taken
        if self._forwarder is not None and await self._forwarder.send(outcomes):
            failpoints.hit("forwarded")
        self.pending -= len(batch.records)
        self.pending_bytes -= batch.nbytes
        failpoints.hit("mid_batch")
        items = sum(o.applied + o.skipped for o in outcomes if o.error is None and o.op in _WRITES)
        elapsed = time.monotonic() - started
        self._metrics.observe_apply(p.number, len(batch.records), elapsed, items)
        p.pace.applied(len(batch.records) + items, elapsed, batch.nbytes)
        await self._reporter.report(
            p, outcomes, timestamps={r.offset: r.timestamp for r in batch.records}
        )
        if p.mark_ready_if_caught_up():
            log.info("partition serving at offset %d", p.applied_offset)
        self._health.progress(p.number, p.applied_offset)
        await p.notify()
        self.resume_if_drained()

    async def pass_empty(self, position: int) -> None:
        """The consumer reads `partition` next from `position`: with nothing queued or
        applying, every offset before it is applied, the ones that hold no record to
        apply included (transaction markers, aborted transactions' records: the consumer
        reads past them). Moves the applied offset over those, so that a log ending in
        them is caught up (serving, lag 0) and a checkpoint covers them."""
        p = self.partition
        if self.pending or position - 1 <= p.applied_offset or p.status is PartitionStatus.REVOKED:
            return
        log.debug(
            "offsets %d..%d hold no record to apply (transaction markers or aborted records)",
            p.applied_offset + 1,
            position - 1,
        )
        p.applied_offset = position - 1
        if p.mark_ready_if_caught_up():
            log.info("partition serving at offset %d", p.applied_offset)
        self._health.progress(p.number, p.applied_offset)
        await p.notify()

    def _apply_in_thread(self, batch: list[Any], decoded: list[Decoded]) -> list[Outcome]:
        """Apply one batch, then publish the sizes and drift of the indexes it touched."""
        s = self._settings
        outcomes = apply_records(
            self.partition,
            batch,
            decoded=decoded,
            num_partitions=self._num_partitions,
            limits=s.limits,
            index_limits=s.index_limits,
            max_indexes=s.max_indexes,
            barrier=self._barrier,
            on_norms=self._observer.observe_norms,
        )
        self._observer.observe_indexes(self.partition, {o.index for o in outcomes if o.index})
        return outcomes


def _decode_or_reject(
    records: list[Any], *, partition: int, num_partitions: int, limits: MessageLimits
) -> list[Decoded]:
    """`decode_records`, except that a record refused at intake (`RejectedRecord`: the
    Kafka client could not read it) keeps its error, whatever its value holds."""
    decoded = decode_records(
        records, partition=partition, num_partitions=num_partitions, limits=limits
    )
    for i, rec in enumerate(records):
        if isinstance(rec, RejectedRecord):
            decoded[i] = Decoded(reply_to=None, error=rec.error)
    return decoded
