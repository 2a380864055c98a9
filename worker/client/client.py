"""`LhvClient`: produce commands and ask queries over Kafka, in one line each.

    async with LhvClient("127.0.0.1:9092") as c:
        await c.create("docs", dim=128, space="cosine")      # acknowledged by the worker
        w = await c.add("docs", ids, vectors)                # returns where the writes landed
        hits = await c.search("docs", q, k=10, after=w)      # read-your-writes, no sleeps
        rows = await c.search_many("docs", queries, k=10)    # one multi-vector request
        items = await c.get("docs", ["a", "b"])
        stats = await c.stats("docs")

Writes
    `create`, `drop`, `add`, `delete`, `merge` produce to the commands topic, keyed by the
    index name (so Kafka's default partitioner puts every record of one index on its home
    partition), and return a `WriteResult`: the partition and the offset of the last record
    written. `add` splits its items into records of `batch_size`. With `ack=True` (the
    default for index-level commands, off for `add`/`delete`) the call also waits for the
    worker's acknowledgement and raises if the worker rejected the command.

Read-your-writes
    Passing a `WriteResult` as `after=` (or an offset as `min_offset=`) makes the worker
    answer only once it has applied that offset, so a search right after a write sees it
    without sleeps or polling. Offsets are per partition; `after=` is meant for a write to
    the same index as the query.

Sharded indexes and aliases
    An index created with `create(..., shards=S)` is S member indexes `NAME#s` on their
    own partitions. The client finds out what a name is with the `describe` query (cached
    for `name_ttl_s`; an alias is followed to its target) and then talks to the members
    directly: `add`/`delete` split items by `shard_of(id, S)` (order kept within each
    member) and produce to each member key; the `WriteResult` names every member touched
    in `offsets`. `search`/`search_many` send the query to every member, wait for all,
    and merge the top k by (distance, id); `get` asks each member for its own ids;
    `stats` sums `count`/`deleted` and lists each member under `shards`. `after=` gives
    each member its own `min_offset`. A member that does not answer in time raises
    `ShardsMissing` (a `DeadlineExceeded` naming the shards), or with `allow_partial=True`
    the answer is flagged `partial` with `missing_shards`: never silently short. A call
    that meets `index_not_found` resolves the name again and, when it changed (an alias
    switched, an index re-created), is retried once. `resolve_names=False` skips all
    this: every name is sent as it is (the worker forwards and gathers for sharded names).

Coalesced searches
    `search` calls made in one event-loop turn (concurrent tasks, or `search_many`) that
    agree on the index, k, ef, filter, flags, read-your-writes offset and vector length are
    sent as one multi-vector request (at most `max_search_batch` vectors) and the reply's
    `results` are handed back call by call; each call keeps its own timeout, and a call
    that gives up does not disturb the others. Under load this shares the per-message
    cost (Kafka produce and fetch, the worker's loop) among many queries; a lone search
    goes out as a plain one-vector request. `coalesce_searches=False` turns it off.

Read replicas and hedging
    With `replicas=True` queries go round-robin, query by query, to the owners' search
    topic and to the read replicas' (`TopicsConfig.replica_search`, or `replica_topics`
    when several replica groups each have their own topic). A query with no
    answer after `hedge_after_ms` is sent once more, to the other copy, under a new
    correlation id that belongs to the same call: the first answer wins and the later
    one is dropped, so the caller gets exactly one answer (a copy that is slow, busy or
    dead costs `hedge_after_ms`, not the whole timeout). Every query (search, coalesced
    searches, get, stats) goes through `query`, which does this; a query with
    `min_offset` is answered by either copy only once it applied that offset, so
    read-your-writes holds whichever answers.

Request/reply
    Queries and acknowledged commands carry Spring `ReplyingKafkaTemplate` headers
    (`kafka_replyTopic`, `kafka_correlationId`). The client reads its own reply topic (by
    default `lhv.replies.<random>`, created on `start()` and deleted on `stop()` when the
    client made it) and hands each reply to the call waiting for its correlation id.

Timeouts and errors
    Every call waits at most `timeout_s` (the client default, or the call's own), the
    lookup of a sharded name or alias included (it gets at most half of that time, see
    `resolve_timeout_s`). Queries also carry `deadline_ms`, the call's own deadline
    (`now + timeout_s` at the call's start), so the worker drops a request nobody waits
    for and answers `not_ready` / `deadline_exceeded` in time for the caller to see it; the
    client itself gives up `reply_grace_s` later with the builtin `TimeoutError`. A call
    that times out or is cancelled leaves nothing behind (`pending` counts the calls
    waiting for a reply). A command that reached Kafka but whose ack did not come in time
    raises `NotAcknowledged` (a `TimeoutError` naming the record's partition and offset):
    the worker still applies it when it gets there. A reply with `status: "error"` raises the `LhvError` subclass
    its code names (`lhv_index.errors`), the same class the worker raised, with `.item`
    set when one item of a command was to blame.

Lifecycle
    `start()` once, `stop()` is idempotent; `async with` does both. Calls after `stop()`
    raise `ClientClosed`, and so do calls still waiting when `stop()` runs. If the reply
    reader fails, waiting calls get its error and later calls raise it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, TypeVar

import numpy as np
import orjson

from lhv_index import Hit
from lhv_index.errors import (
    DeadlineExceeded,
    IndexNotFound,
    Internal,
    InvalidRequest,
    NotReady,
    error_for_code,
)
from worker.kafka.admin import TopicCreationFailed
from worker.kafka.config import KafkaConfig
from worker.kafka.errors import map_kafka_errors
from worker.kafka.requests import ReplyChannel, ReplyRecord
from worker.kafka.shutdown import stop_consumer as stop_consumer
from worker.wire.gather import (
    ShardsMissing,
    merge_get_items,
    merge_hits,
    merge_stats_reply,
    missing_error,
)
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC
from worker.wire.limits import too_many_together
from worker.wire.shards import parse_shard_name, shard_key, shard_names, split_by_shard
from worker.wire.topics import TopicsConfig, partitioner

__all__ = [
    "ClientClosed",
    "Hit",
    "Hits",
    "Items",
    "LhvClient",
    "NotAcknowledged",
    "ShardsMissing",
    "WriteResult",
    "encode_vector",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
#: a query unanswered this long goes to the other copy too (`hedge_after_ms`)
DEFAULT_HEDGE_AFTER_MS = 200
#: correlation ids of hedged-out requests remembered to count their late answers
_MAX_LOSERS = 10_000
#: JSON of records and of a coalesced search's kind: numpy numbers are numbers
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_KIND_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY
#: the least a step of a call waits when the call's time is up (it then gives up at once)
_MIN_WAIT_S = 0.001


class ClientClosed(RuntimeError):
    """The client was stopped (or never started) while a call needed it."""


class NotAcknowledged(TimeoutError):
    """A command reached Kafka but its acknowledgement did not arrive in time.

    The record is in the log at `partition`/`offset`: a worker applies it when it gets
    there (none is running, or it is busy or restoring), whatever the caller does now.
    """

    def __init__(self, partition: int, offset: int) -> None:
        super().__init__(
            f"written at partition {partition} offset {offset}, not acknowledged in time: "
            "it will still be applied"
        )
        self.partition = partition
        self.offset = offset


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Where a write landed: pass it as `after=` to read your own writes."""

    partition: int
    offset: int
    """the offset of the last record written"""
    records: int = 1
    """how many records the write produced"""
    ack: Mapping[str, Any] | None = None
    """the worker's acknowledgement of the last record, when it was asked for"""
    offsets: Mapping[str, int] = field(default_factory=dict)
    """a write to a sharded index: member key (`NAME#s`) -> offset of its last record,
    for every member the write touched (empty for an ordinary index: `offset` says it)"""

    def min_offset_for(self, key: str) -> int | None:
        """The offset a query keyed `key` must wait for to see this write; None: none."""
        if self.offsets:
            return self.offsets.get(key)
        forwarded = self.ack.get("forwarded") if self.ack is not None else None
        if isinstance(forwarded, Mapping):  # written by name, split by the index's home
            offset = forwarded.get(key)
            return offset if isinstance(offset, int) else None
        return None if parse_shard_name(key) is not None else self.offset


