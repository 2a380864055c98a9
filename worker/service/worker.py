"""The worker: consume commands and queries, own partitions, checkpoint, serve.

    async with Worker(config) as worker:   # start(): S3, producer, consumer, metrics
        await worker.run()                 # until stop() or a fatal error
    # stop(): finish batches, checkpoint owned partitions, leave the group, close

One consumer reads both topics in one group with a co-partitioning assignor
(`kafka/assignor.py`, then Kafka's range assignor for groups with older members), so
partition p of `lhv.commands` and of `lhv.search` belong to the same worker. With
standbys, the worker also keeps warm read-only copies of the partitions its assignment
names (`standby.py`), and takes an assigned partition over from its copy. The poll loop only routes:
command records go to the partition's runner (`runner.py`: a task that applies them in
a thread and checkpoints between batches), query records to the search server. A
partition whose runner falls behind is paused until it catches up (backpressure), so
the poll loop keeps polling and the group keeps its heartbeat.

A read replica (`WorkerConfig.role == "replica"`) is the same worker in its own group,
reading the commands topic and the replica search topic: a `Follower` (follower.py)
takes the place of `Ownership`, and its runners get the follower's read-only ports
(no acks or DLQ records, no merge objects or protocol records, no checkpoints), so it
applies the log with the owners' code and writes nothing.

`Worker` is the facade: it builds the parts and hands each the narrow ports it needs
(`ports.py`), never itself. Kafka is reached through a `KafkaTransport` (aiokafka by
default; `MemoryKafka` in unit tests) and S3 through a `BlobStore`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from lhv_index.errors import Internal
from worker.kafka.assignor import Held, Role, StandbyAssignor
from worker.kafka.errors import KafkaTopicError, map_kafka_errors
from worker.service import inflate
from worker.service.apply import Outcome
from worker.service.catalog import Alias, Sharded
from worker.service.config import WorkerConfig
from worker.service.follower import Follower, FollowPolicy, ReadOnlyWrites
from worker.service.gather import Gatherer, GatherTarget, KafkaRequests
from worker.service.merge import MergeProtocol
from worker.service.observer import IndexObserver
from worker.service.outbox import Outbox
from worker.service.ownership import Ownership
from worker.service.partition import Partition, PartitionStatus
from worker.service.ports import KafkaTransport
from worker.service.replies import ReplySender
from worker.service.report import Reporter
from worker.service.runner import ReadAhead, Runner, RunnerLimits, records_within
from worker.service.search import SearchServer
from worker.service.sharding import Forwarder
from worker.service.standby import Standbys
from worker.service.tasks import Supervisor
from worker.service.transport import AiokafkaTransport
from worker.service.warm import KafkaLogReader, LogReader
from worker.storage.blobstore import BlobStore, S3BlobStore
from worker.storage.snapshots import SnapshotStore
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import HealthTracker, Metrics, MetricsServer
from worker.wire.topics import TopicsConfig

__all__ = ["Worker"]

log = logging.getLogger(__name__)


class Worker:
    """An LHV worker process. See the module docstring for the lifecycle.

    Arguments:
        config: the settings.
        kafka: the Kafka transport; default aiokafka with `config.kafka`
            (`MemoryKafka.client(...)` in unit tests).
        blobs: the blob store; default S3 with `config.s3` (`MemoryBlobStore` in tests).

    Background tasks (`tasks.py`, owned by `self.tasks`):

    | task | kind | on failure |
    | --- | --- | --- |
    | `partition-<p>`: a runner | long-lived | fatal: `run()` raises its error |
    | `restore-<p>`: a restore (retries S3 and Kafka itself) | long-lived | fatal |
    | `checkpoint-<p>`: a checkpoint's uploads, manifest and commit, after its capture (S3 failures are retried by the next checkpoint) | long-lived | fatal |
    | `search_commits`: search offset commits | long-lived | fatal |
    | `merge_sweeper`: re-produces `merge_done` | long-lived | fatal (a failed sweep is retried inside) |
    | `gc-<p>`: snapshot garbage collection | best effort | logged, counted |
    | `after_checkpoint-<p>`: merge steps waiting on a checkpoint | best effort | logged, counted (the sweeper redoes them) |
    | `notify-<p>`: wakes queries of a dropped partition | best effort | logged, counted |

    Failures are counted in `lhv_background_failures_total{task}`. Per-query tasks of
    the search server answer their query whatever fails (search.py). `run()` runs the
    poll loop and a watch on the long-lived tasks in one `asyncio.TaskGroup`: whichever
    fails first ends `run()` with its error.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        kafka: KafkaTransport | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.role = config.role
        own = config
        config = config.for_role()  # a replica: its group, the replica search topic
        self.config = config
        self.topics: TopicsConfig = config.topics
        self.partitions: dict[int, Partition] = {}
        """the owned partitions (the `PartitionRegistry` the parts share)"""
        self.num_partitions = 0
        self.metrics = Metrics()
        self.health = HealthTracker(
            stall_timeout_s=config.stall_timeout_s, states=self.partition_states
        )
        self.tasks = Supervisor(self.metrics)
        self.observer = IndexObserver(self.metrics)
        self.reply_policy = own.topics.reply_policy()  # the owners' search topic too
        self.assignor: StandbyAssignor | None = None
        """the group's assignor (`kafka/assignor.py`): co-partitioned, sticky, partitions
        spread member by member (so the members of a sharded index, on consecutive
        partitions, land on different workers), warm copies first, and
        `LHV_STANDBY_REPLICAS` standbys; None for a read replica (a group of its own)
        and for an injected transport"""
        if kafka is None and not config.replica:
            self.assignor = StandbyAssignor(replicas=config.standby_replicas, held=self._held)
        self._kafka: KafkaTransport = kafka or AiokafkaTransport(
            config, self.metrics, assignor=self.assignor
        )
        self.outbox = Outbox(
            config.kafka, config.delivery, self.metrics, producer=self._kafka.reply_producer()
        )
        self.replies = ReplySender(
            self.outbox,
            max_missing=config.delivery.max_missing_reply_topics,
            on_drop=self.metrics.reply_dropped,
        )
        self._blobs: BlobStore = blobs if blobs is not None else S3BlobStore(config.s3)
        self.store = SnapshotStore(
            self._blobs,
            topic=config.topics.commands,
            worker_id=config.worker_id,
            index_limits=config.index_limits,
            policy=config.checkpoint.deltas,
        )
        self.reporter = Reporter(
            topics=self.topics,
            limits=config.limits,
            delivery=config.delivery,
            outbox=self.outbox,
            replies=self.replies,
            reply_policy=self.reply_policy,
            metrics=self.metrics,
        )
        self._requests: KafkaRequests | None = None
        gatherer: Gatherer | None = None
        if kafka is None:  # on the real transport: gathers for sharded names and aliases
            self._requests = KafkaRequests(
                config.kafka,
                reply_topic=_gather_topic(config),
                keep_topic=config.group_instance_id is not None,
            )
            gatherer = Gatherer(
                search_topic=config.topics.search,
                requests=self._requests,
                targets=self._gather_target,
                policy=config.queries,
                query_wait_ms=config.query_wait_ms,
                max_reply_bytes=config.delivery.max_record_bytes,
            )
        self._runner_limits = RunnerLimits.of(config)
        self._runners: dict[int, Runner] = {}
        #: partition -> (since when records are held back by an open transaction, told)
        self._held_since: dict[int, tuple[float, bool]] = {}
        self._read_ahead = ReadAhead(config.max_read_ahead_bytes, self._runners)
        self._state = "unopened"
        self._connected = False
        self._stopping = asyncio.Event()
        self._metrics_server: MetricsServer | None = None
        self.search = SearchServer(
            topics=self.topics,
            registry=self,
            kafka=self._kafka,
            replies=self.replies,
            reply_policy=self.reply_policy,
            tasks=self.tasks,
            observer=self.observer,
            metrics=self.metrics,
            policy=config.queries,
            limits=config.limits,
            max_reply_bytes=config.delivery.max_record_bytes,
            query_wait_ms=config.query_wait_ms,
            worker_id=config.worker_id,
            gatherer=gatherer,
            role=config.role,
        )
        self.follower: Follower | None = None
        if config.replica:
            self.follower = Follower(
                topics=self.topics,
                registry=self,
                kafka=self._kafka,
                search=self.search,
                store=self.store,
                tasks=self.tasks,
                observer=self.observer,
                metrics=self.metrics,
                policy=FollowPolicy(
                    retry_backoff_s=config.checkpoint.retry_backoff_s,
                    retry_backoff_max_s=config.checkpoint.retry_backoff_max_s,
                    accept_data_loss=config.accept_data_loss,
                ),
            )

        def merge_protocol(**kw: Any) -> MergeProtocol:
            """The merge and import steps over this worker's S3, Kafka and partitions;
            `kw` says whose writes they make (the owner's, or a read-only copy's)."""
            return MergeProtocol(
                topics=self.topics,
                registry=self,
                kafka=self._kafka,
                blobs=self._blobs,
                tasks=self.tasks,
                imports=config.imports,
                s3=config.s3,
                internal_key=config.internal_key,
                checkpoint_every_records=config.checkpoint.every_records,
                **kw,
            )

        self.barrier = merge_protocol(
            writes=self.follower.writes if self.follower is not None else None,
            max_record_bytes=config.limits.max_message_bytes,
            acks=lambda reply_to, value: self.replies.send(reply_to, value, kind="ack"),
        )
        self.standbys: Standbys | None = None
        self.standby_steps: MergeProtocol | None = None
        if self.assignor is not None and config.standby_replicas > 0 and self.follower is None:
            # the standby copies' barrier steps: a replica's, writing nothing
            self.standby_steps = merge_protocol(writes=ReadOnlyWrites(self.store))
            self.standbys = Standbys.over(
                store=self.store,
                reader=self._standby_reader,
                num_partitions=lambda: self.num_partitions,
                metrics=self.metrics,
                limits=config.limits,
                index_limits=config.index_limits,
                steps=self.standby_steps,
                max_records=config.max_poll_records,
            )
        self._ownership: Ownership | None = None
        if self.follower is None:
            self._ownership = Ownership(
                topics=self.topics,
                registry=self,
                kafka=self._kafka,
                search=self.search,
                store=self.store,
                flush=self.flush_producer,
                tasks=self.tasks,
                observer=self.observer,
                metrics=self.metrics,
                policy=config.checkpoint,
                accept_data_loss=config.accept_data_loss,
                rebalance_timeout_ms=config.rebalance_timeout_ms,
                standbys=self.standbys,
                standby_plan=(
                    self.assignor.take_standbys
                    if self.assignor is not None and self.standbys is not None
                    else None
                ),
                report=self._report_promoted,
            )

        self.forwarder: Forwarder | None = None
        if self.follower is None:
            self.forwarder = Forwarder(kafka=self._kafka, topic=self.topics.commands)

    @property
    def ownership(self) -> Ownership:
        """The owner's partition lifecycle (restore, checkpoint, revoke)."""
        if self._ownership is None:
            raise RuntimeError("a read replica owns no partition")
        return self._ownership

    @property
    def _lifecycle(self) -> Ownership | Follower:
        """The rebalance listener: the owner's `Ownership` or the replica's `Follower`."""
        return self.follower if self.follower is not None else self.ownership

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
            self._connected = True
            await self._kafka.start()
            await self.outbox.start()
            await self._check_topics()
            if self._requests is not None:
                try:
                    await self._requests.start()
                except Exception as exc:  # no gathers; everything else is served
                    log.warning(
                        "gather reply topic %s not available (%r): queries keyed by a sharded "
                        "name or an alias get not_ready",
                        self._requests.reply_topic,
                        exc,
                    )
                    await self._requests.stop()
            self._kafka.subscribe(
                [self.topics.commands, self.topics.search],
                listener=_UntilStopped(self._lifecycle, self._stopping),
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
            if self.standby_steps is not None:  # after the owner's: the key exists
                await self.standby_steps.start()
            self._state = "started"
            log.info(
                "worker started (%s): group %s, topics %s/%s, %d partitions",
                self.role,
                self.config.group_id,
                self.topics.commands,
                self.topics.search,
                self.num_partitions,
            )

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    @property
    def blobs(self) -> BlobStore:
        """The worker's blob store (its bucket and prefix), started with the worker and
        stopped last."""
        return self._blobs

    @property
    def consumer(self) -> KafkaTransport:
        """The Kafka transport (positions, offsets, the poll)."""
        return self._kafka

    async def _check_topics(self) -> None:
        """The commands and search topics exist with equal partition counts
        (co-partitioning needs it), and so does the dead-letter topic of an owner: a
        rejected command's DLQ record would otherwise be lost, after holding its partition
        back while the producer waited for the topic."""
        topics = self.topics
        n_cmd = await self._partition_count(topics.commands, "LHV_COMMANDS_TOPIC")
        n_search = await self._partition_count(topics.search, "LHV_SEARCH_TOPIC")
        if self.role != "replica":  # a read replica sends nothing
            await self._partition_count(topics.dlq, "LHV_DLQ_TOPIC")
        if n_cmd != n_search:
            raise KafkaTopicError(
                f"{self.topics.commands} has {n_cmd} partitions and {self.topics.search} has "
                f"{n_search}: they must be equal so that both are co-partitioned"
            )
        self.num_partitions = n_cmd

    async def _partition_count(self, topic: str, setting: str) -> int:
        try:
            async with asyncio.timeout(30):
                return len(await self._kafka.partitions_for(topic))
        except (TimeoutError, KafkaError) as exc:
            raise KafkaTopicError(
                f"topic {topic!r} must exist: workers create no topics (create it with `lhv "
                f"stack up`, or your usual tooling; check {setting}): {exc!r}"
            ) from exc

    def request_stop(self) -> None:
        """Ask `run()` to return (e.g. from a signal handler); `stop()` does the rest."""
        self._stopping.set()

    async def run(self) -> None:
        """Poll until `request_stop()`.

        Raises:
            Exception: the error of a crashed long-lived task (class docstring) or of the
                poll loop; the process should exit non-zero.
        """
        if self._state != "started":
            raise RuntimeError("run() needs a started worker")
        with log_context(worker=self.config.worker_id):
            try:
                async with asyncio.TaskGroup() as group:
                    watch = group.create_task(self.tasks.failed(), name="watch")
                    await group.create_task(self._poll_loop(), name="poll")
                    watch.cancel()
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0]  # noqa: B904 (the group adds nothing)

    async def _poll_loop(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                self.tasks.raise_failure()
                data = await self._poll_unless_stopped(stop)
                if data is None:
                    return
                self._take(data)
                await self._pass_empty()
                self._update_lag()
                self._check_stalled()
        finally:
            stop.cancel()

    async def _poll_unless_stopped(
        self, stop: asyncio.Future[Any]
    ) -> dict[TopicPartition, list[Any]] | None:
        """One poll, or None once a stop is requested. aiokafka's `getmany` waits without
        bound for a rebalance to finish (past its timeout): a broker lost in the middle of
        a join would otherwise keep a stop request (SIGTERM) from ever being seen. A poll
        cut short by the stop loses nothing: offsets are committed from what was applied
        and answered, so the next owner reads what it had taken."""
        poll = asyncio.ensure_future(
            self._kafka.poll(timeout_ms=200, max_records=self.config.max_poll_records)
        )
        try:
            await asyncio.wait({poll, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this loop is cancelled: no poll left running on its own
            if not poll.done():
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)
                if stop.done():
                    log.info("stop requested while the consumer waited for a rebalance")
        if poll.cancelled():
            return None
        return poll.result()

    def _take(self, data: dict[TopicPartition, list[Any]]) -> None:
        """One poll's records to the runners and the search server."""
        if data:
            self.metrics.observe_poll(sum(len(records) for records in data.values()))
        for tp, records in data.items():
            if tp.topic == self.topics.commands:
                self._route_commands(tp, records)
            else:
                self.search.submit(tp.partition, records)
        self._resume_runners()

    async def _pass_empty(self) -> None:
        """Tell each idle runner where the consumer reads its partition next
        (`Runner.pass_empty`): a log that ends in a transaction marker or an aborted
        transaction is then caught up, though no record comes to apply."""
        for p, runner in list(self._runners.items()):
            if runner.pending == 0 and not runner.paused:
                position = await self._kafka.position(self.commands_tp(p))
                if position is not None and self._runners.get(p) is runner:
                    await runner.pass_empty(position)

    def _route_commands(self, tp: TopicPartition, records: list[Any]) -> None:
        """Queue what fits of a poll's records within the read-ahead bounds (`ReadAhead`;
        one record at least when the partition has nothing queued and the worker's queue
        is at half, so a record larger than a bound passes alone); the partition is sought
        back to the first record left, and paused once over a bound."""
        runner = self._runners.get(tp.partition)
        if runner is None:
            return  # not ours any more (or not restored): the owner reads them again
        ahead = self._read_ahead
        first = runner.pending_bytes == 0 and ahead.under_half  # never starved by the others
        take = records_within(records, ahead.room(runner), at_least_one=first)
        if take < len(records):
            self._kafka.seek(tp, records[take].offset)  # read again once resumed
        runner.enqueue(records[:take])
        if take < len(records) or runner.over_limit:
            runner.pause()

    def _resume_runners(self) -> None:
        """Resume the partitions paused while other partitions filled the worker's
        read-ahead (a runner with nothing queued has no batch after which to resume)."""
        for runner in self._runners.values():
            runner.resume_if_drained()

    def _update_lag(self) -> None:
        """Lag = records up to the log end not yet applied (see worker/telemetry/metrics.py).

        The log end is the last stable offset of the last fetch (`KafkaPort.highwater`),
        or, while a restoring partition is paused and has fetched nothing, the log end seen
        at assignment (published, but not fed to the stall check: a restore waiting on S3
        is not a stalled consumer). A refused partition applies nothing, so it has no lag
        to make up.
        """
        kafka = self._kafka
        for p, partition in self.partitions.items():
            hw = kafka.highwater(self.commands_tp(p))
            end = hw if hw is not None else partition.ready_offset + 1
            lag = max(0, end - 1 - partition.applied_offset)
            if partition.status is PartitionStatus.REFUSED:
                lag = 0
            if hw is not None or lag == 0:
                self.health.set_lag(p, lag)
            if self.follower is not None:
                self.metrics.set_replica_lag(p, lag)
            self.metrics.set_partition(
                p,
                partition.status.value,
                partition.applied_offset,
                partition.checkpoint_offset,
                lag,
            )
            if hw is not None:
                self._note_held_back(p, kafka.held_back(self.commands_tp(p)), hw)

        if self.standbys is not None:
            self.metrics.set_standby_lags(self.standbys.lags())

    def _note_held_back(self, p: int, held: int, stable_end: int) -> None:
        """Publish the records held back behind an open transaction, and say so in the
        log once they have waited `stall_timeout_s` (and again when they are released):
        they are not lag, so nothing else would tell why they are not applied."""
        self.metrics.set_held_back(p, held)
        now = time.monotonic()
        since, told = self._held_since.get(p, (now, False))
        if held == 0:
            if self._held_since.pop(p, None) is not None and told:
                log.info(
                    "the transaction holding records back ended after %.0f s",
                    now - since,
                    extra={"partition": p, "offset": stable_end},
                )
            return
        if not told and now - since >= self.config.stall_timeout_s:
            told = True
            log.warning(
                "%d records wait behind a transaction open since offset %d for %.0f s: "
                "Kafka gives them to read_committed consumers once it commits or aborts "
                "(the producer's transaction.timeout.ms, at most the broker's "
                "transaction.max.timeout.ms)",
                held,
                stable_end,
                now - since,
                extra={"partition": p, "offset": stable_end},
            )
        self._held_since[p] = (since, told)

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

    async def stop(self) -> None:
        """Finish batches, checkpoint owned partitions, leave the group, close. Idempotent."""
        if self._state in ("stopped", "unopened"):
            self._state = "stopped"
            return
        self._state = "stopped"
        self._stopping.set()
        with log_context(worker=self.config.worker_id):
            log.info(
                "worker stopping: %s %d partitions",
                "dropping the copies of" if self.follower is not None else "checkpointing",
                len(self.partitions),
            )
            lifecycle = self._lifecycle
            await lifecycle.stop()
            if self._connected:
                for p in list(self.partitions):
                    await lifecycle.release(p, park=False)
            if self.standbys is not None:
                await self.standbys.stop()
            await self.search.stop()
            if self._requests is not None:
                await self._requests.stop()
            await self.tasks.close()
            await self._kafka.stop()
            await self.outbox.stop()
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            await self._blobs.stop()
            log.info("worker stopped")

    def _gather_target(self, part: Partition, name: str) -> GatherTarget | None:
        """The members a query of `name` gathers from at its home `part` (its catalog
        entry: a sharded index, or an alias, relayed to its target); None: not gathered."""
        entry = part.catalog.get(name)
        if isinstance(entry, Sharded):
            return GatherTarget(name, entry.shards)
        if isinstance(entry, Alias):
            return GatherTarget(entry.target, alias=name)
        return None

    # -- PartitionRegistry (handed to ownership, search and merge) -----------------------

    def commands_tp(self, p: int) -> TopicPartition:
        return TopicPartition(self.topics.commands, p)

    def start_runner(self, partition: Partition) -> None:
        follower = self.follower
        self._runners[partition.number] = Runner(
            partition,
            tp=self.commands_tp(partition.number),
            num_partitions=self.num_partitions,
            settings=self._runner_limits,
            kafka=self._kafka,
            # a replica's runner gets the follower's read-only ports
            checkpoint=follower.settle if follower else self._policy_checkpoint,
            reporter=follower.reports if follower else self.reporter,
            barrier=self.barrier,
            observer=self.observer,
            metrics=self.metrics,
            health=self.health,
            tasks=self.tasks,
            forwarder=self.forwarder,  # None for a replica: it forwards nothing
            restore_again=follower.restore_again if follower else None,
            read_ahead=self._read_ahead,
        )

    async def _policy_checkpoint(self, partition: Partition, reason: str) -> bool:
        return await self.ownership.begin_checkpoint(partition, reason=reason)

    async def stop_runner(self, number: int) -> None:
        runner = self._runners.pop(number, None)
        if runner is not None:
            await runner.stop()

    def forget_partition(self, number: int, indexes: Iterable[str] = ()) -> None:
        for name in indexes:
            self.observer.forget_index(name)
        runner = self._runners.pop(number, None)
        if runner is not None:
            runner.cancel()
        self.search.forget(number)
        self.health.forget(number)
        self.metrics.forget_partition(number)
        self._held_since.pop(number, None)

    async def flush_producer(self) -> None:
        """Wait for the protocol records and the DLQ records, acks and replies sent so far."""
        await self._kafka.flush()
        await self.outbox.flush()

    # -- standbys -----------------------------------------------------------------------

    def _held(self) -> dict[int, Held]:
        """This worker's report to the group: what it owns or parked, and its warm
        standby copies, each with its applied offset."""
        held = {}
        if self.standbys is not None:
            held = {p: Held(Role.STANDBY, off) for p, off in self.standbys.held().items()}
        for p, off in self.ownership.held().items():
            held[p] = Held(Role.ACTIVE, off)
        return held

    async def _report_promoted(
        self, partition: Partition, outcomes: list[Outcome], timestamps: dict[int, int]
    ) -> None:
        """What a promoted standby copy applied past the manifest: its forwards first (as
        a runner's batch), then its acks and DLQ records."""
        if self.forwarder is not None:
            await self.forwarder.send(outcomes)
        await self.reporter.report(partition, outcomes, timestamps=timestamps)

    def _standby_reader(self, p: int) -> LogReader:
        return KafkaLogReader(
            self.config.kafka,
            self.commands_tp(p),
            max_fetch_bytes=max(self.config.limits.max_message_bytes, 1048576),
        )

    # -- HealthSource --------------------------------------------------------------------

    def partition_states(self) -> dict[int, str]:
        return {p: part.status.value for p, part in self.partitions.items()}


def _gather_topic(config: WorkerConfig) -> str:
    """This worker's reply topic for gathers, under the reply pattern.

    A static member (`group_instance_id`) has a stable identity, so its topic is named
    from it (with the group): a restart, even after kill -9, reuses the same topic instead
    of leaving one behind per run. Replies left in it from an earlier run are never taken
    for new ones: the reader starts at the topic's end and correlation ids are random per
    gather. Without one the name is unique per run (and the topic deleted at stop)."""
    prefix = config.topics.reply_pattern.split("*", 1)[0]
    if config.group_instance_id:
        group = _topic_part(config.group_id)[:96]
        member = _topic_part(config.group_instance_id)[:96]
        return f"{prefix}gather-{group}-{member}"
    worker = _topic_part(config.worker_id)[:64]
    return f"{prefix}gather-{worker}-{uuid.uuid4().hex[:8]}"


def _topic_part(text: str) -> str:
    """`text` with every character a topic name may not hold replaced by `-`."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


class _UntilStopped(ConsumerRebalanceListener):  # type: ignore[misc]
    """The worker's rebalance callbacks, but no assignment once it is stopping. A join
    still under way when the worker stops is finished by the consumer while it leaves
    the group (aiokafka's `stop()` lets its coordination task end), after the worker
    released its partitions and stopped its parts: that late assignment is logged and
    left to the next owner, so nothing is restored or positioned on a closing transport.
    Revocations always go through: a partition is released before another owner takes it."""

    def __init__(self, listener: ConsumerRebalanceListener, stopping: asyncio.Event) -> None:
        self._listener = listener
        self._stopping = stopping

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._listener.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if self._stopping.is_set():
            log.info(
                "partitions assigned while stopping, left to the next owner: %s",
                ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)),
            )
            return
        await self._listener.on_partitions_assigned(assigned)
