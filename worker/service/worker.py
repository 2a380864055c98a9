"""The worker: consume commands and queries, own partitions, checkpoint, serve.

    async with Worker(config) as worker:   # start(): S3, producer, consumer, metrics
        await worker.run()                 # until stop() or a fatal error
    # stop(): finish batches, checkpoint owned partitions, leave the group, close

One consumer reads both topics in one group with the range assignor, so partition p of
`lhv.commands` and of `lhv.search` belong to the same worker. The poll loop only routes:
command records go to the partition's runner (a task that applies them in a thread and
checkpoints between batches), query records to the search server. A partition whose
runner falls behind is paused until it catches up (backpressure), so the poll loop keeps
polling and the group keeps its heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from lhv_index._drift import DriftMonitor
from lhv_index.errors import Internal, LhvError
from worker.kafka.errors import map_kafka_errors
from worker.service import failpoints, inflate
from worker.service.apply import Decoded, Outcome, apply_records, decode_records
from worker.service.config import WorkerConfig
from worker.service.intake import Intake, RejectedRecord
from worker.service.merge import MergeProtocol
from worker.service.outbox import Outbox, fit_dlq_record
from worker.service.ownership import Ownership
from worker.service.partition import Partition, PartitionStatus
from worker.service.replies import ReplySender
from worker.service.search import SearchServer
from worker.storage.blobstore import S3BlobStore
from worker.storage.snapshots import SnapshotStore
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import HealthTracker, Metrics, MetricsServer
from worker.wire.headers import dlq_headers
from worker.wire.limits import MessageLimits
from worker.wire.replies import encode_ack
from worker.wire.topics import ReplyTopicPolicy, TopicsConfig

__all__ = ["Worker"]

log = logging.getLogger(__name__)

_STOP = object()
#: ops whose items count in the apply-batch histogram
_WRITES = frozenset({"add", "delete"})
#: a DLQ value larger than this is cut (and hashed) in a thread, not on the event loop
_FIT_IN_THREAD_BYTES = 256 * 1024


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


class _Runner:
    """Applies one partition's command records in order, and checkpoints between batches."""

    def __init__(self, worker: Worker, partition: Partition) -> None:
        self.worker = worker
        self.partition = partition
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.pending = 0
        self.pending_bytes = 0
        self._carry: _Piece | None = None
        #: the next batch, taken and being decoded while the current one applies
        self._ahead: _Batch | None = None
        self.paused = False
        self.task = asyncio.create_task(self._run(), name=f"partition-{partition.number}")

    def enqueue(self, records: Sequence[Any]) -> None:
        """Queue one poll's records, in pieces of at most `max_batch_bytes` (one poll can
        return everything aiokafka prefetched)."""
        limit = self.worker.config.max_batch_bytes
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

    def _put(self, piece: _Piece) -> None:
        self.pending += len(piece.records)
        self.pending_bytes += piece.nbytes
        self.queue.put_nowait(piece)

    @property
    def over_limit(self) -> bool:
        """Enough is buffered: the partition's fetching is paused until half is applied."""
        config = self.worker.config
        return (
            self.pending >= config.max_pending_records
            or self.pending_bytes >= config.max_pending_bytes
        )

    @property
    def under_half(self) -> bool:
        config = self.worker.config
        return (
            self.pending <= config.max_pending_records // 2
            and self.pending_bytes <= config.max_pending_bytes // 2
        )

    async def stop(self) -> None:
        self.queue.put_nowait(_STOP)
        await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        w = self.worker
        p = self.partition
        policy = w.config.checkpoint
        with log_context(partition=p.number):
            try:
                while True:
                    batch, self._ahead = self._ahead, None
                    if batch is None:
                        try:
                            item, self._carry = self._carry, None
                            if item is None:
                                wait_s = policy.every_s - (time.monotonic() - p.last_checkpoint)
                                async with asyncio.timeout(max(0.05, wait_s)):
                                    item = await self.queue.get()
                            batch = self._collect(item)
                        except TimeoutError:
                            batch = _Batch()
                    if batch.records:
                        decoded = await (batch.decoding or self._decode(batch.records))
                        if not batch.stop:
                            self._read_ahead()
                        await self._apply(batch, decoded)
                    if batch.stop:
                        return
                    now = time.monotonic()
                    if (
                        p.needs_checkpoint
                        and now >= p.retry_at
                        and (
                            p.records_since_checkpoint >= policy.every_records
                            or now - p.last_checkpoint >= policy.every_s
                        )
                    ):
                        await w.ownership.checkpoint(p, reason="policy")
                    if p.status is PartitionStatus.REVOKED:
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("partition runner crashed")
                raise Internal(f"partition {p.number} runner crashed") from exc
            finally:
                if self._ahead is not None and self._ahead.decoding is not None:
                    self._ahead.decoding.cancel()  # decoded for nothing: the next owner reads it

    def _collect(self, item: Any) -> _Batch:
        """A batch starting with queue entry `item`, plus the entries queued behind it
        within the bounds (records, bytes), up to the stop marker."""
        config = self.worker.config
        batch = _Batch()
        while True:
            if item is _STOP:
                batch.stop = True
                return batch
            batch.records.extend(item.records)
            batch.nbytes += item.nbytes
            if self.queue.empty() or len(batch.records) >= config.max_poll_records:
                return batch
            item = self.queue.get_nowait()
            if item is not _STOP and batch.nbytes + item.nbytes > config.max_batch_bytes:
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
        w = self.worker
        return asyncio.to_thread(
            _decode_or_reject,
            batch,
            partition=self.partition.number,
            num_partitions=w.num_partitions,
            limits=w.config.limits,
        )

    async def _apply(self, batch: _Batch, decoded: list[Decoded]) -> None:
        w = self.worker
        p = self.partition
        started = time.monotonic()
        outcomes = await asyncio.to_thread(self._apply_in_thread, batch.records, decoded)
        self.pending -= len(batch.records)
        self.pending_bytes -= batch.nbytes
        failpoints.hit("mid_batch")
        items = sum(o.applied + o.skipped for o in outcomes if o.error is None and o.op in _WRITES)
        w.metrics.observe_apply(p.number, len(batch.records), time.monotonic() - started, items)
        await w.report(p, outcomes, timestamps={r.offset: r.timestamp for r in batch.records})
        if p.mark_ready_if_caught_up():
            log.info("partition serving at offset %d", p.applied_offset)
        w.health.progress(p.number, p.applied_offset)
        await p.notify()
        if self.paused and self.under_half:
            self.paused = False
            w.consumer.resume(w.commands_tp(p.number))

    def _apply_in_thread(self, batch: list[Any], decoded: list[Decoded]) -> list[Outcome]:
        """Apply one batch, then publish the sizes and drift of the indexes it touched."""
        w = self.worker
        outcomes = apply_records(
            self.partition,
            batch,
            decoded=decoded,
            num_partitions=w.num_partitions,
            limits=w.config.limits,
            index_limits=w.config.index_limits,
            barrier=w.barrier,
            on_vectors=w.observe_vectors,
        )
        w.observe_indexes(self.partition, {o.index for o in outcomes if o.index})
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


