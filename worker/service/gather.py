"""Gathering for foreign clients: a plain query keyed by a sharded index's name (or by an
alias) is answered by the name's home worker.

A requester that knows nothing of shards (kcat, a Spring `ReplyingKafkaTemplate`) sends
`search`/`get`/`stats` keyed NAME. At NAME's home partition the search server finds the
catalog entry (sharded, or an alias: then its target) and hands the query here:

1. One sub-query per member key `NAME#s` goes to the search topic (a `get` only to the
   members holding some of its ids), with this worker's own reply topic (under the reply
   pattern, created at start, deleted at stop) and correlation ids of its own. Each
   carries the original deadline, and its own `min_offset` from the query's `min_offsets`.
2. The members' replies are awaited until the deadline. A member answering
   `deadline_exceeded` or `not_ready`, or not at all, is *missing*; any other error of a
   member is the answer (the first by shard).
3. The answers are merged by `worker.wire.gather`, the code the Python client uses, and
   one reply goes to the original requester with its correlation id (the search server
   sends it). Missing members: `deadline_exceeded` naming them, or with `allow_partial`
   `status: ok, partial: true, missing_shards`.

Bounds: at most `QueryPolicy.max_gathers_per_partition` gathers wait per partition and
`max_gathers` in all; past either a query is answered `not_ready` at once. Each gather
waits at most until its deadline (capped by `max_wait_ms`). The members' replies, as
received, are counted against `max_gather_bytes` for all gathers together from the moment
each arrives until the gather's reply is made (the reply that passes the bound is in
memory already; an alias's relayed reply, one record, is not counted): a gather whose own
replies pass it, or would at the size of those in so far, is refused `invalid_request`
(ask for fewer hits, or without metadata or vectors); one that finds it passed with
others' replies is answered `not_ready`. A search's member replies are decoded and merged
one at a time (`SearchMerge`): the gather holds one parsed member reply beside the best
hits so far, never all of them parsed. A `get` whose members' items are over one reply
record is refused before any is decoded.
Large bodies are encoded, decoded and merged in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from lhv_index.errors import (
    DeadlineExceeded,
    IndexNotFound,
    Internal,
    InvalidRequest,
    LhvError,
    NotReady,
)
from worker.kafka.config import KafkaConfig
from worker.kafka.requests import ReplyChannel, ReplyRecord
from worker.service.config import QueryPolicy
from worker.service.partition import Partition
from worker.wire.gather import (
    MemberReply,
    SearchMerge,
    merge_get_reply,
    merge_stats_reply,
    missing_error,
    reply_error,
)
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC, correlation_text
from worker.wire.limits import reply_too_large
from worker.wire.queries import GetQuery, Query, SearchQuery
from worker.wire.shards import shard_key, split_by_shard
from worker.wire.topics import partitioner
from worker.wire.vectors import encode_vector_b64

__all__ = ["GatherTarget", "Gatherer", "KafkaRequests", "RequestPort", "TargetLookup"]

log = logging.getLogger(__name__)

#: bodies (or vectors) larger than this are encoded, decoded and merged in a thread
_THREAD_BYTES = 64 * 1024
#: merges of more hit rows than this run in a thread
_THREAD_ROWS = 4096
#: bytes of a member's reply that are not its items (status, op, index, offsets, ids of
#: the request), allowed for each member before a `get` is found too large
_ENVELOPE_BYTES = 512
#: member error codes that count the member as missing, not as the answer
_MISSING_CODES = frozenset({DeadlineExceeded.code, NotReady.code})


@dataclass(frozen=True, slots=True)
class GatherTarget:
    """Where a name's data is: a sharded index `index` of `shards` members, gathered
    here; or, with `alias`, the alias's target `index`, asked by its name (its own home
    answers it, gathering when it is sharded) and its reply relayed."""

    index: str
    shards: int = 1
    alias: str | None = None


TargetLookup = Callable[[Partition, str], GatherTarget | None]
"""A name's gather target from its home partition's catalog; None: not gathered (an
ordinary index, or nothing of that name)."""


class RequestPort(Protocol):
    """Sends sub-queries and hands back their replies' raw values."""

    @property
    def reply_topic(self) -> str: ...

    def expect(self, correlation_id: bytes) -> asyncio.Future[bytes]:
        """Register for the reply carrying `correlation_id` (before sending)."""
        ...

    def forget(self, correlation_id: bytes) -> None: ...

    async def send(
        self, topic: str, *, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        """Produce one sub-query; returns once the broker took it. Raises `KafkaError`."""
        ...


class _Held:
    """Bytes of member replies held by a worker's gathers (`max_gather_bytes`)."""

    __slots__ = ("bytes", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0


class _Arrivals:
    """The replies of one gather's members as they arrive: each counted in `held` at once,
    and `wait` ended when all are in or `held` passed its limit. `release` gives the
    gather's bytes back (a reply counted after it is not counted)."""

    def __init__(self, held: _Held, futures: Sequence[asyncio.Future[bytes]]) -> None:
        self._held = held
        self._asked = len(futures)
        self._left = len(futures)
        self._counted = 0
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._released = False
        self.bytes = 0
        """bytes of this gather's replies"""
        self.over = False
        """`held` passed its limit when one of them arrived"""
        for fut in futures:
            fut.add_done_callback(self._arrived)
        self._settle()

    def _arrived(self, fut: asyncio.Future[bytes]) -> None:
        self._left -= 1
        if not self._released and not fut.cancelled() and fut.exception() is None:
            size = len(fut.result())
            self._counted += 1
            self.bytes += size
            self._held.bytes += size
            self.over = self.over or self._held.bytes > self._held.limit
        self._settle()

    def _settle(self) -> None:
        if (self.over or self._left <= 0) and not self._done.done():
            self._done.set_result(None)

    @property
    def expected_bytes(self) -> int:
        """The bytes of every reply asked for, at the mean size of those in so far."""
        return self.bytes * self._asked // max(self._counted, 1)

    async def wait(self, timeout_s: float) -> None:
        """Until every reply is in, `held` passed its limit, or `timeout_s` passed."""
        await asyncio.wait([self._done], timeout=max(timeout_s, 0))

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._held.bytes -= self.bytes


@dataclass(slots=True)
class _Member:
    shard: int
    key: str
    body: dict[str, Any]
    cid: bytes = b""
    reply: asyncio.Future[bytes] | None = None


class Gatherer:
    """Answers plain queries of sharded names and aliases at their home (module
    docstring).

    Arguments:
        topics_search: the search topic sub-queries go to.
        requests: where they go and how their replies come back.
        targets: the gather target of a name at its home partition.
        policy: `max_gathers`, `max_gathers_per_partition`, `max_wait_ms`,
            `max_gather_bytes`.
        query_wait_ms: the wait of a query without a deadline.
        max_reply_bytes: the largest reply record; a `get` whose members' items alone
            are over it is refused before any of them is decoded (its reply would be).
    """

    def __init__(
        self,
        *,
        search_topic: str,
        requests: RequestPort,
        targets: TargetLookup,
        policy: QueryPolicy,
        query_wait_ms: int,
        max_reply_bytes: int | None = None,
    ) -> None:
        self._search_topic = search_topic
        self._requests = requests
        self._targets = targets
        self._policy = policy
        self._query_wait_ms = query_wait_ms
        self._max_reply_bytes = max_reply_bytes
        self._waiting: dict[int, int] = {}
        self.waiting = 0
        """gathers waiting for members right now"""
        self._held = _Held(policy.max_gather_bytes)

    @property
    def held_bytes(self) -> int:
        """Bytes of member replies the gathers hold right now."""
        return self._held.bytes

    def target(self, part: Partition, name: str) -> GatherTarget | None:
        """The gather target of `name` on its home `part`; None: answered as usual."""
        return self._targets(part, name)

    async def answer(
        self,
        query: Query,
        target: GatherTarget,
        partition: int,
        received: float,
        *,
        home: Partition | None = None,
    ) -> bytes:
        """The one reply value to `query` (the members' answers merged).

        A query relayed by an alias whose target answers `index_not_found` is relayed once
        more when the alias, on its `home` partition, names another target by then (the
        alias was switched and its old target dropped while the query was on its way).

        Raises:
            NotReady: too many gathers waiting (retriable).
            ShardsMissing: members did not answer by the deadline (without allow_partial).
            LhvError: a member's error (the first by shard), e.g. `dim_mismatch`.
        """
        if target.alias is not None and query.via_alias is not None:
            raise InvalidRequest(
                f"alias chain: {query.via_alias!r} points at {target.alias!r}, itself an alias "
                f"(of {target.index!r}); aliases point at indexes"
            )
        policy = self._policy
        here = self._waiting.get(partition, 0)
        if here >= policy.max_gathers_per_partition or self.waiting >= policy.max_gathers:
            raise NotReady(
                f"too many queries gathering from shards ({here} on partition {partition}, "
                f"{self.waiting} in all; limits {policy.max_gathers_per_partition} and "
                f"{policy.max_gathers}): retry later"
            )
        self._waiting[partition] = here + 1
        self.waiting += 1
        try:
            try:
                return await self._answer(query, target, received)
            except IndexNotFound:
                again = None if home is None else self._targets(home, query.index)
                if target.alias is None or again is None or again == target:
                    raise
                log.info(
                    "alias %s moved from %s to %s while a query was relayed: relayed again",
                    target.alias,
                    target.index,
                    again.index,
                )
                return await self._answer(query, again, received)
        finally:
            self.waiting -= 1
            left = self._waiting[partition] - 1
            if left:
                self._waiting[partition] = left
            else:
                del self._waiting[partition]

    async def _answer(self, query: Query, target: GatherTarget, received: float) -> bytes:
        now = time.time()
        wait_s = (
            self._query_wait_ms / 1000
            if query.deadline_ms is None
            else (query.deadline_ms / 1000 - now)
        )
        wait_s = min(wait_s, self._policy.max_wait_ms / 1000)
        if wait_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was gathered")
        deadline_ms = int((now + wait_s) * 1000)
        if target.alias is not None:
            return await self._relay(query, target, deadline_ms, received)
        big = isinstance(query, SearchQuery) and query.vectors.nbytes > _THREAD_BYTES
        members, values = await _run(big, _prepare, query, target, deadline_ms)
        arrivals: _Arrivals | None = None
        try:  # the replies' bytes stay counted until the reply is made of them
            await self._send_all(members, values)
            arrivals = _Arrivals(self._held, [m.reply for m in members if m.reply is not None])
            await arrivals.wait(deadline_ms / 1000 - time.time())
            if arrivals.over:
                raise self._over(target, arrivals)
            if isinstance(query, GetQuery):
                self._check_items(arrivals.bytes - _ENVELOPE_BYTES * len(members))
            merge = (
                SearchMerge(
                    k=query.k, queries=len(query.vectors), include_vectors=query.include_vectors
                )
                if isinstance(query, SearchQuery)
                else None
            )
            answers, missing = await self._collect(members, merge)
            if missing and not query.allow_partial:
                raise missing_error(target.index, missing, target.shards)
            rows = query.k * len(query.vectors) if isinstance(query, SearchQuery) else len(answers)
            value: bytes = await _run(
                rows > _THREAD_ROWS, _merged, query, target, answers, merge, missing, received
            )
            return value
        finally:
            for m in members:
                self._requests.forget(m.cid)
                m.reply = None
            if arrivals is not None:
                arrivals.release()

    def _check_items(self, size: int) -> None:
        """Refuse a `get` whose members' items, `size` bytes, are over one reply record:
        its merged reply holds them all."""
        limit = self._max_reply_bytes
        if limit is not None and size > limit:
            raise reply_too_large(
                "the items are",
                size,
                limit,
                ask="fewer ids, or without include_metadata or include_vectors",
            )

    def _over(self, target: GatherTarget, arrivals: _Arrivals) -> LhvError:
        """The error of a gather that found `max_gather_bytes` passed when one of its
        replies arrived: `invalid_request` when its own replies are, or at the size of
        those in so far would be, over it; else `not_ready` (others' replies held too)."""
        limit = self._held.limit
        if arrivals.expected_bytes > limit:  # never below the bytes in so far
            return InvalidRequest(
                f"the replies of the {target.shards} shards of index {target.index!r} "
                f"together come to over {limit} bytes (LHV_MAX_GATHER_BYTES): ask for fewer "
                "hits, or without metadata or vectors"
            )
        return NotReady(
            f"replies of shards held by this worker's gathers are over {limit} bytes "
            "(LHV_MAX_GATHER_BYTES): retry later"
        )

    async def _relay(
        self, query: Query, target: GatherTarget, deadline_ms: int, received: float
    ) -> bytes:
        """`query` asked of an alias's target by its name; its reply, as the reply to
        `query` (an error reply raises its error)."""
        big = isinstance(query, SearchQuery) and query.vectors.nbytes > _THREAD_BYTES
        members, values = await _run(big, _prepare, query, target, deadline_ms)
        try:
            await self._send_all(members, values)
            fut = members[0].reply
            if fut is not None:
                await asyncio.wait([fut], timeout=max(deadline_ms / 1000 - time.time(), 0))
            if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
                raise DeadlineExceeded(
                    f"{target.index!r}, the target of alias {target.alias!r}, did not answer "
                    "by the deadline"
                )
            raw = fut.result()
        finally:
            self._requests.forget(members[0].cid)
        value: bytes = await _run(len(raw) > _THREAD_BYTES, _relayed, query, raw, received)
        return value

    async def _send_all(self, members: list[_Member], values: list[bytes]) -> None:
        topic = self._requests.reply_topic.encode()
        sends = []
        for m, value in zip(members, values, strict=True):
            m.cid = f"gather-{uuid.uuid4().hex}".encode()
            m.reply = self._requests.expect(m.cid)
            headers = [(REPLY_TOPIC, topic), (CORRELATION_ID, m.cid)]
            sends.append(
                self._requests.send(
                    self._search_topic, key=m.key.encode(), value=value, headers=headers
                )
            )
        results = await asyncio.gather(*sends, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures and len(failures) == len(results):
            raise NotReady(f"sub-queries could not be sent: {failures[0]!r}")
        for m, result in zip(members, results, strict=True):
            if isinstance(result, BaseException):  # not sent: that member is missing
                log.warning("sub-query to %s not sent: %r", m.key, result)
                self._requests.forget(m.cid)
                m.reply = None

    async def _collect(
        self, members: list[_Member], merge: SearchMerge | None
    ) -> tuple[list[MemberReply], list[int]]:
        """The members' `status: ok` replies (those of a search folded into `merge`
        instead, each as it is decoded) and the members missing. Raises the first
        member's error by shard."""
        answers: list[MemberReply] = []
        missing: list[int] = []
        failure: LhvError | None = None
        for m in members:
            fut, m.reply = m.reply, None  # the raw reply is let go once decoded
            if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
                missing.append(m.shard)
                continue
            raw = fut.result()
            del fut
            try:
                body = await _run(len(raw) > _THREAD_BYTES, _decoded, m.shard, raw, merge)
            except orjson.JSONDecodeError:
                failure = failure or Internal(f"undecodable reply from {m.key}")
                continue
            del raw
            if not isinstance(body, dict):
                failure = failure or Internal(f"a reply from {m.key} is not an object")
                continue
            error = reply_error(body)
            if error is None:
                if merge is None:
                    answers.append((m.shard, body))
            elif error.code in _MISSING_CODES:
                missing.append(m.shard)
            else:
                failure = failure or error
        if failure is not None:
            raise failure
        return answers, missing


def _decoded(shard: int, raw: bytes, merge: SearchMerge | None) -> Any:
    """Member `shard`'s reply decoded; an ok reply of a search folded into `merge`, and
    only its status fields kept (its hits are in the merge)."""
    body = orjson.loads(raw)
    if merge is None or not isinstance(body, dict) or reply_error(body) is not None:
        return body
    merge.add(shard, body)
    return {"status": body.get("status")}


async def _run(in_thread: bool, fn: Callable[..., Any], *args: Any) -> Any:
    if in_thread:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _members(query: Query, target: GatherTarget, deadline_ms: int) -> list[_Member]:
    """The sub-queries of `query`: one per member that has anything to answer."""
    base: dict[str, Any] = {"op": query.op, "deadline_ms": deadline_ms}
    shards: dict[int, dict[str, Any]] = {}
    if isinstance(query, SearchQuery):
        base.update(k=query.k, include_metadata=query.include_metadata)
        if query.include_vectors:
            base["include_vectors"] = True
        if query.ef is not None:
            base["ef"] = query.ef
        if query.filter:
            base["filter"] = query.filter
        if query.multi:
            base["vectors_b64"] = [encode_vector_b64(row) for row in query.vectors]
        else:
            base["vector_b64"] = encode_vector_b64(query.vectors[0])
        shards = {s: {} for s in range(target.shards)}
    elif isinstance(query, GetQuery):
        base.update(
            include_vectors=query.include_vectors,
            include_metadata=query.include_metadata,
            vector_encoding=query.vector_encoding,
        )
        for s, positions in sorted(split_by_shard(query.ids, target.shards).items()):
            shards[s] = {"ids": [query.ids[p] for p in positions]}
    else:
        shards = {s: {} for s in range(target.shards)}
    offsets = query.min_offsets or {}
    if target.alias is not None:  # one query by the target's name, relayed
        body = {**base, "index": target.index, "via_alias": target.alias}
        if isinstance(query, GetQuery):
            body["ids"] = query.ids
        if offsets:
            body["min_offsets"] = dict(offsets)
        if target.index in offsets:
            body["min_offset"] = offsets[target.index]
        if query.allow_partial:
            body["allow_partial"] = True
        return [_Member(0, target.index, body)]
    out = []
    for s, extra in shards.items():
        key = shard_key(target.index, s, target.shards)
        body = {**base, "index": key, **extra}
        if key in offsets:
            body["min_offset"] = offsets[key]
        out.append(_Member(s, key, body))
    return out


def _prepare(
    query: Query, target: GatherTarget, deadline_ms: int
) -> tuple[list[_Member], list[bytes]]:
    """The sub-queries of `query` and their encoded values."""
    members = _members(query, target, deadline_ms)
    return members, [orjson.dumps(m.body) for m in members]


def _merged(
    query: Query,
    target: GatherTarget,
    answers: list[MemberReply],
    merge: SearchMerge | None,
    missing: list[int],
    received: float,
) -> bytes:
    """The one reply value: a search's `merge`, or the members' `answers` merged."""
    if isinstance(query, SearchQuery) and merge is not None:
        body = merge.reply(
            target.index,
            target.shards,
            multi=query.multi,
            include_metadata=query.include_metadata,
            missing=missing,
            vector_encoding=query.vector_encoding,
        )
    elif isinstance(query, GetQuery):
        body = merge_get_reply(target.index, target.shards, query.ids, answers, missing=missing)
    else:
        body = merge_stats_reply(target.index, target.shards, answers, missing=missing)
    body["index"] = query.index
    body["took_ms"] = round((time.monotonic() - received) * 1000, 3)
    if query.request_id is not None:
        body["request_id"] = query.request_id
    out = {"correlation_id": correlation_text(query.reply_to.correlation_id), **body}
    return orjson.dumps(out)


def _relayed(query: Query, raw: bytes, received: float) -> bytes:
    """The target's reply `raw` as the reply to `query`: its correlation id, its index
    (the alias), its request id and took_ms; an error reply raises its error."""
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        raise Internal("a relayed reply is not an object")
    error = reply_error(body)
    if error is not None:
        raise error
    body["correlation_id"] = correlation_text(query.reply_to.correlation_id)
    body["index"] = query.index
    body["took_ms"] = round((time.monotonic() - received) * 1000, 3)
    body.pop("request_id", None)
    if query.request_id is not None:
        body["request_id"] = query.request_id
    return orjson.dumps(body)


def _reply_value(rec: ReplyRecord) -> bytes:
    """A member's reply, raw (decoded by the gather, in a thread when it is large)."""
    if rec.value is None:
        raise Internal("an empty reply")
    return rec.value


class KafkaRequests:
    """`RequestPort` over a `ReplyChannel`: its own reply topic (`<reply
    prefix>gather-<id>`, created on start if missing, deleted on stop unless `keep_topic`:
    a topic named from a stable identity is kept for the next run), a producer of
    sub-queries and a group-less reader of the replies (from the topic's end: replies of
    an earlier run are never read)."""

    def __init__(self, kafka: KafkaConfig, *, reply_topic: str, keep_topic: bool = False) -> None:
        self._channel: ReplyChannel[bytes] = ReplyChannel(
            kafka,
            reply_topic,
            decode=_reply_value,
            producer_options={
                "acks": "all",
                "partitioner": partitioner,  # sub-queries to members NAME#s
                "linger_ms": 0,
                "max_request_size": 16 * 1024 * 1024,
            },
            keep_topic=keep_topic,
            name="gather-replies",
        )

    @property
    def reply_topic(self) -> str:
        return self._channel.reply_topic

    async def start(self) -> None:
        await self._channel.start()

    async def stop(self) -> None:
        """Close; gathers still waiting see their members as missing. Idempotent."""
        await self._channel.stop()

    def expect(self, correlation_id: bytes) -> asyncio.Future[bytes]:
        return self._channel.expect(correlation_id)

    def forget(self, correlation_id: bytes) -> None:
        self._channel.forget(correlation_id)

    async def send(
        self, topic: str, *, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        delivery = await self._channel.send(topic, key=key, value=value, headers=headers)
        await delivery
