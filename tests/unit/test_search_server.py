"""The search server's own logic, without Kafka: every query read gets exactly one reply
whatever fails while serving it or its batch-mates, the drain goes on, the committable
offset never sticks, and parked queries are bounded.

The server gets in-memory ports (partitions, a reply sender that records what it is
given); the index is a real `lhv_index.Index`, wrapped
where a test needs the engine to fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest

from lhv_index import Clock, Columns, EngineKind, Index, IndexParams, Space, Upsert
from worker.service.config import QueryPolicy, WorkerConfig
from worker.service.observer import IndexObserver
from worker.service.partition import Partition, PartitionStatus
from worker.service.search import SearchServer
from worker.service.tasks import Supervisor
from worker.storage.blobstore import S3Config
from worker.telemetry.metrics import Metrics
from worker.wire.headers import ReplyTo
from worker.wire.topics import ReplyTopicPolicy, TopicsConfig

REPLY_TOPIC = "lhv.replies.unit"
INDEX = "docs"


@dataclass
class Record:
    """What the server reads of an aiokafka `ConsumerRecord`."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int = field(default_factory=lambda: int(time.time() * 1000))


class Replies:
    """Records each reply by correlation id; raises for the ids in `fail`."""

    def __init__(self) -> None:
        self.sent: dict[bytes, list[dict[str, Any]]] = {}
        self.fail: set[bytes] = set()
        self.arrived = asyncio.Event()

    async def send(self, reply_to: ReplyTo, value: bytes, **_: Any) -> bool:
        await asyncio.sleep(0)
        if reply_to.correlation_id in self.fail:
            raise RuntimeError("the broker refused the reply")
        self.sent.setdefault(reply_to.correlation_id, []).append(orjson.loads(value))
        self.arrived.set()
        return True

    async def wait_for(self, cids: list[bytes], *, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not all(c in self.sent for c in cids):
                self.arrived.clear()
                await self.arrived.wait()


class StandInWorker:
    """The ports the search server gets, in memory: partitions, replies, metrics."""

    def __init__(self, index: Any, *, queries: QueryPolicy | None = None) -> None:
        self.config = WorkerConfig(
            s3=S3Config(), queries=queries or QueryPolicy(), query_wait_ms=10_000
        )
        part = Partition(number=0, status=PartitionStatus.SERVING, applied_offset=10)
        part.indexes[INDEX] = index
        self.partitions = {0: part}
        self.num_partitions = 1
        self.replies = Replies()
        self.metrics = Metrics()
        self.tasks = Supervisor(self.metrics)

    def server(self) -> SearchServer:
        return SearchServer(
            topics=TopicsConfig(),
            registry=self,  # type: ignore[arg-type]
            kafka=None,  # type: ignore[arg-type]
            replies=self.replies,
            reply_policy=ReplyTopicPolicy(),
            tasks=self.tasks,
            observer=IndexObserver(self.metrics),
            metrics=self.metrics,
            policy=self.config.queries,
            limits=self.config.limits,
            max_reply_bytes=self.config.delivery.max_record_bytes,
            query_wait_ms=self.config.query_wait_ms,
            worker_id="unit",
        )


class FailingIndex:
    """A real index whose engine call raises for the filter `{"explode": true}`."""

    def __init__(self, inner: Index) -> None:
        self.inner = inner
        self.params = inner.params
        self.calls = 0

    def search_columns(self, vectors: np.ndarray, k: int, **kw: Any) -> list[Columns]:
        self.calls += 1
        if kw.get("filter") == {"explode": True}:
            raise RuntimeError("engine bug")
        return self.inner.search_columns(vectors, k, **kw)


def real_index() -> Index:
    idx = Index(INDEX, IndexParams(dim=2, space=Space.L2, engine=EngineKind.EXACT))
    idx.apply(
        [
            Upsert(id="a", vector=[1.0, 0.0], metadata=None, clock=Clock(0, 1, 0)),
            Upsert(id="b", vector=[0.0, 1.0], metadata=None, clock=Clock(0, 1, 1)),
        ]
    )
    return idx


def query(offset: int, cid: bytes, **body: Any) -> Record:
    value = orjson.dumps({"index": INDEX, "vector": [1.0, 0.0], "k": 1, **body})
    headers = [("kafka_replyTopic", REPLY_TOPIC.encode()), ("kafka_correlationId", cid)]
    return Record(offset, INDEX.encode(), value, headers)


async def served(server: SearchServer, offset_after: int, *, timeout_s: float = 10.0) -> None:
    """Wait until every offset read is finished (the committable offset moved past)."""
    deadline = time.monotonic() + timeout_s
    while server.committable(0) != offset_after:
        assert time.monotonic() < deadline, f"offsets before {offset_after} still in flight"
        await asyncio.sleep(0.01)


async def test_an_engine_failure_answers_its_group_internal_and_its_batch_mates_normally(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = FailingIndex(real_index())
    worker = StandInWorker(index)
    server = worker.server()
    records = [
        query(100, b"ok-1"),
        query(101, b"boom-1", filter={"explode": True}),
        query(102, b"ok-2"),
        query(103, b"boom-2", filter={"explode": True}),
        query(104, b"ok-3", k=2),
    ]
    server.submit(0, records)  # one poll: one batch for the index
    cids = [b"ok-1", b"boom-1", b"ok-2", b"boom-2", b"ok-3"]
    await worker.replies.wait_for(cids)
    await served(server, 105)
    sent = worker.replies.sent
    assert all(len(sent[c]) == 1 for c in cids), sent
    for cid in (b"boom-1", b"boom-2"):
        assert sent[cid][0]["status"] == "error"
        assert sent[cid][0]["error"]["code"] == "internal"
    for cid in (b"ok-1", b"ok-2", b"ok-3"):
        assert sent[cid][0]["status"] == "ok"
        assert sent[cid][0]["hits"][0]["id"] == "a"
    assert index.calls == 2, "both groups were searched by one engine call each"
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failed and getattr(failed[0], "partition", None) == 0
    assert getattr(failed[0], "offset", None) in (101, 103)
    # the drain is alive: a later query for the same index is answered
    server.submit(0, [query(105, b"later")])
    await worker.replies.wait_for([b"later"])
    assert worker.replies.sent[b"later"][0]["status"] == "ok"
    await served(server, 106)
    await server.stop()


async def test_a_reply_the_broker_refuses_is_logged_and_its_batch_mates_are_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = StandInWorker(real_index())
    worker.replies.fail = {b"refused"}
    server = worker.server()
    server.submit(0, [query(7, b"first"), query(8, b"refused"), query(9, b"last")])
    await worker.replies.wait_for([b"first", b"last"])
    await served(server, 10)
    assert b"refused" not in worker.replies.sent
    assert any("not sent" in r.getMessage() for r in caplog.records)
    await server.stop()


async def test_a_query_that_cannot_be_batched_is_answered_internal_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = StandInWorker(real_index())
    server = worker.server()
    group_key = server._group_key

    def failing_key(index_name: str, pending: Any) -> tuple[Any, ...]:
        if pending.offset == 21:
            raise ValueError("cannot compare")
        return group_key(index_name, pending)

    monkeypatch.setattr(server, "_group_key", failing_key)
    server.submit(0, [query(20, b"a"), query(21, b"b"), query(22, b"c")])
    await worker.replies.wait_for([b"a", b"b", b"c"])
    await served(server, 23)
    sent = worker.replies.sent
    assert [sent[c][0]["status"] for c in (b"a", b"b", b"c")] == ["ok", "error", "ok"]
    assert sent[b"b"][0]["error"]["code"] == "internal"
    assert "cannot compare" not in sent[b"b"][0]["error"]["message"]
    await server.stop()


async def test_a_query_older_than_the_maximum_age_gets_deadline_exceeded_uncomputed() -> None:
    index = FailingIndex(real_index())
    worker = StandInWorker(index, queries=QueryPolicy(max_age_ms=5_000))
    server = worker.server()
    old = query(3, b"old")
    old.timestamp = int(time.time() * 1000) - 6_000
    server.submit(0, [old, query(4, b"past", deadline_ms=int(time.time() * 1000) - 1)])
    await worker.replies.wait_for([b"old", b"past"])
    await served(server, 5)
    for cid in (b"old", b"past"):
        assert worker.replies.sent[cid][0]["error"]["code"] == "deadline_exceeded"
    assert "maximum query age" in worker.replies.sent[b"old"][0]["error"]["message"]
    assert index.calls == 0
    await server.stop()


async def test_parked_queries_over_the_bound_get_not_ready_at_once_and_the_rest_wait() -> None:
    worker = StandInWorker(real_index(), queries=QueryPolicy(max_parked=3, max_wait_ms=60_000))
    server = worker.server()
    far = int(time.time() * 1000) + 600_000
    waiting = [query(i, b"w%d" % i, min_offset=50, deadline_ms=far) for i in range(3)]
    over = [query(3 + i, b"o%d" % i, min_offset=50, deadline_ms=far) for i in range(4)]
    server.submit(0, waiting)
    deadline = time.monotonic() + 10
    while (
        worker.metrics.registry.get_sample_value("lhv_search_parked_queries", {"partition": "0"})
        != 3
    ):
        assert time.monotonic() < deadline, "the queries did not park"
        await asyncio.sleep(0.01)
    server.submit(0, over)
    await worker.replies.wait_for([b"o%d" % i for i in range(4)])
    for i in range(4):
        reply = worker.replies.sent[b"o%d" % i][0]
        assert reply["error"]["code"] == "not_ready"
        assert "too many waiting queries" in reply["error"]["message"]
    assert not any(b"w%d" % i in worker.replies.sent for i in range(3))
    assert server.committable(0) == 0, "the waiting queries are still in flight"
    part = worker.partitions[0]
    part.applied_offset = 50
    await part.notify()
    await worker.replies.wait_for([b"w%d" % i for i in range(3)])
    assert all(worker.replies.sent[b"w%d" % i][0]["status"] == "ok" for i in range(3))
    await served(server, 7)
    await server.stop()


async def test_no_query_waits_longer_than_the_cap_whatever_its_deadline() -> None:
    worker = StandInWorker(real_index(), queries=QueryPolicy(max_wait_ms=200))
    server = worker.server()
    far = int(time.time() * 1000) + 600_000
    server.submit(0, [query(0, b"capped", min_offset=10**9, deadline_ms=far)])
    await worker.replies.wait_for([b"capped"])
    error = worker.replies.sent[b"capped"][0]["error"]
    assert error["code"] == "deadline_exceeded" and "200 ms" in error["message"]
    await served(server, 1)
    await server.stop()
