"""Serving queries from the search topic: where it starts, batching, read-your-writes,
deadlines, bounds, and one reply per query whatever fails.

Each query record is decoded (in a thread), then waits until its partition serves and
has applied `min_offset` (read-your-writes), or until its deadline, whichever is first.
Ready `search` queries for one index are answered together: while one engine call for
an index runs, the queries that arrive queue up and go in the next call, so under load
the batch grows by itself and one `knn_query` serves many requesters.

Replies go to the requester's reply topic (which must match the configured pattern) with
the Spring `kafka_correlationId` header. A query without reply headers cannot be
answered: it is logged and skipped. A query naming a reply topic outside the pattern is
logged and never answered (a request can never make the worker write to another topic).
A query on a partition that is not its index's home partition gets `wrong_partition`.

Where a search partition starts (no query is silently lost, no flood is re-answered):

- With a committed offset, the new owner resumes from it. Each owner commits, for every
  partition it owns, the lowest offset still in flight (nothing before it is unanswered)
  every `QueryPolicy.commit_interval_ms` when it moved, and again on revoke and on stop.
  A worker killed -9 therefore leaves at most about one interval of answered queries to
  be answered again (clients ignore duplicate replies by correlation id).
- With no committed offset (the first worker of the group, or an owner that died before
  its first commit), it starts at the first record younger than `QueryPolicy.max_age_ms`
  (`offsets_for_times`), not at the log end: queries sent before any worker joined, or
  while the partition moved, are answered. A committed offset that retention already
  removed is treated the same way.
- A record older than `max_age_ms` (by its record timestamp), or past its `deadline_ms`,
  is answered `deadline_exceeded` without being decoded or computed: a requester that
  waited that long has given up, and a backlog costs one small reply per record.

Bounds: per partition, at most `QueryPolicy.max_parked` queries (and `max_parked_bytes`
of their records) wait for readiness or `min_offset`; past that a query is answered
`not_ready` at once (retriable). No query waits longer than `max_wait_ms`, whatever its
`deadline_ms` says (it is then answered `deadline_exceeded`).

Failures: every query that enters serving gets exactly one reply, or a logged reason
(no reply headers, a refused reply topic, a reply the broker did not take, the partition
moved to another owner). An unexpected exception while serving one query, or one group
of batched queries, answers only those `internal` (logged with partition, offset and
index); the task that drains an index's queue never dies, and every offset read is
finished, so the committed offset never sticks.

`engine_calls` and `searched` count engine calls and the queries they answered, so
`searched / engine_calls` is the mean batch size (the `lhv_search_batch_size` histogram
has the distribution).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from lhv_index import Clock, Columns, Index, MetadataJson
from lhv_index.errors import (
    DeadlineExceeded,
    DimMismatch,
    IndexNotFound,
    Internal,
    InvalidRequest,
    LhvError,
    NotReady,
    TooLarge,
    WrongPartition,
)
from worker.service.catalog import Sharded
from worker.service.config import QueryPolicy
from worker.service.gather import Gatherer, GatherTarget
from worker.service.observer import IndexObserver
from worker.service.partition import Partition, PartitionStatus
from worker.service.ports import KafkaPort, PartitionRegistry, ReplyPort, TaskOwner
from worker.service.sharding import describe
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import Metrics
from worker.wire.headers import ReplyTo, reply_to_from_headers
from worker.wire.limits import MessageLimits, reply_too_large
from worker.wire.queries import (
    DescribeQuery,
    GetQuery,
    Query,
    SearchQuery,
    StatsQuery,
    decode_query,
)
from worker.wire.replies import (
    encode_describe_reply,
    encode_error_reply,
    encode_get_reply,
    encode_search_results,
    encode_stats_reply,
)
from worker.wire.topics import ReplyTopicPolicy, TopicsConfig, home_partition

__all__ = ["SearchServer"]

log = logging.getLogger(__name__)

#: attempts to find where a newly assigned search partition starts, before falling back
#: to the consumer's own reset (its committed offset, else the log end)
_POSITION_ATTEMPTS = 6
#: the longest a commit on revoke or stop may take
_RELEASE_COMMIT_S = 5.0

_Refused = tuple[ReplyTo | None, LhvError]
"""a record answered with an error before serving: where to reply (None: nowhere), why"""


@dataclass(slots=True, eq=False)
class _Flight:
    """One owned search partition's queries between their read and their reply."""

    offsets: set[int] = field(default_factory=set)
    """offsets read and not yet finished (answered, refused, or left to the next owner)"""
    next: int | None = None
    """the offset after the last record read"""
    parked: int = 0
    """queries waiting for readiness or their `min_offset`"""
    parked_bytes: int = 0
    """record bytes of those queries"""
    committed: int | None = None
    """the offset this worker last committed"""

    def committable(self) -> int | None:
        """The lowest offset not finished (nothing before it is pending); None: nothing read."""
        return min(self.offsets) if self.offsets else self.next