class Hits(list[Hit]):
    """The hits of one search, nearest first. `partial` is true (and `missing_shards`
    names them) only when members of a sharded index did not answer and the call allowed
    it (`allow_partial=True`)."""

    def __init__(self, hits: Iterable[Hit] = (), missing_shards: Iterable[int] = ()) -> None:
        super().__init__(hits)
        self.missing_shards: tuple[int, ...] = tuple(sorted(missing_shards))
        self.partial = bool(self.missing_shards)


class Items(list[dict[str, Any]]):
    """The items of one `get`, in the order asked; `partial` / `missing_shards` as `Hits`."""

    def __init__(
        self, items: Iterable[dict[str, Any]] = (), missing_shards: Iterable[int] = ()
    ) -> None:
        super().__init__(items)
        self.missing_shards: tuple[int, ...] = tuple(sorted(missing_shards))
        self.partial = bool(self.missing_shards)


@dataclass(frozen=True, slots=True)
class _Name:
    """What a name resolved to: the index holding the data and its shard count."""

    index: str
    """the name itself, or an alias's target"""
    shards: int = 1
    expires: float = 0.0
    """loop time after which it is asked again"""

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    def same(self, other: _Name) -> bool:
        return (self.index, self.shards) == (other.index, other.shards)


#: a member of a sharded index that did not answer: counted missing, not an error
_MISSING = (TimeoutError, DeadlineExceeded, NotReady)


def encode_vector(vector: Any) -> str:
    """base64 of little-endian float32, the compact wire form of a vector."""
    arr = np.ascontiguousarray(np.asarray(vector, dtype="<f4").reshape(-1))
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Retrieve a delivery future's error when it comes (a hedged request's delivery is
    not awaited: its answer, or the other copy's, is what the call waits for)."""

    def retrieve(f: asyncio.Future[Any]) -> None:
        if not f.cancelled():
            f.exception()

    fut.add_done_callback(retrieve)


def _fail_all(futures: Iterable[asyncio.Future[Any]], exc: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


def _read_after(
    body: dict[str, Any], after: WriteResult | None, min_offset: int | None, key: str | None = None
) -> None:
    """Set the query's `min_offset`: the later of `min_offset` and the write `after` (for a
    sharded write, its offset on member `key`)."""
    if after is not None:
        wrote = after.min_offset_for(key) if key is not None else after.offset
        if wrote is not None:
            min_offset = max(min_offset if min_offset is not None else -1, wrote)
    if min_offset is not None:
        body["min_offset"] = min_offset


def _shards(described: Mapping[str, Any]) -> int:
    shards = described.get("shards", 1)
    return shards if isinstance(shards, int) and shards >= 1 else 1


def _raise_for_error(reply: Mapping[str, Any]) -> None:
    if reply.get("status") != "error":
        return
    err = reply.get("error") or {}
    exc = error_for_code(str(err.get("code", "internal")), str(err.get("message", "")))
    item = err.get("item")
    if isinstance(item, int):
        exc.item = item
    raise exc


def _chunks(
    ids: Sequence[str],
    vecs: np.ndarray,
    metadata: Sequence[Mapping[str, Any] | None] | None,
    version: int | None,
    max_items: int,
    max_bytes: int,
) -> Iterator[list[dict[str, Any]]]:
    """The `items` of successive add records, bounded by count and by encoded size."""
    items: list[dict[str, Any]] = []
    size = 0
    for i, id_ in enumerate(ids):
        item: dict[str, Any] = {"id": id_, "vector_b64": encode_vector(vecs[i])}
        if metadata is not None and metadata[i] is not None:
            item["metadata"] = metadata[i]
        if version is not None:
            item["version"] = version
        item_bytes = len(orjson.dumps(item, option=_JSON_OPTIONS)) + 1
        if items and (len(items) >= max_items or size + item_bytes > max_bytes):
            yield items
            items, size = [], 0
        items.append(item)
        size += item_bytes
    if items:
        yield items


@dataclass(slots=True, eq=False)
class _Sent:
    """One produced record: its delivery future and, when a reply is expected, where it
    will be handed over."""

    delivery: asyncio.Future[Any]
    cid: bytes | None = None
    reply: asyncio.Future[dict[str, Any]] | None = None
    command: bool = False
    """a command (applied when a worker reads it), not a query"""


@dataclass(slots=True, eq=False)
class _SearchBatch:
    """Searches with the same index, k, ef, filter, flags, `min_offset` and vector length,
    called in one event-loop turn: sent as one multi-vector request, the reply split among
    the callers."""

    index: str
    body: dict[str, Any]
    vectors: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[list[Hit]]] = field(default_factory=list)
    wait_s: float = 0.0
    """the longest wait of its callers: the request's deadline"""
    deadlines: list[float] = field(default_factory=list)
    """per waiter, in the loop's clock: when its call gives up"""
    open_waiters: int = 0
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None

    def waiter_done(self, _fut: asyncio.Future[list[Hit]]) -> None:
        """Every caller has its answer or gave up: nothing more to wait for."""
        self.open_waiters -= 1
        if self.open_waiters == 0:
            if self.task is not None and not self.task.done():
                self.task.cancel()
            if self.timer is not None:
                self.timer.cancel()

    def expire(self) -> None:
        """Time out the callers whose deadline passed (one timer per batch, not per call);
        wake again for the next deadline."""
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        later: float | None = None
        for fut, deadline in zip(self.waiters, self.deadlines, strict=True):
            if fut.done():
                continue
            if deadline <= now:
                fut.set_exception(TimeoutError("no search reply within the call's timeout"))
            elif later is None or deadline < later:
                later = deadline
        if later is not None:
            self.timer = loop.call_at(later, self.expire)