class Worker:
    """An LHV worker process. See the module docstring for the lifecycle."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.topics: TopicsConfig = config.topics
        self.partitions: dict[int, Partition] = {}
        self.metrics = Metrics()
        self.health = HealthTracker(
            stall_timeout_s=config.stall_timeout_s, states=self.partition_states
        )
        self.reply_policy = ReplyTopicPolicy(
            config.topics.reply_pattern,
            forbidden={config.topics.commands, config.topics.search, config.topics.dlq},
        )
        self.outbox = Outbox(config.kafka, config.delivery, self.metrics)
        self.replies = ReplySender(
            self.outbox,
            max_missing=config.delivery.max_missing_reply_topics,
            on_drop=self.metrics.reply_dropped,
        )
        self._intake: Intake | None = None
        self.barrier: Any = MergeProtocol(self)  # merge/import steps (worker/merge.py)
        self._runners: dict[int, _Runner] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drift: dict[str, DriftMonitor] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = "unopened"
        self._stopping = asyncio.Event()
        self.num_partitions = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._blobs = S3BlobStore(config.s3)
        self.store = SnapshotStore(
            self._blobs,
            topic=config.topics.commands,
            worker_id=config.worker_id,
            index_limits=config.index_limits,
        )
        self.ownership = Ownership(self)
        self.search = SearchServer(self)
        self._metrics_server: MetricsServer | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect to S3 and Kafka and join the group. Not reentrant."""
        if self._state != "unopened":
            raise RuntimeError(f"worker cannot start: it is {self._state}")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        try:
            with map_kafka_errors(self.config.kafka):
                await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        with log_context(worker=self.config.worker_id):
            await self._blobs.start()
            inflate.install(self.config.max_inflated_batch_bytes)
            kw = self.config.kafka.client_kwargs()
            self._producer = AIOKafkaProducer(
                **kw,
                acks="all",
                enable_idempotence=True,
                linger_ms=0,  # replies: a linger adds ~2.5 ms per query; aiokafka
                # batches what queues up while a request is in flight anyway
                max_request_size=max(self.config.limits.max_message_bytes * 2, 1048576),
            )
            await self._producer.start()
            await self.outbox.start()
            self._consumer = AIOKafkaConsumer(
                **kw,
                group_id=self.config.group_id,
                group_instance_id=self.config.group_instance_id,
                enable_auto_commit=False,
                # used only when a position is out of range: commands partitions are
                # sought by `Ownership`, search partitions by `SearchServer.assign`
                auto_offset_reset="latest",
                partition_assignment_strategy=(RangePartitionAssignor,),
                session_timeout_ms=self.config.session_timeout_ms,
                heartbeat_interval_ms=max(1000, self.config.session_timeout_ms // 10),
                rebalance_timeout_ms=self.config.rebalance_timeout_ms,
                max_poll_interval_ms=max(300_000, self.config.rebalance_timeout_ms),
                max_partition_fetch_bytes=max(self.config.limits.max_message_bytes, 1048576),
                fetch_max_bytes=64 * 1024 * 1024,
            )
            await self._consumer.start()
            self._intake = Intake(
                self._consumer,
                kafka=self.config.kafka,
                topics=self.topics,
                limits=self.config.limits,
                metrics=self.metrics,
                fetch_max_bytes=max(self.config.limits.max_message_bytes, 1048576),
                max_inflated_bytes=self.config.max_inflated_batch_bytes,
            )
            await self._check_topics()
            self._consumer.subscribe(
                [self.topics.commands, self.topics.search], listener=self.ownership
            )
            if self.config.metrics_port is not None:
                self._metrics_server = MetricsServer(
                    self.metrics,
                    self.health,
                    host=self.config.metrics_host,
                    port=self.config.metrics_port,
                )
                await self._metrics_server.start()
            await self.search.start()
            await self.barrier.start()
            self._state = "started"
            log.info(
                "worker started: group %s, topics %s/%s, %d partitions",
                self.config.group_id,
                self.topics.commands,
                self.topics.search,
                self.num_partitions,
            )

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    @property
    def blobs(self) -> S3BlobStore:
        """The worker's blob store (its bucket and prefix), started with the worker and
        stopped last."""
        return self._blobs

    async def _check_topics(self) -> None:
        """Both topics exist with equal partition counts (co-partitioning needs it)."""
        counts = []
        for topic in (self.topics.commands, self.topics.search):
            try:
                async with asyncio.timeout(30):
                    counts.append(len(await self.producer.partitions_for(topic)))
            except (TimeoutError, KafkaError) as exc:
                raise Internal(
                    f"topic {topic!r} must exist (create it with `lhv stack up`, or your usual "
                    f"tooling): {exc!r}"
                ) from exc
        n_cmd, n_search = counts
        if n_cmd != n_search:
            raise Internal(
                f"{self.topics.commands} has {n_cmd} partitions and {self.topics.search} has "
                f"{n_search}: they must be equal so that both are co-partitioned"
            )
        self.num_partitions = n_cmd

    def request_stop(self) -> None:
        """Ask `run()` to return (e.g. from a signal handler); `stop()` does the rest."""
        self._stopping.set()

    async def run(self) -> None:
        """Poll until `request_stop()`; a crashed background task ends it with an error."""
        if self._state != "started":
            raise RuntimeError("run() needs a started worker")
        assert self._intake is not None
        intake = self._intake
        with log_context(worker=self.config.worker_id):
            while not self._stopping.is_set():
                self._raise_task_errors()
                data = await intake.poll(timeout_ms=200, max_records=self.config.max_poll_records)
                if data:
                    self.metrics.observe_poll(sum(len(records) for records in data.values()))
                for tp, records in data.items():
                    if tp.topic == self.topics.commands:
                        self._route_commands(tp, records)
                    else:
                        self.search.submit(tp.partition, records)
                self._update_lag()
                self._check_stalled()

    def _route_commands(self, tp: TopicPartition, records: list[Any]) -> None:
        runner = self._runners.get(tp.partition)
        if runner is None:
            return  # not ours any more (or not restored): the owner reads them again
        runner.enqueue(records)
        if not runner.paused and runner.over_limit:
            runner.paused = True
            self.consumer.pause(tp)

    def _update_lag(self) -> None:
        """Lag = records up to the log end not yet applied (see worker/metrics.py).

        The log end is the highwater of the last fetch, or, while a restoring partition is
        paused and has fetched nothing, the log end seen at assignment (published, but not
        fed to the stall check: a restore waiting on S3 is not a stalled consumer). A
        refused partition applies nothing, so it has no lag to make up.
        """
        consumer = self.consumer
        for p, partition in self.partitions.items():
            hw = consumer.highwater(self.commands_tp(p))
            end = hw if hw is not None else partition.ready_offset + 1
            lag = max(0, end - 1 - partition.applied_offset)
            if partition.status is PartitionStatus.REFUSED:
                lag = 0
            if hw is not None or lag == 0:
                self.health.set_lag(p, lag)
            self.metrics.set_partition(
                p,
                partition.status.value,
                partition.applied_offset,
                partition.checkpoint_offset,
                lag,
            )

    def _check_stalled(self) -> None:
        """Exit (non-zero, for the supervisor) when partitions lag without progress.

        aiokafka can stall after a broker restart; /healthz reports it after
        `stall_timeout_s`, and after twice that the worker gives up so it is restarted.
        """
        stalled = self.health.stalled()
        if stalled and max(stalled.values()) > 2 * self.config.stall_timeout_s:
            raise Internal(
                f"partitions {sorted(stalled)} made no progress for "
                f"{max(stalled.values()):.0f}s while lagging: exiting to be restarted"
            )

    def _raise_task_errors(self) -> None:
        self.search.raise_errors()
        for runner in list(self._runners.values()):
            if runner.task.done() and not runner.task.cancelled():
                exc = runner.task.exception()
                if exc is not None:
                    raise exc

    async def stop(self) -> None:
        """Finish batches, checkpoint owned partitions, leave the group, close. Idempotent."""
        if self._state in ("stopped", "unopened"):
            self._state = "stopped"
            return
        self._state = "stopped"
        self._stopping.set()
        with log_context(worker=self.config.worker_id):
            log.info("worker stopping: checkpointing %d partitions", len(self.partitions))
            await self.ownership.stop()
            if self._consumer is not None:
                for p in list(self.partitions):
                    await self.ownership.release(p, park=False)
            await self.search.stop()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._intake is not None:
                await self._intake.stop()
            if self._consumer is not None:
                await self._consumer.stop()
            await self.outbox.stop()
            if self._producer is not None:
                await self._producer.stop()
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            await self._blobs.stop()
            log.info("worker stopped")

    # -- services for the parts ----------------------------------------------------------

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("worker not started")
        return self._consumer

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("worker not started")
        return self._producer

    def commands_tp(self, p: int) -> TopicPartition:
        return TopicPartition(self.topics.commands, p)

    def start_runner(self, partition: Partition) -> None:
        self._runners[partition.number] = _Runner(self, partition)

    async def stop_runner(self, p: int) -> None:
        runner = self._runners.pop(p, None)
        if runner is not None:
            await runner.stop()

    def forget_partition(self, p: int, indexes: Sequence[str] = ()) -> None:
        for name in indexes:
            self.forget_index(name)
        runner = self._runners.pop(p, None)
        if runner is not None and not runner.task.done():
            runner.task.cancel()
        self.search.forget(p)
        self.health.forget(p)
        self.metrics.forget_partition(p)

    def run_async(self, coro: Coroutine[Any, Any, Any], *, timeout_s: float = 120.0) -> Any:
        """Run `coro` on the worker's loop from an apply thread and wait for its result."""
        assert self._loop is not None, "worker not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def spawn(self, coro: Awaitable[Any], *, name: str) -> None:
        """Run a best-effort background step; its failure is logged, not fatal."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background step %s failed: %s", name, t.exception())

        task.add_done_callback(done)

    async def flush_producer(self) -> None:
        """Wait for the protocol records and the DLQ records, acks and replies sent so far."""
        await self.producer.flush()
        await self.outbox.flush()

    async def commit_offsets(self, p: int, commands_offset: int) -> None:
        """Commit p's commands offset (search offsets: `SearchServer.commit`)."""
        await self.consumer.commit({self.commands_tp(p): commands_offset})

    async def report(
        self,
        partition: Partition,
        outcomes: list[Outcome],
        *,
        timestamps: dict[int, int] | None = None,
    ) -> None:
        """Send acks and DLQ records for one applied batch.

        A failure while sending for one record (its DLQ record, its ack) is logged with
        its partition and offset and counted; it never ends the runner. `timestamps`
        (offset -> record timestamp, ms) lets acks of stale replayed records be skipped.
        """
        for out in outcomes:
            if out.error is None and out.reply_to is None:
                self.metrics.command_applied(out.op, out.applied)
                continue
            with log_context(partition=partition.number, offset=out.offset):
                try:
                    await self._report_one(partition, out, (timestamps or {}).get(out.offset))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.metrics.outgoing_failed("report", "error")
                    log.exception(
                        "sending the DLQ record or ack of a record failed",
                        extra={"partition": partition.number, "offset": out.offset},
                    )

    async def _report_one(self, partition: Partition, out: Outcome, timestamp: int | None) -> None:
        where = (partition.number, out.offset)
        if out.error is not None:
            self.metrics.command_rejected(out.op or "unknown", out.error.code)
            self.metrics.dlq_record()
            log.warning(
                "command rejected (%s): %s",
                out.error.code,
                out.error.message,
                extra={
                    "offset": out.offset,
                    "index": out.index or None,
                    "partition": partition.number,
                },
            )
            await self._send_dlq(partition, out)
        else:
            self.metrics.command_applied(out.op, out.applied)
        if out.reply_to is None:
            return
        try:
            self.reply_policy.check(out.reply_to.topic)
        except LhvError as exc:
            log.warning(
                "not acking to %r: %s",
                out.reply_to.topic,
                exc,
                extra={
                    "offset": out.offset,
                    "index": out.index or None,
                    "partition": partition.number,
                },
            )
            return
        if self._stale_replay(partition, out.offset, timestamp):
            # Replayed after a restore and older than the bound: its requester stopped
            # waiting long ago (and usually deleted its reply topic), so re-sending only
            # costs a metadata wait and a warning per record.
            self.metrics.ack_skipped()
            return
        await self.replies.send(None, out.reply_to, encode_ack(out), kind="ack", where=where)

    def _stale_replay(self, partition: Partition, offset: int, timestamp: int | None) -> bool:
        """An ack not worth sending: the record was in the log before this worker took
        the partition (a replay) and is older than `ack_replay_max_age_ms`."""
        if timestamp is None or timestamp <= 0 or offset > partition.ready_offset:
            return False
        age_ms = time.time() * 1000 - timestamp
        return age_ms > self.config.delivery.ack_replay_max_age_ms

    async def _send_dlq(self, partition: Partition, out: Outcome) -> None:
        assert out.error is not None
        limits = self.config.limits
        error_headers = dlq_headers(out.error, self.topics.commands, partition.number, out.offset)

        def fit() -> Any:
            return fit_dlq_record(
                out.key,
                out.value,
                out.headers,
                error_headers,
                max_record_bytes=self.outbox.max_record_bytes,
                max_headers=limits.max_headers,
                max_header_bytes=limits.max_header_bytes,
            )

        big = len(out.value or b"") > _FIT_IN_THREAD_BYTES
        record = await asyncio.to_thread(fit) if big else fit()
        where = (partition.number, out.offset)
        if record is None:
            self.outbox.dropped("dlq", "too_large", self.topics.dlq, where, "headers alone")
            return
        if record.truncated:
            self.metrics.dlq_cut()
        await self.outbox.send(
            "dlq",
            self.topics.dlq,
            key=record.key,
            value=record.value,
            headers=record.headers,
            where=where,
            retry_small=True,
        )

    # -- metrics hooks used by ownership --------------------------------------------------

    def metrics_rebalance(self) -> None:
        self.metrics.rebalance()

    def observe_restore(self, p: int, seconds: float, nbytes: int | None = None) -> None:
        self.metrics.observe_restore(p, seconds, nbytes)

    def observe_restore_failure(self, p: int) -> None:
        self.metrics.restore_failed(p)

    def observe_refused(self, p: int) -> None:
        self.metrics.set_partition(p, PartitionStatus.REFUSED.value, -1, -1, 0)

    def observe_snapshot(self, seconds: float, nbytes: int) -> None:
        self.metrics.observe_snapshot(seconds, nbytes)

    def observe_snapshot_failure(self) -> None:
        self.metrics.snapshot_failed()

    def observe_indexes(self, partition: Partition, names: set[str] | None = None) -> None:
        """Publish size and drift of `names` (default: all) of `partition`; a name no
        longer there was dropped, and its series go. Cheap; called from apply threads."""
        for name in sorted(names if names is not None else partition.indexes):
            index = partition.indexes.get(name)
            if index is None:
                self.forget_index(name)
                continue
            stats = index.stats()
            self.metrics.set_index_size(name, stats["count"], stats["deleted"])
            self.drift_report(name)

    def forget_index(self, name: str) -> None:
        """The index is gone from this worker (dropped, or its partition revoked)."""
        self._drift.pop(name, None)
        self.metrics.forget_index(name)

    def observe_checkpoint(self, p: int, seconds: float, offset: int) -> None:
        self.metrics.observe_checkpoint(p, seconds, offset)

    def observe_checkpoint_failure(self, p: int) -> None:
        self.metrics.checkpoint_failed(p)

    # -- drift ---------------------------------------------------------------------------

    def _drift_of(self, index: str) -> DriftMonitor:
        monitor = self._drift.get(index)
        if monitor is None:
            monitor = self._drift.setdefault(index, DriftMonitor())
        return monitor

    def observe_vectors(self, index: str, vectors: list[Any]) -> None:
        """Feed upserted vectors to the index's drift monitor (called in apply threads)."""
        if vectors:
            self._drift_of(index).observe_vectors(np.stack(vectors))

    def observe_distances(self, index: str, distances: np.ndarray) -> None:
        if distances.size:
            self._drift_of(index).observe_distances(distances)

    def drift_report(self, index: str) -> dict[str, Any] | None:
        monitor = self._drift.get(index)
        if monitor is None:
            return None
        report = monitor.report()
        self.metrics.set_drift(index, report)
        return report

    # -- HealthSource --------------------------------------------------------------------

    def partition_states(self) -> dict[int, str]:
        return {p: part.status.value for p, part in self.partitions.items()}