@dataclass(slots=True, eq=False)
class _Pending:
    """A ready search waiting in its index's queue.

    Exactly one reply is built for it: whoever answers first `claim`s it; `done` is set
    once that reply was sent (or failed), and its requester's task then finishes."""

    query: SearchQuery
    part: Partition
    offset: int
    received: float
    claimed: bool = False
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def claim(self) -> bool:
        """True for the first caller only: it answers this query."""
        if self.claimed:
            return False
        self.claimed = True
        return True

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class SearchServer:
    """Answers queries for the partitions its worker owns (see the module docstring).

    Arguments:
        registry: the owned partitions (read only) and the partition count.
        kafka: positions search partitions and commits their offsets.
        replies: where replies go (`ReplySender`).
        reply_policy: the reply topics a query may name.
        tasks: runs the offset commits as a long-lived task (a crash ends the worker).
        observer: sees the nearest distances (drift) and gives `stats` its drift report.
        policy: bounds on waiting queries, the maximum age, the commit cadence.
        query_wait_ms: the wait of a query without a deadline.
        worker_id: named in `stats` replies.
        gatherer: answers queries of sharded names and aliases at their home (gather.py);
            None: such a query is answered `index_not_found`.
        role: `owner` or `replica`, named in `stats` replies (with the partition's lag).
    """

    def __init__(
        self,
        *,
        topics: TopicsConfig,
        registry: PartitionRegistry,
        kafka: KafkaPort,
        replies: ReplyPort,
        reply_policy: ReplyTopicPolicy,
        tasks: TaskOwner,
        observer: IndexObserver,
        metrics: Metrics,
        policy: QueryPolicy,
        limits: MessageLimits,
        max_reply_bytes: int,
        query_wait_ms: int,
        worker_id: str,
        gatherer: Gatherer | None = None,
        role: str = "owner",
    ) -> None:
        self._gatherer = gatherer
        self._topics = topics
        self._registry = registry
        self._kafka = kafka
        self._replies = replies
        self._reply_policy = reply_policy
        self._supervisor = tasks
        self._observer = observer
        self._metrics = metrics
        self._policy = policy
        self._limits = limits
        self._max_reply_bytes = max_reply_bytes
        self._query_wait_ms = query_wait_ms
        self._worker_id = worker_id
        self._role = role
        self._flights: dict[int, _Flight] = {}
        self._positioning: dict[int, asyncio.Task[None]] = {}
        self._queues: dict[str, list[_Pending]] = defaultdict(list)
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._committer: asyncio.Task[Any] | None = None
        self._closed = False
        self.engine_calls = 0
        """search engine calls made (one per batch of compatible queries)"""
        self.searched = 0
        """search queries answered by those calls"""

    async def start(self) -> None:
        """Start committing search offsets on their cadence (a long-lived task)."""
        self._closed = False
        if self._committer is None:
            self._committer = self._supervisor.start(self._commit_loop(), name="search_commits")

    async def stop(self) -> None:
        """Cancel everything in flight; unanswered queries are left uncommitted."""
        self._closed = True
        tasks = [*self._tasks, *self._positioning.values()]
        if self._committer is not None:
            tasks.append(self._committer)
            self._committer = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._positioning.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        """A task's failure is logged and counted, never lost."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._metrics.search_failed("task")
            log.error("search task %s failed", task.get_name(), exc_info=exc)

    def _failed(self, stage: str, what: str, **where: Any) -> None:
        """Log (with its traceback) and count an unexpected failure at `stage`."""
        self._metrics.search_failed(stage)
        log.exception(what, extra={k: v for k, v in where.items() if v is not None})

    def search_tp(self, p: int) -> TopicPartition:
        return TopicPartition(self._topics.search, p)

    # -- where each search partition starts ----------------------------------------------

    def assign(self, partitions: Iterable[int]) -> None:
        """Search partitions assigned: each stays paused until its start offset is set
        (its committed offset, else the first record younger than the maximum age).

        Must be called from the rebalance listener before it awaits anything, so that no
        record is fetched from the consumer's own reset position first.
        """
        consumer = self._kafka
        for p in partitions:
            consumer.pause(self.search_tp(p))
            self.forget(p)
            task = asyncio.create_task(self._position(p), name=f"search-position-{p}")
            self._positioning[p] = task
            task.add_done_callback(functools.partial(self._positioned, p))

    def _positioned(self, p: int, task: asyncio.Task[None]) -> None:
        if self._positioning.get(p) is task:
            del self._positioning[p]
        if not task.cancelled() and task.exception() is not None:
            self._metrics.search_failed("position")
            log.error("positioning search partition %d failed", p, exc_info=task.exception())

    async def _position(self, p: int) -> None:
        tp = self.search_tp(p)
        consumer = self._kafka
        with log_context(partition=p):
            start: int | None = None
            delay = 0.2
            for attempt in range(1, _POSITION_ATTEMPTS + 1):
                try:
                    start, how = await self._start_offset(tp)
                    log.info("search partition starts at offset %d (%s)", start, how)
                    break
                except KafkaError as exc:
                    log.warning(
                        "finding where the search partition starts failed (attempt %d): %s",
                        attempt,
                        exc,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            else:
                self._metrics.search_failed("position")
                log.error(
                    "could not find where the search partition starts: reading from its "
                    "committed offset, else its end"
                )
            try:
                if start is not None:
                    consumer.seek(tp, start)
                consumer.resume(tp)
            except KafkaError as exc:  # no longer assigned: the next owner positions it
                log.info("search partition not positioned: %s", exc)

    async def _start_offset(self, tp: TopicPartition) -> tuple[int, str]:
        """Where `tp` starts, and why (module docstring)."""
        consumer = self._kafka
        committed = await consumer.committed(tp)
        if committed is not None:
            first = (await consumer.beginning_offsets([tp]))[tp]
            if committed >= first:
                return committed, "committed offset"
            log.warning(
                "committed search offset %d is before the log start %d (retention)",
                committed,
                first,
            )
        max_age_ms = self._policy.max_age_ms
        end = (await consumer.end_offsets([tp]))[tp]  # before the lookup: nothing missed
        since_ms = int(time.time() * 1000) - max_age_ms
        found = (await consumer.offsets_for_times({tp: since_ms}))[tp]
        if found is None:
            return end, f"no committed offset, no record younger than {max_age_ms} ms"
        return found.offset, f"no committed offset: first record younger than {max_age_ms} ms"

    # -- committing ----------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commit every owned partition's search offset on its cadence (when it moved)."""
        interval_s = self._policy.commit_interval_ms / 1000
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self.commit(list(self._flights))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("search offset commits crashed")
            raise Internal("search offset commits crashed") from exc

    async def commit(self, partitions: Sequence[int]) -> None:
        """Commit the search offset of each of `partitions` this worker owns, when it moved
        since its last commit. A failed commit is logged; the next one retries."""
        offsets: dict[TopicPartition, int] = {}
        flights: dict[int, tuple[_Flight, int]] = {}
        assigned = self._kafka.assignment()
        for p in partitions:
            flight = self._flights.get(p)
            part = self._registry.partitions.get(p)
            if flight is None or part is None or part.status is PartitionStatus.REVOKED:
                continue
            offset = flight.committable()
            tp = self.search_tp(p)
            if offset is None or offset == flight.committed or tp not in assigned:
                continue
            offsets[tp] = offset
            flights[p] = (flight, offset)
        if not offsets:
            return
        try:
            await self._kafka.commit(offsets)
        except KafkaError as exc:
            log.warning(
                "search offset commit failed (ownership moving?): %s",
                exc,
                extra={"partition": next(iter(flights)) if len(flights) == 1 else None},
            )
            return
        for p, (flight, offset) in flights.items():
            flight.committed = offset
            self._metrics.search_committed_offset(p, offset)

    async def release(self, p: int) -> None:
        """The partition is being revoked (or the worker stops): commit its offset now, so
        the next owner answers exactly what this worker did not."""
        try:
            async with asyncio.timeout(_RELEASE_COMMIT_S):
                await self.commit([p])
        except TimeoutError:
            log.warning("search offset commit on release timed out", extra={"partition": p})

    def committable(self, partition: int) -> int | None:
        """The search-topic offset to commit for `partition`: nothing before it is pending."""
        flight = self._flights.get(partition)
        return flight.committable() if flight is not None else None

    def forget(self, partition: int) -> None:
        """The partition is gone: its unanswered queries are the next owner's."""
        self._flights.pop(partition, None)
        task = self._positioning.pop(partition, None)
        if task is not None:
            task.cancel()

    # -- intake --------------------------------------------------------------------------

    def submit(self, partition: int, records: Sequence[Any]) -> None:
        """Take one poll's query records of `partition`; answers are sent asynchronously."""
        if self._closed or not records:
            return
        flight = self._flights.get(partition)
        if flight is None:
            flight = self._flights[partition] = _Flight()
        for rec in records:
            flight.offsets.add(rec.offset)
        flight.next = records[-1].offset + 1
        self._spawn(self._intake(flight, partition, list(records)), name=f"intake-{partition}")

    async def _intake(self, flight: _Flight, partition: int, records: list[Any]) -> None:
        received = time.monotonic()
        taken = 0
        try:
            decoded = await asyncio.to_thread(self._decode_all, partition, records)
            for rec, item in zip(records, decoded, strict=True):
                if isinstance(item, tuple):
                    self._refuse(flight, partition, rec, item, received)
                else:
                    size = len(rec.value) if rec.value is not None else 0
                    self._spawn(
                        self._serve(flight, partition, rec.offset, size, item, received),
                        name=f"query-{partition}-{rec.offset}",
                    )
                taken += 1
        except Exception:
            left = records[taken:]
            self._failed(
                "intake",
                f"query intake failed: {len(left)} queries not answered",
                partition=partition,
                offset=left[0].offset if left else None,
            )
            for rec in left:
                flight.offsets.discard(rec.offset)

    def _refuse(
        self, flight: _Flight, partition: int, rec: Any, refused: _Refused, received: float
    ) -> None:
        """Answer a record that fails before serving (undecodable, too old) with its error."""
        reply_to, error = refused
        name = _key_text(rec.key)
        with log_context(partition=partition, offset=rec.offset, index=name or None):
            if reply_to is None:
                flight.offsets.discard(rec.offset)
                log.warning("query without reply headers skipped: %s", error.message)
                return
            self._spawn(
                self._refuse_reply(flight, rec.offset, reply_to, name, error, received),
                name=f"refuse-{partition}-{rec.offset}",
            )

    async def _refuse_reply(
        self,
        flight: _Flight,
        offset: int,
        reply_to: ReplyTo,
        name: str,
        error: LhvError,
        received: float,
    ) -> None:
        try:
            await self._send_error(reply_to, name, error, received)
        finally:
            flight.offsets.discard(offset)

    def _decode_all(self, partition: int, records: list[Any]) -> list[Query | _Refused]:
        """Decode `records` (in a thread); a record older than the maximum query age is not
        decoded at all."""
        out: list[Query | _Refused] = []
        limits = self._limits
        max_age_ms = self._policy.max_age_ms
        now_ms = time.time() * 1000
        for rec in records:
            headers = rec.headers or ()
            try:
                timestamp = rec.timestamp
                if isinstance(timestamp, int) and timestamp >= 0:
                    age_ms = now_ms - timestamp
                    if age_ms > max_age_ms:
                        raise DeadlineExceeded(
                            f"the request is {age_ms / 1000:.1f} s old, older than the "
                            f"maximum query age ({max_age_ms} ms): not computed"
                        )
                out.append(decode_query(rec.key, rec.value, headers, limits=limits))
            except LhvError as exc:
                out.append((_reply_to(headers), exc))
            except Exception:
                self._failed(
                    "decode", "query could not be decoded", partition=partition, offset=rec.offset
                )
                out.append((_reply_to(headers), Internal("the query could not be decoded")))
        return out

    # -- serving -------------------------------------------------------------------------

    async def _serve(
        self, flight: _Flight, partition: int, offset: int, size: int, query: Query, received: float
    ) -> None:
        reply_to = query.reply_to
        try:
            with log_context(
                partition=partition,
                offset=offset,
                index=query.index,
                correlation_id=_cid(reply_to.correlation_id),
            ):
                try:
                    self._reply_policy.check(reply_to.topic)
                except LhvError as exc:
                    log.warning("query refused: %s", exc.message)
                    return
                try:
                    part = await self._wait_ready(flight, partition, query, size)
                    if part is None:  # the partition moved: its next owner answers
                        log.info("query left to the partition's next owner")
                        return
                    target = (
                        None
                        if isinstance(query, DescribeQuery)
                        else self._gather_target(part, query.index)
                    )
                    if target is not None and self._gatherer is not None:
                        _check_sharded_dim(part, query)
                        value = await self._gatherer.answer(
                            query, target, partition, received, home=part
                        )
                        await self._send(reply_to, value)
                        self._metrics.observe_search(
                            _op(query), "ok", time.monotonic() - received, _count(query)
                        )
                        return
                    if isinstance(query, SearchQuery):
                        pending = _Pending(query, part, offset, received)
                        self._enqueue(pending)
                        await pending.done
                        return
                    if isinstance(query, GetQuery):
                        value = await asyncio.to_thread(self._get, part, query, received)
                    elif isinstance(query, DescribeQuery):
                        value = encode_describe_reply(
                            query,
                            describe(part, query.index),
                            took_ms=(time.monotonic() - received) * 1000,
                        )
                    else:
                        value = self._stats(part, query, received)
                    await self._send(reply_to, value)
                    self._metrics.observe_search(_op(query), "ok", time.monotonic() - received, 1)
                except LhvError as exc:
                    await self._send_error(
                        reply_to, query.index, exc, received, op=_op(query), queries=_count(query)
                    )
                except Exception as exc:
                    self._failed("serve", "query failed")
                    await self._send_error(
                        reply_to,
                        query.index,
                        _internal(exc),
                        received,
                        op=_op(query),
                        queries=_count(query),
                    )
        finally:
            flight.offsets.discard(offset)

    async def _wait_ready(
        self, flight: _Flight, partition: int, query: Query, size: int
    ) -> Partition | None:
        """The partition once it serves `query`; None when it was revoked meanwhile (the
        query's offset is not committed, so the next owner answers it)."""
        num_partitions = self._registry.num_partitions
        home = home_partition(query.index.encode(), num_partitions) if num_partitions else None
        if home is not None and home != partition:
            raise WrongPartition(
                f"index {query.index!r} lives on partition {home}, not {partition}"
            )
        part = self._registry.partitions.get(partition)
        if part is None or part.status is PartitionStatus.REVOKED:
            return None
        if part.status is PartitionStatus.REFUSED:
            raise NotReady(f"partition {partition} is refused: {part.refused_reason}")
        remaining_s = _remaining_s(query, self._query_wait_ms)
        if remaining_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was read")
        if not part.serves(query.min_offset):
            policy = self._policy
            if (
                flight.parked >= policy.max_parked
                or flight.parked_bytes + size > policy.max_parked_bytes
            ):
                raise NotReady(
                    f"partition {partition} has too many waiting queries ({flight.parked} "
                    f"queries, {flight.parked_bytes} bytes; limits {policy.max_parked} and "
                    f"{policy.max_parked_bytes} bytes): retry later"
                )
            cap_s = policy.max_wait_ms / 1000
            self._park(flight, partition, 1, size)
            try:
                ready = await part.wait_for(query.min_offset, timeout_s=min(remaining_s, cap_s))
            finally:
                self._park(flight, partition, -1, -size)
            if not ready:
                if part.revoked:
                    return None
                waiting_for = (
                    f"offset {query.min_offset} (applied: {part.applied_offset})"
                    if part.status is PartitionStatus.SERVING
                    else f"partition {partition} ({part.status.value})"
                )
                if remaining_s > cap_s:
                    raise DeadlineExceeded(
                        f"waited the longest a query may wait ({policy.max_wait_ms} ms) for "
                        f"{waiting_for}"
                    )
                if part.status is PartitionStatus.SERVING:
                    raise DeadlineExceeded(
                        f"offset {query.min_offset} not applied before the deadline "
                        f"(applied: {part.applied_offset})"
                    )
                raise NotReady(f"partition {partition} is {part.status.value}")
        if (
            query.index not in part.indexes
            and not isinstance(query, DescribeQuery)
            and self._gather_target(part, query.index) is None
        ):
            raise IndexNotFound(f"index {query.index!r} does not exist")
        return part

    def _gather_target(self, part: Partition, name: str) -> GatherTarget | None:
        """Where a query of `name` on its home `part` gathers from (a sharded name, an
        alias); None: answered from `part`'s own index."""
        if self._gatherer is None or name in part.indexes:
            return None
        return self._gatherer.target(part, name)

    def _park(self, flight: _Flight, partition: int, queries: int, nbytes: int) -> None:
        flight.parked += queries
        flight.parked_bytes += nbytes
        if self._flights.get(partition) is flight:
            self._metrics.set_search_parked(partition, flight.parked, flight.parked_bytes)

    # -- batched searches ----------------------------------------------------------------

    def _enqueue(self, pending: _Pending) -> None:
        name = pending.query.index
        self._queues[name].append(pending)
        if name not in self._busy:
            self._busy.add(name)
            self._spawn(self._drain(name), name=f"drain-{name}")

    async def _drain(self, index_name: str) -> None:
        """Answer the queue of `index_name` until it is empty. Whatever fails, every query
        taken gets its reply (`internal` for an unexpected failure) and the drain goes on."""
        try:
            while batch := self._queues.pop(index_name, None):
                try:
                    await self._search_batch(index_name, batch)
                except Exception:
                    await self._answer_failed("batch", "search batch failed", index_name, batch)
                finally:
                    for pending in batch:  # on cancellation too: no requester waits forever
                        pending.finish()
        finally:
            self._busy.discard(index_name)
            if self._queues.get(index_name) and not self._closed:  # came after the last check
                self._busy.add(index_name)
                self._spawn(self._drain(index_name), name=f"drain-{index_name}")

    async def _search_batch(self, index_name: str, batch: list[_Pending]) -> None:
        now_ms = time.time() * 1000
        groups: dict[tuple[Any, ...], list[_Pending]] = defaultdict(list)
        alone: list[Coroutine[Any, Any, None]] = []
        for pending in batch:
            deadline = pending.query.deadline_ms
            if deadline is not None and deadline < now_ms:
                error: LhvError = DeadlineExceeded("deadline passed while queued")
            else:
                try:
                    groups[self._group_key(index_name, pending)].append(pending)
                    continue
                except LhvError as exc:  # answered alone: one bad query never fails its batch
                    error = exc
                except Exception as exc:
                    self._failed(
                        "group",
                        "query could not be batched",
                        index=index_name,
                        partition=pending.part.number,
                        offset=pending.offset,
                    )
                    error = _internal(exc)
            alone.append(self._answer_error(pending, index_name, error))
        runs = [r for g in groups.values() for r in _within_hits(g, self._limits.max_hits)]
        await asyncio.gather(*alone, *(self._search_group_safely(index_name, r) for r in runs))

    async def _search_group_safely(self, index_name: str, group: list[_Pending]) -> None:
        """`_search_group`, whose unexpected failure answers that group alone `internal`."""
        try:
            await self._search_group(index_name, group)
        except LhvError as exc:  # the index was dropped since the group was made, ...
            await self._answer_all(group, index_name, exc)
        except Exception:
            await self._answer_failed("group", "search group failed", index_name, group)

    async def _answer_failed(
        self, stage: str, what: str, index_name: str, pendings: list[_Pending]
    ) -> None:
        """An unexpected failure of `pendings` taken together: logged and counted (in an
        `except` block, with its traceback), and each answered `internal`."""
        first = pendings[0]
        self._failed(
            stage, what, index=index_name, partition=first.part.number, offset=first.offset
        )
        await self._answer_all(pendings, index_name, Internal("the search failed"))

    def _group_key(self, index_name: str, pending: _Pending) -> tuple[Any, ...]:
        """Queries with equal keys share one engine call: same partition state, ef, filter
        and metadata flag. Raises the error a query alone deserves."""
        q = pending.query
        index = pending.part.indexes.get(index_name)
        if index is None:
            raise IndexNotFound(f"index {index_name!r} does not exist")
        if q.vectors.shape[1] != index.params.dim:
            raise DimMismatch(
                f"query vectors have {q.vectors.shape[1]} dimensions, index "
                f"{index_name!r} has {index.params.dim}"
            )
        try:
            filter_key: object = (
                orjson.dumps(q.filter, option=orjson.OPT_SORT_KEYS) if q.filter else b""
            )
        except orjson.JSONEncodeError:
            filter_key = pending  # not comparable: searched alone
        return (id(pending.part), q.ef, filter_key, q.include_metadata, q.include_vectors)

    async def _search_group(self, index_name: str, group: list[_Pending]) -> None:
        """One engine call for `group` (same partition, ef, filter and flags), then a reply
        per request: the rows of its vectors (and, asked for, the hits' stored vectors)."""
        q0 = group[0].query
        part = group[0].part
        index = part.indexes.get(index_name)
        if index is None:
            raise IndexNotFound(f"index {index_name!r} does not exist")
        vectors = np.concatenate([p.query.vectors for p in group])
        k = max(p.query.k for p in group)
        self.engine_calls += 1
        self.searched += len(vectors)
        # an error of the index (dropped since the group was made, ...) answers the whole
        # group: `_search_group_safely`
        found, stored, refused = await asyncio.to_thread(
            _search_columns,
            index,
            vectors,
            k,
            ef=q0.ef,
            filter=q0.filter,
            include_vectors=q0.include_vectors,
            requests=[(len(p.query.vectors), p.query.k) for p in group],
            include_metadata=q0.include_metadata,
            max_metadata_bytes=self._max_reply_bytes,
        )
        applied = part.applied_offset
        self._observe_distances(index_name, found)
        sends = []
        start = 0
        for pending, error in zip(group, refused, strict=True):
            q = pending.query
            rows = found[start : start + len(q.vectors)]
            start += len(q.vectors)
            if error is not None:
                sends.append(self._answer_error(pending, index_name, error))
            else:
                sends.append(self._answer(pending, index_name, rows, applied, len(vectors), stored))
        await asyncio.gather(*sends)

    async def _answer(
        self,
        pending: _Pending,
        index_name: str,
        rows: list[Columns],
        applied: int,
        batch_size: int,
        stored: dict[str, np.ndarray] | None = None,
    ) -> None:
        """The reply to one search of a group; `internal` if it cannot be built."""
        q = pending.query
        took_ms = (time.monotonic() - pending.received) * 1000
        try:
            value = encode_search_results(
                q,
                [_first(c, q.k) for c in rows],
                applied_offset=applied,
                took_ms=took_ms,
                vectors=stored,
            )
        except Exception as exc:
            self._failed(
                "reply",
                "search reply could not be built",
                index=index_name,
                partition=pending.part.number,
                offset=pending.offset,
            )
            await self._answer_error(pending, index_name, _internal(exc))
            return
        if not pending.claim():
            return
        try:
            await self._send(q.reply_to, value)
            self._metrics.observe_search(
                "search", "ok", took_ms / 1000, batch_size, queries=len(rows)
            )
        finally:
            pending.finish()

    def _observe_distances(self, index_name: str, found: list[Columns]) -> None:
        try:
            self._observer.observe_distances(
                index_name, np.array([c.distances[0] for c in found if c.ids], dtype=np.float64)
            )
        except Exception:  # drift is a statistic: it never fails a query
            self._failed("drift", "distance drift not observed", index=index_name)

    async def _answer_all(
        self, pending: Iterable[_Pending], index_name: str, error: LhvError
    ) -> None:
        """`error` to each of `pending` not answered yet."""
        await asyncio.gather(*(self._answer_error(p, index_name, error) for p in pending))

    async def _answer_error(self, pending: _Pending, index_name: str, error: LhvError) -> None:
        """The error reply to one queued search, unless it was answered already; its
        request is done after the send."""
        if not pending.claim():
            return
        try:
            with log_context(
                partition=pending.part.number,
                offset=pending.offset,
                index=index_name,
                correlation_id=_cid(pending.query.reply_to.correlation_id),
            ):
                await self._send_error(
                    pending.query.reply_to,
                    index_name,
                    error,
                    pending.received,
                    op="search",
                    queries=len(pending.query.vectors),
                )
        finally:
            pending.finish()

    def _get(self, part: Partition, query: GetQuery, received: float) -> bytes:
        index = part.indexes.get(query.index)
        if index is None:
            raise IndexNotFound(f"index {query.index!r} does not exist")
        items: list[Any] = index.get(
            query.ids, include_vectors=query.include_vectors, include_metadata=False
        )
        if query.include_metadata:  # as stored: JSON never parsed, within a reply's bytes
            try:
                metadata = index.metadata_json(
                    [it.id for it in items], max_bytes=self._max_reply_bytes
                )
            except TooLarge as exc:
                raise reply_too_large(
                    "the items' metadata is",
                    exc.size,
                    exc.limit,
                    ask="fewer ids, or without include_metadata",
                ) from None
            items = [
                _GotItem(it.id, it.vector, meta, it.clock)
                for it, meta in zip(items, metadata, strict=True)
            ]
        return encode_get_reply(
            query,
            items,
            applied_offset=part.applied_offset,
            took_ms=(time.monotonic() - received) * 1000,
        )

    def _stats(self, part: Partition, query: StatsQuery, received: float) -> bytes:
        index = part.indexes.get(query.index)
        if index is None:
            raise IndexNotFound(f"index {query.index!r} does not exist")
        stats = dict(index.stats())
        stats["applied_offset"] = part.applied_offset
        stats["checkpoint_offset"] = part.checkpoint_offset
        stats["worker"] = self._worker_id
        stats["partition"] = part.number
        stats["role"] = self._role
        kafka = self._kafka
        hw = kafka.highwater(TopicPartition(self._topics.commands, part.number)) if kafka else None
        if hw is not None:
            stats["lag"] = max(0, hw - 1 - part.applied_offset)
        drift = self._observer.drift_report(query.index)
        if drift is not None:
            stats["drift"] = drift
        return encode_stats_reply(query, stats, took_ms=(time.monotonic() - received) * 1000)

    # -- replies -------------------------------------------------------------------------

    async def _send(self, reply_to: ReplyTo, value: bytes) -> None:
        """Send one reply; a failure is logged (the reason this query got no reply)."""
        try:
            await self._replies.send(reply_to, value)
        except Exception:
            self._failed("reply", f"reply to {reply_to.topic!r} not sent")

    async def _send_error(
        self,
        reply_to: ReplyTo,
        index: str,
        error: LhvError,
        received: float,
        *,
        op: str = "search",
        queries: int = 1,
    ) -> None:
        try:
            self._reply_policy.check(reply_to.topic)
        except LhvError as exc:
            log.warning("no error reply to %r: %s", reply_to.topic, exc.message)
            return
        took_ms = (time.monotonic() - received) * 1000
        self._metrics.observe_search(op, error.code, took_ms / 1000, queries, queries=queries)
        log.info("query answered with %s: %s", error.code, error.message)
        try:
            value = encode_error_reply(reply_to, index, error, took_ms=took_ms)
        except Exception:
            self._failed("reply", "error reply could not be built")
            return
        await self._send(reply_to, value)


