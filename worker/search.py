"""Serving queries from the search topic: batching, read-your-writes, deadlines.

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

`engine_calls` and `searched` count engine calls and the queries they answered, so
`searched / engine_calls` is the mean batch size (the `lhv_search_batch_size` histogram
has the distribution).

The search topic's committed offset is the lowest offset still in flight, so queries a
worker had not answered when it lost the partition are answered by the next owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from lhv_index import Columns, Index
from lhv_index.errors import (
    DeadlineExceeded,
    DimMismatch,
    IndexNotFound,
    Internal,
    InvalidRequest,
    LhvError,
    NotReady,
    WrongPartition,
)
from worker.apply import home_partition
from worker.logs import log_context
from worker.messages import (
    GetQuery,
    Query,
    ReplyTo,
    SearchQuery,
    StatsQuery,
    decode_query,
    encode_error_reply,
    encode_get_reply,
    encode_search_results,
    encode_stats_reply,
    reply_to_from_headers,
)
from worker.partition import PartitionStatus

if TYPE_CHECKING:
    from worker.partition import Partition
    from worker.service import Worker

__all__ = ["SearchServer"]

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Pending:
    query: SearchQuery
    partition: int
    offset: int
    received: float
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SearchServer:
    """Answers queries for the partitions its worker owns."""

    def __init__(self, worker: Worker) -> None:
        self._w = worker
        self._in_flight: dict[int, set[int]] = defaultdict(set)
        self._next: dict[int, int] = {}
        self._queues: dict[str, list[_Pending]] = defaultdict(list)
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.engine_calls = 0
        """search engine calls made (one per batch of compatible queries)"""
        self.searched = 0
        """search queries answered by those calls"""

    async def start(self) -> None:
        self._closed = False

    async def stop(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- intake --------------------------------------------------------------------------

    def submit(self, partition: int, records: Sequence[Any]) -> None:
        """Take one poll's query records of `partition`; answers are sent asynchronously."""
        if self._closed or not records:
            return
        flight = self._in_flight[partition]
        for rec in records:
            flight.add(rec.offset)
        self._next[partition] = records[-1].offset + 1
        self._spawn(self._intake(partition, list(records)))

    async def _intake(self, partition: int, records: list[Any]) -> None:
        received = time.monotonic()
        decoded = await asyncio.to_thread(self._decode_all, records)
        for rec, item in zip(records, decoded, strict=True):
            if isinstance(item, tuple):
                reply_to, error = item
                self._finish(partition, rec.offset)
                if reply_to is None:
                    log.warning(
                        "query without reply headers skipped: %s",
                        error.message,
                        extra={"partition": partition, "offset": rec.offset},
                    )
                    continue
                name = _key_text(rec.key)
                with log_context(partition=partition, offset=rec.offset, index=name or None):
                    self._spawn(self._send_error(reply_to, name, error, received))
                continue
            self._spawn(self._serve(partition, rec.offset, item, received))

    def _decode_all(self, records: list[Any]) -> list[Query | tuple[ReplyTo | None, LhvError]]:
        out: list[Query | tuple[ReplyTo | None, LhvError]] = []
        limits = self._w.config.limits
        for rec in records:
            headers = rec.headers or ()
            try:
                out.append(decode_query(rec.key, rec.value, headers, limits=limits))
            except LhvError as exc:
                try:
                    reply_to = reply_to_from_headers(headers)
                except LhvError:
                    reply_to = None
                out.append((reply_to, exc))
        return out

    def _finish(self, partition: int, offset: int) -> None:
        self._in_flight[partition].discard(offset)

    def committable(self, partition: int) -> int | None:
        """The search-topic offset to commit for `partition`: nothing before it is pending."""
        flight = self._in_flight.get(partition)
        if flight:
            return min(flight)
        return self._next.get(partition)

    def forget(self, partition: int) -> None:
        """The partition is gone: its unanswered queries are the next owner's."""
        self._in_flight.pop(partition, None)
        self._next.pop(partition, None)

    # -- serving -------------------------------------------------------------------------

    async def _serve(self, partition: int, offset: int, query: Query, received: float) -> None:
        reply_to = query.reply_to
        with log_context(
            partition=partition,
            offset=offset,
            index=query.index,
            correlation_id=_cid(reply_to.correlation_id),
        ):
            try:
                self._w.reply_policy.check(reply_to.topic)
            except LhvError as exc:
                log.warning("query refused: %s", exc.message)
                self._finish(partition, offset)
                return
            try:
                part = await self._wait_ready(partition, query)
                if part is None:  # the partition moved: its next owner answers
                    log.info("query left to the partition's next owner")
                    return
                if isinstance(query, SearchQuery):
                    pending = _Pending(query, partition, offset, received)
                    self._queues[query.index].append(pending)
                    if query.index not in self._busy:
                        self._busy.add(query.index)
                        self._spawn(self._drain(query.index, part))
                    await pending.done
                    return
                if isinstance(query, GetQuery):
                    value = await asyncio.to_thread(self._get, part, query, received)
                else:
                    value = self._stats(part, query, received)
                await self._send(reply_to, value)
                self._w.metrics.observe_search(_op(query), "ok", time.monotonic() - received, 1)
            except LhvError as exc:
                await self._send_error(
                    reply_to, query.index, exc, received, op=_op(query), queries=_count(query)
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("query failed")
                await self._send_error(
                    reply_to,
                    query.index,
                    Internal(str(exc)),
                    received,
                    op=_op(query),
                    queries=_count(query),
                )
            finally:
                self._finish(partition, offset)

    async def _wait_ready(self, partition: int, query: Query) -> Partition | None:
        """The partition once it serves `query`; None when it was revoked meanwhile (the
        query's offset is not committed, so the next owner answers it)."""
        num_partitions = self._w.num_partitions
        home = home_partition(query.index.encode(), num_partitions) if num_partitions else None
        if home is not None and home != partition:
            raise WrongPartition(
                f"index {query.index!r} lives on partition {home}, not {partition}"
            )
        part = self._w.partitions.get(partition)
        if part is None or part.status is PartitionStatus.REVOKED:
            return None
        if part.status is PartitionStatus.REFUSED:
            raise NotReady(f"partition {partition} is refused: {part.refused_reason}")
        wait_s = _remaining_s(query, self._w.config.query_wait_ms)
        if wait_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was read")
        if not await part.wait_for(query.min_offset, timeout_s=wait_s):
            if part.status is PartitionStatus.REVOKED:
                return None
            if part.status is PartitionStatus.SERVING:
                raise DeadlineExceeded(
                    f"offset {query.min_offset} not applied before the deadline "
                    f"(applied: {part.applied_offset})"
                )
            raise NotReady(f"partition {partition} is {part.status.value}")
        if query.index not in part.indexes:
            raise IndexNotFound(f"index {query.index!r} does not exist")
        return part

    async def _drain(self, index_name: str, part: Partition) -> None:
        try:
            while self._queues.get(index_name):
                batch = self._queues.pop(index_name)
                now_ms = time.time() * 1000
                live = []
                for pending in batch:
                    deadline = pending.query.deadline_ms
                    if deadline is not None and deadline < now_ms:
                        self._spawn(
                            self._answer_error(
                                pending,
                                index_name,
                                DeadlineExceeded("deadline passed while queued"),
                            )
                        )
                    else:
                        live.append(pending)
                if live:
                    await self._search_batch(index_name, part, live)
        finally:
            self._busy.discard(index_name)
            if self._queues.get(index_name):  # arrived after the last check
                self._busy.add(index_name)
                self._spawn(self._drain(index_name, part))

    async def _search_batch(self, index_name: str, part: Partition, batch: list[_Pending]) -> None:
        index = part.indexes.get(index_name)
        groups: dict[tuple[Any, ...], list[_Pending]] = defaultdict(list)
        for pending in batch:
            q = pending.query
            error: LhvError | None = None
            if index is None:
                error = IndexNotFound(f"index {index_name!r} does not exist")
            elif q.vectors.shape[1] != index.params.dim:
                error = DimMismatch(
                    f"query vectors have {q.vectors.shape[1]} dimensions, index "
                    f"{index_name!r} has {index.params.dim}"
                )
            if error is not None:  # answered alone: one bad query never fails its batch
                self._spawn(self._answer_error(pending, index_name, error))
                continue
            key = (
                q.ef,
                orjson.dumps(q.filter, option=orjson.OPT_SORT_KEYS) if q.filter else b"",
                q.include_metadata,
            )
            groups[key].append(pending)
        if index is None:
            return
        for group in groups.values():
            try:
                await self._search_group(index_name, part, index, group)
            finally:
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_result(None)

    async def _search_group(
        self, index_name: str, part: Partition, index: Index, group: list[_Pending]
    ) -> None:
        """One engine call for `group` (same ef, filter and metadata flag), then a reply per
        request: the rows of its vectors."""
        q0 = group[0].query
        try:
            vectors = np.concatenate([p.query.vectors for p in group])
            k = max(p.query.k for p in group)
            self.engine_calls += 1
            self.searched += len(vectors)
            found = await asyncio.to_thread(
                index.search_columns,
                vectors,
                k,
                ef=q0.ef,
                filter=q0.filter,
                include_metadata=q0.include_metadata,
            )
            applied = part.applied_offset
            self._w.observe_distances(
                index_name, np.array([c.distances[0] for c in found if c.ids], dtype=np.float64)
            )
            sends = []
            start = 0
            for pending in group:
                q = pending.query
                rows = [_first(c, q.k) for c in found[start : start + len(q.vectors)]]
                start += len(q.vectors)
                took_ms = (time.monotonic() - pending.received) * 1000
                sends.append(
                    self._send(
                        q.reply_to,
                        encode_search_results(q, rows, applied_offset=applied, took_ms=took_ms),
                    )
                )
                self._w.metrics.observe_search(
                    "search", "ok", took_ms / 1000, len(vectors), queries=len(rows)
                )
            await asyncio.gather(*sends)
        except LhvError as exc:
            await asyncio.gather(*(self._answer_error(p, index_name, exc) for p in group))
        except Exception as exc:
            log.exception(
                "search batch failed",
                extra={"index": index_name, "partition": part.number, "offset": group[0].offset},
            )
            error = Internal(str(exc))
            await asyncio.gather(*(self._answer_error(p, index_name, error) for p in group))

    async def _answer_error(self, pending: _Pending, index_name: str, error: LhvError) -> None:
        """The error reply to one queued search; its request is done after the send."""
        try:
            with log_context(
                partition=pending.partition,
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
            if not pending.done.done():
                pending.done.set_result(None)

    def _get(self, part: Partition, query: GetQuery, received: float) -> bytes:
        index = part.indexes.get(query.index)
        if index is None:
            raise IndexNotFound(f"index {query.index!r} does not exist")
        items = index.get(
            query.ids,
            include_vectors=query.include_vectors,
            include_metadata=query.include_metadata,
        )
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
        stats["worker"] = self._w.config.worker_id
        stats["partition"] = part.number
        drift = self._w.drift_report(query.index)
        if drift is not None:
            stats["drift"] = drift
        return encode_stats_reply(query, stats, took_ms=(time.monotonic() - received) * 1000)

    # -- replies -------------------------------------------------------------------------

    async def _send(self, reply_to: ReplyTo, value: bytes) -> None:
        await self._w.replies.send(self._w.producer, reply_to, value)

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
            self._w.reply_policy.check(reply_to.topic)
        except LhvError as exc:
            log.warning("no error reply to %r: %s", reply_to.topic, exc.message)
            return
        took_ms = (time.monotonic() - received) * 1000
        self._w.metrics.observe_search(op, error.code, took_ms / 1000, queries, queries=queries)
        log.info("query answered with %s: %s", error.code, error.message)
        await self._send(reply_to, encode_error_reply(reply_to, index, error, took_ms=took_ms))


def _op(query: Query) -> str:
    if isinstance(query, SearchQuery):
        return "search"
    if isinstance(query, GetQuery):
        return "get"
    if isinstance(query, StatsQuery):
        return "stats"
    raise InvalidRequest("unknown query")


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