def _hits(rows: Sequence[Mapping[str, Any]]) -> list[Hit]:
    return [Hit(h["id"], float(h["distance"]), h.get("metadata")) for h in rows]


_make_hit = Hit._make


def _column_hits(result: Mapping[str, Any]) -> list[Hit]:
    """The hits of one entry of a multi-vector reply's `results` (columns)."""
    metadata = result.get("metadata") or repeat(None)
    return list(map(_make_hit, zip(result["ids"], result["distances"], metadata, strict=False)))


def _decode_reply(rec: ReplyRecord) -> dict[str, Any]:
    """A reply's JSON object (run by the reply reader for a call waiting for it)."""
    try:
        body = orjson.loads(rec.value)  # type: ignore[arg-type]  # None: undecodable
    except orjson.JSONDecodeError as exc:
        raise Internal(f"undecodable reply: {exc}") from exc
    if not isinstance(body, dict):
        raise Internal("a reply must be a JSON object")
    return body


class LhvClient:
    """An async client for LHV's command and search topics. See the module docstring.

    Arguments:
        bootstrap_servers: Kafka to talk to (ignored when `kafka` is given).
        kafka: full connection settings (SASL/SSL).
        topics: topic names and the reply-topic pattern (must match the workers').
        reply_topic: where replies come; default `<pattern prefix><random>`, created on
            start and deleted on stop. It must match `topics.reply_pattern`, as workers
            reply nowhere else (`ValueError` otherwise).
        timeout_s: default wait for a reply, in seconds.
        reply_grace_s: how much longer than a query's deadline the client waits, so the
            worker's `not_ready` / `deadline_exceeded` reply arrives before the local timeout.
        coalesce_searches: send the `search` calls made in one event-loop turn with the
            same index, k, ef, filter, flags and read-your-writes offset as one
            multi-vector request (at most `max_search_batch` vectors); each call still
            gets its own hits and its own timeout. Off: one request per call.
        max_search_batch: the most vectors in one coalesced request.
        max_search_hits: the most hits (k times vectors) in one coalesced request: the
            workers' `max_hits` (`LHV_MAX_HITS`, default 100000). A coalesced request
            refused for its size as a whole (hits, vectors, a reply too large to send) is
            split in halves and sent again, so each call gets the answer it would alone.
        resolve_names: find out with `describe` whether a name is sharded or an alias, and
            talk to the members (module docstring). Off: every name is sent as given.
        name_ttl_s: how long what a name resolved to is kept before it is asked again.
        resolve_timeout_s: the longest a call waits for `describe` (and never more than
            half the call's own timeout, which covers both); past it (no worker
            answers, the home is restoring) the name is sent as given, which is always
            right (the index's home forwards writes and gathers queries), only slower.
        replicas: spread queries over the owners and the read replicas, and hedge (see
            "Read replicas and hedging" in the module docstring).
        replica_topics: the replicas' search topics, one per copy that should take its
            own share of the queries (default: `topics.replica_search` alone).
        hedge_after_ms: with `replicas`, a query unanswered this long is sent to the
            other copy too; None: no hedging (round-robin only).
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        kafka: KafkaConfig | None = None,
        topics: TopicsConfig | None = None,
        reply_topic: str | None = None,
        timeout_s: float = 30.0,
        reply_grace_s: float = 2.0,
        coalesce_searches: bool = True,
        max_search_batch: int = 256,
        max_search_hits: int = 100_000,
        resolve_names: bool = True,
        name_ttl_s: float = 30.0,
        resolve_timeout_s: float = 5.0,
        replicas: bool = False,
        hedge_after_ms: int | None = DEFAULT_HEDGE_AFTER_MS,
        replica_topics: Sequence[str] | None = None,
    ) -> None:
        if timeout_s <= 0 or reply_grace_s < 0:
            raise ValueError("timeout_s must be > 0 and reply_grace_s >= 0")
        if hedge_after_ms is not None and hedge_after_ms < 1:
            raise ValueError("hedge_after_ms must be at least 1 (None: no hedging)")
        if max_search_batch < 1 or max_search_hits < 1:
            raise ValueError("max_search_batch and max_search_hits must be at least 1")
        self._kafka = kafka or KafkaConfig(bootstrap_servers=bootstrap_servers or "127.0.0.1:9092")
        self._topics = topics or TopicsConfig()
        prefix = self._topics.reply_pattern.split("*", 1)[0]
        self.reply_topic = reply_topic or f"{prefix}{uuid.uuid4().hex[:12]}"
        if not self._topics.reply_policy().allows(
            self.reply_topic
        ):  # workers would never answer there
            raise ValueError(
                f"reply topic {self.reply_topic!r} is not allowed: workers reply only to "
                f"topics matching {self._topics.reply_pattern!r} (TopicsConfig.reply_pattern)"
            )
        self.timeout_s = timeout_s
        self.reply_grace_s = reply_grace_s
        self._replies: ReplyChannel[dict[str, Any]] = ReplyChannel(
            self._kafka,
            self.reply_topic,
            decode=_decode_reply,
            producer_options={
                "acks": "all",
                "enable_idempotence": True,
                # a member NAME#s goes to its partition, not murmur2's
                "partitioner": partitioner,
                "linger_ms": 0,  # a linger adds ~2.5 ms to every query's round trip
                "max_request_size": 16 * 1024 * 1024,
            },
            on_reply=self._count_late,
            name="lhv-client-replies",
        )
        self.coalesce_searches = coalesce_searches
        self.max_search_batch = max_search_batch
        self.max_search_hits = max_search_hits
        self._batches: dict[tuple[Any, ...], _SearchBatch] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._batch_cids: set[bytes] = set()
        self._open_searches = 0
        self.resolve_names = resolve_names
        self.name_ttl_s = name_ttl_s
        self.resolve_timeout_s = resolve_timeout_s
        self._names: dict[str, _Name] = {}
        self.replicas = replicas
        self.hedge_after_ms = hedge_after_ms
        self._copies_topics = (
            self._topics.search,
            *(replica_topics or (self._topics.replica_search,)),
        )
        self._turn = 0
        self.hedged = 0
        """queries sent to the other copy after `hedge_after_ms`"""
        self.late_answers = 0
        """answers dropped because the other copy answered first (counted on arrival)"""
        self._losers: set[bytes] = set()
        self._state = "unopened"

    def __repr__(self) -> str:
        return (
            f"LhvClient({self._kafka.bootstrap_servers!r}, reply_topic={self.reply_topic!r}, "
            f"{self._state})"
        )

    @property
    def pending(self) -> int:
        """Calls waiting for a reply right now (each coalesced search counts)."""
        own = sum(1 for cid in self._waiting if cid not in self._batch_cids)
        return own + self._open_searches

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> LhvClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Create the reply topic if needed, connect, and start reading replies.

        Not reentrant; a client that failed to start is stopped and cannot be reused.
        """
        if self._state != "unopened":
            raise RuntimeError(f"client cannot start: it is {self._state}")
        self._state = "starting"
        try:
            with map_kafka_errors(self._kafka):
                try:
                    await self._replies.start()
                except TopicCreationFailed as exc:
                    raise Internal(f"cannot create the reply topic: {exc}") from exc
        except BaseException:
            await self.stop()
            raise
        self._state = "opened"

    async def stop(self) -> None:
        """Close. Calls still waiting raise `ClientClosed`. Idempotent."""
        if self._state not in ("starting", "opened"):
            self._state = "closed"
            return
        self._state = "closed"
        closed = ClientClosed("the client was stopped while waiting for a reply")
        await self._replies.stop_reading(closed)
        batches, self._batches = list(self._batches.values()), {}
        for batch in batches:
            _fail_all(batch.waiters, closed)
        if self._batch_tasks:
            await asyncio.gather(*self._batch_tasks, return_exceptions=True)
        await self._replies.stop(closed)

    @property
    def _waiting(self) -> dict[bytes, asyncio.Future[dict[str, Any]]]:
        """correlation id -> the call waiting for that reply"""
        return self._replies.waiting

    def _deliver(self, rec: ReplyRecord) -> None:
        """Hand one reply to the call waiting for it (what the reply reader does)."""
        self._replies.deliver(rec)

    def _count_late(self, cid: bytes) -> None:
        """A reply arrived: if its request was hedged out, count it as a late answer."""
        if cid in self._losers:
            self._losers.discard(cid)
            self.late_answers += 1

    # -- plumbing ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "opened":
            raise ClientClosed(f"client is {self._state}")
        self._replies.check()

    async def _send(
        self, topic: str, index: str, body: dict[str, Any], *, reply: bool, batch: bool = False
    ) -> _Sent:
        """Queue one record; with `reply`, register for its reply first.

        On failure nothing stays registered.
        """
        self._check_open()
        headers: list[tuple[str, bytes]] = []
        cid: bytes | None = None
        fut: asyncio.Future[dict[str, Any]] | None = None
        if reply:
            cid = uuid.uuid4().hex.encode()
            fut = self._replies.expect(cid)
            if batch:
                self._batch_cids.add(cid)
            headers = [
                (REPLY_TOPIC, self.reply_topic.encode()),
                (CORRELATION_ID, cid),
            ]
        try:
            delivery = await self._replies.send(
                topic,
                key=index.encode(),
                value=orjson.dumps(body, option=_JSON_OPTIONS),
                headers=headers,
            )
        except BaseException:
            self._forget(cid)
            raise
        return _Sent(delivery, cid, fut, command=topic == self._topics.commands)

    def _forget(self, cid: bytes | None) -> None:
        if cid is None:
            return
        self._batch_cids.discard(cid)
        self._replies.forget(cid)

    async def _finish(self, sent: _Sent, timeout_s: float) -> tuple[Any, dict[str, Any] | None]:
        """Await delivery and the reply (if any) within `timeout_s`; raise the reply's
        error. Whatever happens (timeout, cancellation), the registration is removed."""
        try:
            async with asyncio.timeout(timeout_s):
                meta = await sent.delivery
                reply = await sent.reply if sent.reply is not None else None
        except TimeoutError:
            delivery = sent.delivery
            if (
                sent.command
                and delivery.done()
                and not delivery.cancelled()
                and delivery.exception() is None
            ):
                written = delivery.result()
                raise NotAcknowledged(written.partition, written.offset) from None
            if not delivery.done():
                raise TimeoutError(
                    f"the broker did not take the request within {timeout_s:.3g} s"
                ) from None
            raise TimeoutError(
                f"no reply within {timeout_s:.3g} s: is a worker running and "
                "serving the index's partition?"
            ) from None
        finally:
            self._forget(sent.cid)
        if reply is not None:
            _raise_for_error(reply)
        return meta, reply

    def _timeout(self, timeout_s: float | None) -> float:
        return timeout_s if timeout_s is not None else self.timeout_s

    def _deadline(self, timeout_s: float | None) -> float:
        """When a call given `timeout_s` is up, in the loop's clock: the name's lookup and
        the requests it makes share that time."""
        return asyncio.get_running_loop().time() + self._timeout(timeout_s)

    @staticmethod
    def _left(deadline: float) -> float:
        """The seconds left until `deadline` (at least `_MIN_WAIT_S`)."""
        return max(deadline - asyncio.get_running_loop().time(), _MIN_WAIT_S)

    async def command(
        self, index: str, body: dict[str, Any], *, ack: bool, timeout_s: float | None = None
    ) -> WriteResult:
        """Produce one command; with `ack`, wait for the worker to apply it (or raise).

        Raises:
            LhvError: the worker rejected the command (only with `ack`).
            TimeoutError: no delivery (or no ack) within the timeout.
        """
        body = {"index": index, **body}
        sent = await self._send(self._topics.commands, index, body, reply=ack)
        meta, reply = await self._finish(sent, self._timeout(timeout_s))
        return WriteResult(partition=meta.partition, offset=meta.offset, ack=reply)

    # -- commands ------------------------------------------------------------------------

    async def create(
        self,
        index: str,
        *,
        dim: int,
        space: str = "cosine",
        engine: str = "hnsw",
        shards: int = 1,
        ack: bool = True,
        timeout_s: float | None = None,
        **params: Any,
    ) -> WriteResult:
        """Create an index; identical parameters again are a no-op, others `IndexExists`.

        `shards` >= 2 makes a sharded index of that many member indexes (the index's home
        worker creates them); 1 is an ordinary index."""
        body: dict[str, Any] = {"op": "create", "dim": dim, "space": space, "engine": engine}
        if shards != 1:
            body["shards"] = shards
        body.update(params)
        self._names.pop(index, None)
        result = await self.command(index, body, ack=ack, timeout_s=timeout_s)
        if ack and self.resolve_names and shards >= 1:
            self._remember(index, _Name(index, shards))
        return result

    async def drop(
        self, index: str, *, ack: bool = True, timeout_s: float | None = None
    ) -> WriteResult:
        """Drop an index (a sharded one with all its members)."""
        self._names.pop(index, None)
        try:
            return await self.command(index, {"op": "drop"}, ack=ack, timeout_s=timeout_s)
        finally:
            self._names.pop(index, None)

    async def alias(
        self, alias: str, target: str, *, ack: bool = True, timeout_s: float | None = None
    ) -> WriteResult:
        """Point `alias` at the index (or sharded index) `target`; an existing alias is
        switched in one record. Reads and writes by `alias` then reach `target`."""
        self._names.pop(alias, None)
        try:
            return await self.command(
                alias, {"op": "alias", "target": target}, ack=ack, timeout_s=timeout_s
            )
        finally:
            self._names.pop(alias, None)

    async def unalias(
        self, alias: str, *, ack: bool = True, timeout_s: float | None = None
    ) -> WriteResult:
        """Remove `alias` (its target stays)."""
        self._names.pop(alias, None)
        return await self.command(alias, {"op": "unalias"}, ack=ack, timeout_s=timeout_s)

    async def add(
        self,
        index: str,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        version: int | None = None,
        batch_size: int = 1000,
        max_record_bytes: int = 900_000,
        ack: bool = False,
        timeout_s: float | None = None,
    ) -> WriteResult:
        """Upsert items; returns where the last record landed (and, for a sharded index,
        the last record of each member in `offsets`).

        Items go in records of at most `batch_size` items and about `max_record_bytes`
        (Kafka brokers refuse records over `message.max.bytes`, 1 MiB by default; a single
        item larger than that still goes alone). Every record is produced before any is
        awaited, so a large add is pipelined. With `ack`, waits for every record to be
        applied and raises the first error (by record order); `.item` of the error is the
        position inside that record.
        """

        deadline = self._deadline(timeout_s)

        async def attempt() -> WriteResult:
            pending = await self.start_add(
                index,
                ids,
                vectors,
                metadata,
                version=version,
                batch_size=batch_size,
                max_record_bytes=max_record_bytes,
                ack=ack,
                timeout_s=self._left(deadline),
            )
            return await pending

        return await self._retry_renamed(index, deadline, attempt)

    async def start_add(
        self,
        index: str,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        version: int | None = None,
        batch_size: int = 1000,
        max_record_bytes: int = 900_000,
        ack: bool = False,
        timeout_s: float | None = None,
    ) -> Awaitable[WriteResult]:
        """`add` in two steps: returns once every record is queued in the producer (so
        records of successive calls keep their order), with an awaitable that waits for
        delivery (and acks) and gives the `WriteResult`. Await it: its waits are only
        cleaned up then."""
        vecs = np.asarray(vectors, dtype="<f4")
        if vecs.ndim != 2 or len(vecs) != len(ids):
            raise ValueError("vectors must be a 2-D array with one row per id")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError("metadata must have one entry per id")
        if not len(ids):
            raise ValueError("nothing to add")
        deadline = self._deadline(timeout_s)
        name = await self._resolve(index, deadline)
        groups: list[tuple[str, Sequence[str], np.ndarray, Any]] = []
        if not name.sharded:
            groups.append((name.index, ids, vecs, metadata))
        else:
            for shard, positions in sorted(split_by_shard(ids, name.shards).items()):
                rows = np.asarray(positions)
                groups.append(
                    (
                        shard_key(name.index, shard, name.shards),
                        [ids[p] for p in positions],
                        vecs[rows],
                        [metadata[p] for p in positions] if metadata is not None else None,
                    )
                )
        sent: list[tuple[str, _Sent]] = []
        try:
            for key, g_ids, g_vecs, g_meta in groups:
                for items in _chunks(g_ids, g_vecs, g_meta, version, batch_size, max_record_bytes):
                    body = {"op": "add", "index": key, "items": items}
                    sent.append(
                        (key, await self._send(self._topics.commands, key, body, reply=ack))
                    )
        except BaseException:
            for _, s in sent:
                self._forget(s.cid)
            raise
        return self._finish_writes(sent, self._left(deadline), sharded=name.sharded)

    async def _finish_writes(
        self, sent: list[tuple[str, _Sent]], timeout_s: float, *, sharded: bool
    ) -> WriteResult:
        try:
            done = await asyncio.gather(
                *(self._finish(s, timeout_s) for _, s in sent), return_exceptions=True
            )
        finally:
            for _, s in sent:
                self._forget(s.cid)
        results: list[tuple[Any, dict[str, Any] | None]] = []
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        offsets: dict[str, int] = {}
        if sharded:
            for (key, _), (meta, _) in zip(sent, results, strict=True):
                offsets[key] = max(offsets.get(key, -1), meta.offset)
        meta, last_ack = results[-1]
        return WriteResult(
            partition=meta.partition,
            offset=meta.offset,
            records=len(sent),
            ack=last_ack,
            offsets=offsets,
        )

    async def delete(
        self,
        index: str,
        ids: Iterable[str],
        *,
        version: int | None = None,
        ack: bool = False,
        timeout_s: float | None = None,
    ) -> WriteResult:
        """Tombstone `ids` (absent ids too: an older add arriving later stays deleted).
        For a sharded index, one record per member that holds any of `ids`.

        Raises:
            ValueError: `ids` is empty (nothing is written: the record would be refused).
        """
        asked = list(ids)
        if not asked:
            raise ValueError("nothing to delete")
        deadline = self._deadline(timeout_s)

        async def attempt() -> WriteResult:
            name = await self._resolve(index, deadline)
            if not name.sharded:
                body: dict[str, Any] = {"op": "delete", "ids": asked}
                if version is not None:
                    body["version"] = version
                return await self.command(name.index, body, ack=ack, timeout_s=self._left(deadline))
            sent: list[tuple[str, _Sent]] = []
            try:
                for shard, positions in sorted(split_by_shard(asked, name.shards).items()):
                    key = shard_key(name.index, shard, name.shards)
                    body = {"op": "delete", "index": key, "ids": [asked[p] for p in positions]}
                    if version is not None:
                        body["version"] = version
                    sent.append(
                        (key, await self._send(self._topics.commands, key, body, reply=ack))
                    )
            except BaseException:
                for _, s in sent:
                    self._forget(s.cid)
                raise
            return await self._finish_writes(sent, self._left(deadline), sharded=True)

        return await self._retry_renamed(index, deadline, attempt)

    async def merge(
        self,
        index: str,
        dest: str,
        *,
        clear_source: bool = False,
        ack: bool = True,
        timeout_s: float | None = None,
    ) -> WriteResult:
        return await self.command(
            index,
            {"op": "merge", "dest": dest, "clear_source": clear_source},
            ack=ack,
            timeout_s=timeout_s,
        )

    async def import_(
        self,
        index: str,
        source: str,
        *,
        ids_source: str | None = None,
        metadata_source: str | None = None,
        format: str | None = None,
        version: int | None = None,
        chunk_items: int | None = None,
        ack: bool = True,
        timeout_s: float | None = None,
    ) -> WriteResult:
        """Bulk load from an S3 object (`s3://bucket/key` of .npy/.npz/.lhv; `format`
        `npy`, `npz` or `lhv` when the key's suffix does not say); see README."""
        body: dict[str, Any] = {"op": "import", "source": source}
        optional = {
            "ids_source": ids_source,
            "metadata_source": metadata_source,
            "format": format,
            "version": version,
            "chunk_items": chunk_items,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return await self.command(index, body, ack=ack, timeout_s=timeout_s)

    # -- names ---------------------------------------------------------------------------

    async def describe(self, index: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """What `index` is, from its home: `kind` (`index`, `sharded` or `alias`),
        `shards`, and `target` (an alias) or `params`.

        Raises:
            IndexNotFound: no index, sharded index or alias has that name.
        """
        return await self.query(index, {"op": "describe"}, timeout_s=timeout_s)

    def _remember(self, index: str, name: _Name) -> None:
        expires = asyncio.get_running_loop().time() + self.name_ttl_s
        self._names[index] = _Name(name.index, name.shards, expires)

    async def _resolve(self, index: str, deadline: float) -> _Name:
        """What `index` names now (cached for `name_ttl_s`): itself, unsharded, unless
        `describe` says it is sharded or an alias (followed one hop).

        The lookup takes at most `resolve_timeout_s` and half the time left before the
        call's `deadline` (no `reply_grace_s`): the other half is the call's own."""
        if not self.resolve_names or parse_shard_name(index) is not None:
            return _Name(index)
        now = asyncio.get_running_loop().time()
        known = self._names.get(index)
        if known is not None and known.expires > now:
            return known
        wait_s = min(self._left(deadline) / 2, self.resolve_timeout_s)
        try:
            async with asyncio.timeout(wait_s):
                described = await self.describe(index, timeout_s=wait_s)
                if described.get("kind") == "alias":
                    target = str(described["target"])
                    described = await self.describe(target, timeout_s=wait_s)
                    if described.get("kind") == "alias":  # aliases point at indexes, one
                        name = _Name(index)  # hop: by its name, its home refuses the chain
                    else:
                        name = _Name(target, _shards(described))
                else:
                    name = _Name(index, _shards(described))
        except IndexNotFound:
            return _Name(index)  # not cached: the command or query itself says what it is
        except (TimeoutError, NotReady, DeadlineExceeded) as exc:
            log.debug("%r not resolved (%s): sent by its name", index, type(exc).__name__)
            return _Name(index)  # not cached; by name, the index's home forwards it
        except InvalidRequest:
            name = _Name(index)  # a worker without `describe`: nothing is sharded there
        self._remember(index, name)
        return name

    async def _retry_renamed(
        self, index: str, deadline: float, call: Callable[[], Awaitable[T]]
    ) -> T:
        """`call()`; on `index_not_found`, once more if `index` now resolves to something
        else (an alias switched, an index re-created sharded or not), within the same
        `deadline`."""
        try:
            return await call()
        except IndexNotFound:
            before = self._names.pop(index, None)
            if not self.resolve_names:
                raise
            after = await self._resolve(index, deadline)
            if before is None or after.same(before):
                raise
            return await call()

    # -- queries -------------------------------------------------------------------------

    async def query(
        self,
        index: str,
        body: dict[str, Any],
        *,
        after: WriteResult | None = None,
        min_offset: int | None = None,
        timeout_s: float | None = None,
        batch: bool = False,
    ) -> dict[str, Any]:
        """Send one query and return its reply body (`batch`: the request of coalesced
        searches, whose callers `pending` counts instead).

        Raises:
            LhvError: the subclass named by an error reply (`NotReady`, `IndexNotFound`, ...).
            TimeoutError: no reply within the timeout plus `reply_grace_s`.
        """
        wait_s = self._timeout(timeout_s)
        body = {"index": index, **body}
        _read_after(body, after, min_offset, index)
        body.setdefault("deadline_ms", int((time.time() + wait_s) * 1000))
        if self.replicas:
            return await self._hedged(index, body, wait_s + self.reply_grace_s, batch=batch)
        sent = await self._send(self._topics.search, index, body, reply=True, batch=batch)
        _meta, reply = await self._finish(sent, wait_s + self.reply_grace_s)
        assert reply is not None
        return reply

    def _copies(self) -> tuple[str, str]:
        """The search topics of this query, first and hedge: the owners' and the
        replicas' in turn, query by query; the hedge goes to the next in the turn."""
        topics = self._copies_topics
        turn, self._turn = self._turn, self._turn + 1
        return topics[turn % len(topics)], topics[(turn + 1) % len(topics)]

    async def _hedged(
        self, index: str, body: dict[str, Any], timeout_s: float, *, batch: bool
    ) -> dict[str, Any]:
        """Send the query to one copy; if it is unanswered after `hedge_after_ms`, to the
        other as well (a new correlation id for the same call). The first answer is the
        call's; the other's registration is removed, so its answer is dropped on
        arrival. Raises like `query`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        first, other = self._copies()
        sent = [await self._send(first, index, body, reply=True, batch=batch)]
        hedge_at = None
        if self.hedge_after_ms is not None:
            hedge_at = loop.time() + self.hedge_after_ms / 1000
        reply: dict[str, Any] | None = None
        try:
            while reply is None:
                now = loop.time()
                if now >= deadline:
                    raise TimeoutError("no reply from either copy within the call's timeout")
                until = deadline
                if hedge_at is not None and len(sent) == 1:
                    until = min(hedge_at, deadline)
                waits = {s.reply for s in sent if s.reply is not None}
                done, _ = await asyncio.wait(
                    waits, timeout=max(0.0, until - now), return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    reply = done.pop().result()  # the reader's failure raises here
                elif hedge_at is not None and len(sent) == 1 and loop.time() >= hedge_at:
                    self.hedged += 1
                    sent.append(await self._send(other, index, body, reply=True, batch=batch))
        finally:
            for s in sent:
                if s.reply is not None and not s.reply.done() and s.cid is not None:
                    self._losers.add(s.cid)  # its answer, if any, is dropped
                _quiet(s.delivery)
                self._forget(s.cid)
            if len(self._losers) > _MAX_LOSERS:
                self._losers.clear()  # only counts; never grows without bound
        _raise_for_error(reply)
        return reply

    async def search(
        self,
        index: str,
        vector: Any,
        k: int = 10,
        *,
        ef: int | None = None,
        filter: Mapping[str, Any] | None = None,
        include_metadata: bool = False,
        after: WriteResult | None = None,
        min_offset: int | None = None,
        timeout_s: float | None = None,
        allow_partial: bool = False,
    ) -> Hits:
        """The `k` nearest live items to `vector`, nearest first (fewer if fewer exist).

        Concurrent calls alike in all but the vector share one request (see
        `coalesce_searches`). A sharded index is searched on every member and the hits
        merged by (distance, id).

        Raises:
            ShardsMissing: members of a sharded index did not answer in time (unless
                `allow_partial`: then the hits of the others, flagged `partial`).
            ValueError: `min_offset` with a sharded index (offsets are per member: pass
                `after=`).
        """
        body: dict[str, Any] = {"op": "search", "k": k}
        if ef is not None:
            body["ef"] = ef
        if filter:
            body["filter"] = dict(filter)
        if include_metadata:
            body["include_metadata"] = True
        vector_b64 = encode_vector(vector)
        deadline = self._deadline(timeout_s)

        async def attempt() -> Hits:
            name = await self._resolve(index, deadline)
            if not name.sharded:
                member = dict(body)
                _read_after(member, after, min_offset, name.index)
                return Hits(
                    await self._search_key(name.index, member, vector_b64, self._left(deadline))
                )
            if min_offset is not None:
                raise ValueError(
                    f"index {index!r} is sharded: min_offset names one partition, pass after="
                )
            keys = shard_names(name.index, name.shards)
            calls = []
            left = self._left(deadline)
            for key in keys:
                member = dict(body)
                _read_after(member, after, None, key)
                calls.append(self._search_key(key, member, vector_b64, left))
            answers, missing = _gathered(await asyncio.gather(*calls, return_exceptions=True))
            if missing and not allow_partial:
                raise missing_error(name.index, missing, name.shards)
            return Hits(merge_hits((hits for _, hits in answers), k), missing)

        return await self._retry_renamed(index, deadline, attempt)

    async def _search_key(
        self, key: str, body: dict[str, Any], vector_b64: str, timeout_s: float | None
    ) -> list[Hit]:
        """One search keyed `key` (an index or one member), coalesced with its kind."""
        if not self.coalesce_searches:
            reply = await self.query(key, {**body, "vector_b64": vector_b64}, timeout_s=timeout_s)
            return _hits(reply["hits"])
        self._check_open()
        wait_s = self._timeout(timeout_s)
        fut = self._enqueue_search(key, body, vector_b64, wait_s)
        self._open_searches += 1
        try:
            return await fut  # TimeoutError from the batch's timer at this call's deadline
        finally:
            self._open_searches -= 1

    def _enqueue_search(
        self, index: str, body: dict[str, Any], vector: str, wait_s: float
    ) -> asyncio.Future[list[Hit]]:
        """Add one search to the batch of its kind; the batch is sent at the end of this
        event-loop turn, or now when it is full."""
        loop = asyncio.get_running_loop()
        # the vector's length is part of the kind: a wrong-length vector fails alone
        key = (index, len(vector), orjson.dumps(body, option=_KIND_OPTIONS))
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _SearchBatch(index, body)
            loop.call_soon(self._flush_search, key, batch)
        fut: asyncio.Future[list[Hit]] = loop.create_future()
        fut.add_done_callback(batch.waiter_done)
        batch.vectors.append(vector)
        batch.waiters.append(fut)
        deadline = loop.time() + wait_s + self.reply_grace_s
        batch.deadlines.append(deadline)
        if batch.timer is None:
            batch.timer = loop.call_at(deadline, batch.expire)
        batch.open_waiters += 1
        batch.wait_s = max(batch.wait_s, wait_s)
        room = min(self.max_search_batch, self.max_search_hits // int(body.get("k") or 10))
        if len(batch.waiters) >= room:
            self._flush_search(key, batch)
        return fut

    def _flush_search(self, key: tuple[Any, ...], batch: _SearchBatch) -> None:
        if self._batches.get(key) is not batch:
            return  # sent already (it filled up), or failed by stop()
        del self._batches[key]
        if batch.open_waiters == 0:
            return  # every caller gave up before the send
        task = asyncio.create_task(self._send_search_batch(batch), name="lhv-client-search")
        batch.task = task
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _send_search_batch(self, batch: _SearchBatch) -> None:
        live = list(zip(batch.vectors, batch.waiters, strict=True))
        await self._send_searches(batch.index, batch.body, live, batch.wait_s)

    async def _send_searches(
        self,
        index: str,
        kind: dict[str, Any],
        searches: list[tuple[str, asyncio.Future[list[Hit]]]],
        wait_s: float,
    ) -> None:
        """One request for `searches` (vector, caller) of one kind; refused for asking
        too much at once, the two halves are sent again."""
        live = [(v, f) for v, f in searches if not f.done()]
        if not live:
            return
        body = dict(kind)
        if len(live) == 1:
            body["vector_b64"] = live[0][0]
        else:
            body["vectors_b64"] = [v for v, _ in live]
        waiters = [f for _, f in live]
        try:
            reply = await self.query(index, body, timeout_s=wait_s, batch=True)
            results = reply.get("results")
            rows = (
                [_column_hits(r) for r in results]
                if results is not None
                else [_hits(reply["hits"])]
            )
            if len(rows) != len(waiters):
                raise Internal(f"a reply to {len(waiters)} searches has {len(rows)} results")
        except asyncio.CancelledError:
            _fail_all(waiters, ClientClosed("the client was stopped while searching"))
            raise
        except InvalidRequest as exc:
            if len(live) > 1 and too_many_together(exc.message):
                half = len(live) // 2
                await asyncio.gather(
                    self._send_searches(index, kind, live[:half], wait_s),
                    self._send_searches(index, kind, live[half:], wait_s),
                )
            else:
                _fail_all(waiters, exc)
            return
        except Exception as exc:
            _fail_all(waiters, exc)
            return
        for fut, hits in zip(waiters, rows, strict=True):
            if not fut.done():
                fut.set_result(hits)

    async def search_many(
        self,
        index: str,
        vectors: Any,
        k: int = 10,
        *,
        ef: int | None = None,
        filter: Mapping[str, Any] | None = None,
        include_metadata: bool = False,
        after: WriteResult | None = None,
        timeout_s: float | None = None,
        allow_partial: bool = False,
    ) -> list[Hits]:
        """One search per row of `vectors`, all in flight at once (the worker answers
        concurrent queries with batched engine calls); results in row order."""
        rows = np.asarray(vectors, dtype="<f4")
        if rows.ndim != 2:
            raise ValueError("vectors must be a 2-D array")
        return list(
            await asyncio.gather(
                *(
                    self.search(
                        index,
                        row,
                        k,
                        ef=ef,
                        filter=filter,
                        include_metadata=include_metadata,
                        after=after,
                        timeout_s=timeout_s,
                        allow_partial=allow_partial,
                    )
                    for row in rows
                )
            )
        )

    async def get(
        self,
        index: str,
        ids: Sequence[str],
        *,
        include_vectors: bool = True,
        include_metadata: bool = True,
        after: WriteResult | None = None,
        timeout_s: float | None = None,
        allow_partial: bool = False,
    ) -> Items:
        """The live items among `ids` (`id`, `vector`, `metadata`, `version`), in order.
        For a sharded index each member is asked for its own ids."""
        asked = list(ids)

        def body(of: list[str]) -> dict[str, Any]:
            return {
                "op": "get",
                "ids": of,
                "include_vectors": include_vectors,
                "include_metadata": include_metadata,
            }

        deadline = self._deadline(timeout_s)

        async def attempt() -> Items:
            name = await self._resolve(index, deadline)
            left = self._left(deadline)
            if not name.sharded:
                reply = await self.query(name.index, body(asked), after=after, timeout_s=left)
                return Items(reply["items"])
            shards: list[int] = []
            calls = []
            for shard, positions in sorted(split_by_shard(asked, name.shards).items()):
                key = shard_key(name.index, shard, name.shards)
                shards.append(shard)
                calls.append(
                    self.query(
                        key, body([asked[p] for p in positions]), after=after, timeout_s=left
                    )
                )
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            answers, missing = _gathered(outcomes, shards)
            if missing and not allow_partial:
                raise missing_error(name.index, missing, name.shards)
            items = merge_get_items(asked, (reply.get("items") or () for _, reply in answers))
            return Items((dict(item) for item in items), missing)

        return await self._retry_renamed(index, deadline, attempt)

    async def stats(
        self,
        index: str,
        *,
        after: WriteResult | None = None,
        timeout_s: float | None = None,
        allow_partial: bool = False,
    ) -> dict[str, Any]:
        """`count`, `deleted`, `dim`, `space`, `engine`, `params`, `applied_offset`, ...

        For a sharded index: `count` and `deleted` summed over the members, and `shards`,
        one entry per member (`shard`, `partition`, `count`, `deleted`, `applied_offset`,
        `checkpoint_offset`)."""

        deadline = self._deadline(timeout_s)

        async def attempt() -> dict[str, Any]:
            name = await self._resolve(index, deadline)
            left = self._left(deadline)
            if not name.sharded:
                return await self.query(name.index, {"op": "stats"}, after=after, timeout_s=left)
            calls = [
                self.query(key, {"op": "stats"}, after=after, timeout_s=left)
                for key in shard_names(name.index, name.shards)
            ]
            answers, missing = _gathered(await asyncio.gather(*calls, return_exceptions=True))
            if missing and not allow_partial:
                raise missing_error(name.index, missing, name.shards)
            merged = merge_stats_reply(name.index, name.shards, answers, missing=missing)
            merged["index"] = index
            return merged

        return await self._retry_renamed(index, deadline, attempt)


def _gathered(
    outcomes: Sequence[T | BaseException], shards: Sequence[int] | None = None
) -> tuple[list[tuple[int, T]], list[int]]:
    """The members' answers as (shard, answer), and the shards that did not answer in
    time; any other failure of a member is raised (the first, by shard)."""
    answers: list[tuple[int, T]] = []
    missing: list[int] = []
    failure: BaseException | None = None
    for pos, outcome in enumerate(outcomes):
        shard = shards[pos] if shards is not None else pos
        if isinstance(outcome, _MISSING):
            missing.append(shard)
        elif isinstance(outcome, BaseException):
            failure = failure or outcome
        else:
            answers.append((shard, outcome))
    if failure is not None:
        raise failure
    return answers, missing