def _op(query: Query) -> str:
    if isinstance(query, SearchQuery):
        return "search"
    if isinstance(query, GetQuery):
        return "get"
    if isinstance(query, StatsQuery):
        return "stats"
    if isinstance(query, DescribeQuery):
        return "describe"
    raise InvalidRequest("unknown query")


def _internal(exc: BaseException) -> Internal:
    """The error a requester gets for our own fault: its kind, never its text (which may
    quote data); the traceback is in the worker's log."""
    return Internal(f"the worker failed serving this query ({type(exc).__name__})")


def _reply_to(headers: Sequence[tuple[str, bytes]]) -> ReplyTo | None:
    """Where an error reply goes, from the headers alone; None when nowhere."""
    try:
        return reply_to_from_headers(headers)
    except Exception:
        return None


def _check_sharded_dim(part: Partition, query: Query) -> None:
    """A search of a sharded index whose vectors do not have its dimension, refused at
    its home naming the index (its members would each refuse it, naming themselves).

    Raises:
        DimMismatch: the query's vectors do not have the index's dimension.
    """
    entry = part.catalog.get(query.index)
    if not isinstance(query, SearchQuery) or not isinstance(entry, Sharded):
        return
    dim = int(entry.params.get("dim", 0))
    if dim and query.vectors.shape[1] != dim:
        raise DimMismatch(
            f"query vectors have {query.vectors.shape[1]} dimensions, index "
            f"{query.index!r} has {dim}"
        )


def _search_columns(
    index: Index,
    vectors: np.ndarray,
    k: int,
    *,
    ef: int | None,
    filter: dict[str, Any] | None,
    include_vectors: bool,
    include_metadata: bool,
    requests: list[tuple[int, int]],
    max_metadata_bytes: int,
) -> tuple[list[Columns], dict[str, np.ndarray] | None, list[LhvError | None]]:
    """`index.search_columns` for the batch of `requests` (the rows and k of each, in
    order); returns the rows, the stored vectors when `include_vectors`, and per request
    None or its refusal.

    With `include_metadata`, the metadata of each request's hits is read as its stored
    JSON, never parsed; a request whose hits' metadata alone is over `max_metadata_bytes`
    (its reply could not be sent) is refused instead. The vectors of the ids found are
    read right after the search: an id deleted in between has none."""
    found = index.search_columns(vectors, k, ef=ef, filter=filter)
    refused: list[LhvError | None] = [None] * len(requests)
    start = 0
    for request, (rows, request_k) in enumerate(requests if include_metadata else ()):
        mine = [_first(c, request_k) for c in found[start : start + rows]]
        try:
            metadata: list[Any] = index.metadata_json(
                [id_ for c in mine for id_ in c.ids], max_bytes=max_metadata_bytes
            )
        except TooLarge as exc:
            refused[request] = reply_too_large(
                "the hits' metadata is",
                exc.size,
                exc.limit,
                ask="a smaller k, fewer query vectors, or without include_metadata",
            )
        else:
            pos = 0
            for row, c in enumerate(mine):
                found[start + row] = c._replace(metadata=metadata[pos : pos + len(c.ids)])
                pos += len(c.ids)
        start += rows
    if not include_vectors:
        return found, None, refused
    ids = dict.fromkeys(id_ for c in found for id_ in c.ids)
    items = index.get(ids, include_vectors=True, include_metadata=False)
    return found, {item.id: item.vector for item in items if item.vector is not None}, refused


def _within_hits(group: list[_Pending], max_hits: int) -> list[list[_Pending]]:
    """`group` cut into runs of one engine call each that returns at most `max_hits` hits
    (its rows times its largest k), queries of similar k together. A query alone is
    within the bound (`MessageLimits.max_hits`, checked when it is decoded), so a large
    k never makes the small queries batched with it cost its k times their rows."""
    runs: list[list[_Pending]] = []
    run: list[_Pending] = []
    rows = k = 0
    for pending in sorted(group, key=lambda p: p.query.k):
        n, pk = len(pending.query.vectors), pending.query.k
        if run and (rows + n) * max(k, pk) > max_hits:
            runs.append(run)
            run, rows, k = [], 0, 0
        run.append(pending)
        rows, k = rows + n, max(k, pk)
    if run:
        runs.append(run)
    return runs


class _GotItem(NamedTuple):
    """An item of a `get` reply, its metadata as stored (`MetadataJson`)."""

    id: str
    vector: np.ndarray | None
    metadata: MetadataJson | None
    clock: Clock | None


def _first(columns: Columns, k: int) -> Columns:
    """The `k` nearest of `columns` (a batch asks the engine for its largest k)."""
    if len(columns.ids) <= k:
        return columns
    meta = columns.metadata
    return Columns(columns.ids[:k], columns.distances[:k], meta[:k] if meta is not None else None)


def _count(query: Query) -> int:
    """Query vectors in a request (1 for get and stats)."""
    return len(query.vectors) if isinstance(query, SearchQuery) else 1


def _key_text(key: bytes | None) -> str:
    try:
        return key.decode() if key else ""
    except UnicodeDecodeError:
        return ""


def _cid(correlation_id: bytes) -> str:
    try:
        return correlation_id.decode()
    except UnicodeDecodeError:
        return correlation_id.hex()


def _remaining_s(query: Query, default_wait_ms: int) -> float:
    if query.deadline_ms is None:
        return default_wait_ms / 1000
    return query.deadline_ms / 1000 - time.time()
