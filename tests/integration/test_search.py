"""Search over request/reply on the real stack: read-your-writes, recall against raw
hnswlib, the reply-topic policy, bad requests, Spring/Java-style requests, deadlines and
readiness, exactly one reply per request under load, batching, the client and the CLI.

One worker (and one client) serve the whole module; each test uses its own indexes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from workerkit import (
    Env,
    create_topics,
    end_offsets,
    make_env,
    read_all,
    running,
    stop_quietly,
)

from lhv_index.errors import DeadlineExceeded, DimMismatch, IndexNotFound, NotReady
from worker import cli
from worker.client import ClientClosed, LhvClient
from worker.service import Worker
from worker.service.partition import PartitionStatus
from worker.storage.blobstore import S3Config
from worker.wire.topics import home_partition

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.data import clustered, queries

pytestmark = pytest.mark.asyncio(loop_scope="session")


# -- fixtures ------------------------------------------------------------------------------


class Served:
    """The module's stack settings, running worker and client."""

    def __init__(self, env: Env, worker: Worker, client: LhvClient) -> None:
        self.env = env
        self.worker = worker
        self.client = client

    def index_on(self, partition: int, prefix: str) -> str:
        """A fresh index name whose home is `partition`."""
        for _ in range(10_000):
            name = f"{prefix}-{uuid.uuid4().hex[:6]}"
            if home_partition(name.encode(), self.env.partitions) == partition:
                return name
        raise AssertionError("no name found")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(bootstrap_servers: str, s3_config: S3Config) -> AsyncIterator[Served]:
    env = await make_env(bootstrap_servers, s3_config, partitions=3)
    async with (
        running(env.config(query_wait_ms=5_000)) as worker,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=20.0) as client,
    ):
        for _ in range(300):  # the group has formed and every partition serves
            if len(worker.partitions) == env.partitions and all(
                p.status is PartitionStatus.SERVING for p in worker.partitions.values()
            ):
                break
            await asyncio.sleep(0.1)
        yield Served(env, worker, client)


class RawRequester:
    """Requests produced by hand (any headers, any partition) and replies read with a
    plain consumer, as a Java or other-language requester would."""

    def __init__(self, bootstrap: str, reply_topic: str) -> None:
        self.bootstrap = bootstrap
        self.reply_topic = reply_topic
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.replies: list[Any] = []

    async def __aenter__(self) -> RawRequester:
        await self.producer.start()
        await self.consumer.start()
        parts = await self.producer.partitions_for(self.reply_topic)
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        await stop_quietly(self.consumer)

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | dict[str, Any] | None,
        headers: list[tuple[str, bytes]],
        *,
        partition: int | None = None,
    ) -> None:
        if isinstance(value, dict):
            value = orjson.dumps(value)
        await self.producer.send_and_wait(
            topic, key=key, value=value, headers=headers, partition=partition
        )

    async def ask(
        self,
        topic: str,
        key: bytes | None,
        body: dict[str, Any],
        cid: bytes,
        *,
        partition: int | None = None,
    ) -> Any:
        """Send `body` with reply headers for `cid` and return the decoded reply."""
        await self.send(topic, key, body, self.headers(cid), partition=partition)
        return orjson.loads((await self.reply(cid)).value)

    def headers(self, cid: bytes, partition: int | None = None) -> list[tuple[str, bytes]]:
        out = [("kafka_replyTopic", self.reply_topic.encode()), ("kafka_correlationId", cid)]
        if partition is not None:
            out.append(("kafka_replyPartition", struct.pack(">i", partition)))
        return out

    async def reply(self, cid: bytes, *, timeout_s: float = 20.0) -> Any:
        """The reply record whose kafka_correlationId header is `cid`."""
        deadline = time.monotonic() + timeout_s
        while True:
            for rec in self.replies:
                if dict(rec.headers).get("kafka_correlationId") == cid:
                    return rec
            assert time.monotonic() < deadline, f"no reply for {cid!r}"
            batch = await self.consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                self.replies.extend(recs)


async def reply_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"lhv.replies.test-{uuid.uuid4().hex[:10]}"
    await create_topics(bootstrap, [name], partitions)
    return name


def vecs(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


# -- read-your-writes ------------------------------------------------------------------------


async def test_search_after_a_write_always_sees_it(served: Served) -> None:
    c = served.client
    name = "ryw"
    await c.create(name, dim=16, space="l2", M=8, ef_construction=64)
    base = vecs(200, 16, 1)
    await c.add(name, [f"base-{i}" for i in range(200)], base, ack=True)
    fresh = vecs(60, 16, 2) * 10  # far from the base items: each is its own nearest
    for i, v in enumerate(fresh):
        w = await c.add(name, [f"new-{i}"], v[None, :])
        hits = await c.search(name, v, k=1, after=w)
        assert hits and hits[0].id == f"new-{i}", f"round {i}: {hits}"
        if i % 3 == 0:
            d = await c.delete(name, [f"new-{i}"])
            hits = await c.search(name, v, k=1, after=d)
            assert hits[0].id != f"new-{i}", f"round {i}: deleted item still found"
            items = await c.get(name, [f"new-{i}"], after=d)
            assert items == []
        else:
            items = await c.get(name, [f"new-{i}"], after=w)
            assert [it["id"] for it in items] == [f"new-{i}"]
    stats = await c.stats(name)
    assert stats["count"] == 200 + 40 and stats["deleted"] == 20


async def test_metadata_and_filters_round_trip_through_the_worker(served: Served) -> None:
    c = served.client
    name = "meta"
    await c.create(name, dim=8, space="cosine")
    v = vecs(100, 8, 3)
    meta = [{"lang": "en" if i % 10 == 0 else "fr", "n": i} for i in range(100)]
    w = await c.add(name, [str(i) for i in range(100)], v, meta)
    hits = await c.search(name, v[5], k=5, filter={"lang": "en"}, include_metadata=True, after=w)
    assert len(hits) == 5 and all(h.metadata and h.metadata["lang"] == "en" for h in hits)
    assert {h.id for h in hits} <= {str(i) for i in range(0, 100, 10)}


# -- recall ------------------------------------------------------------------------------------


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


async def test_recall_through_the_worker_equals_raw_hnswlib(served: Served) -> None:
    n, dim, k, ef, m, efc = 20_000, 128, 10, 24, 16, 100
    data = clustered(n, dim, seed=4)
    qs = queries(1_000, dim, seed=4)
    c = served.client
    name = "recall"
    await c.create(name, dim=dim, space="l2", M=m, ef_construction=efc, ef_search=ef)
    w = await c.add(name, [str(i) for i in range(n)], data, batch_size=1_000)

    def exact_and_raw() -> tuple[np.ndarray, np.ndarray]:
        d = (qs**2).sum(1)[:, None] - 2 * qs @ data.T + (data**2).sum(1)[None, :]
        truth = np.argsort(d, axis=1)[:, :k]
        raw = hnswlib.Index(space="l2", dim=dim)
        raw.init_index(max_elements=n, M=m, ef_construction=efc)
        raw.add_items(data, np.arange(n))
        raw.set_ef(ef)
        labels, _ = raw.knn_query(qs, k=k)
        return truth, labels

    truth, raw_labels = await asyncio.to_thread(exact_and_raw)
    rows = await c.search_many(name, qs, k, ef=ef, after=w)
    got = np.array([[int(h.id) for h in row] for row in rows])
    worker_recall, raw_recall = _recall(got, truth), _recall(raw_labels, truth)
    print(f"recall@{k} at ef={ef}: worker {worker_recall:.4f}, raw hnswlib {raw_recall:.4f}")
    assert raw_recall < 0.999, "the comparison needs an ef where recall is not saturated"
    assert abs(worker_recall - raw_recall) <= 0.01


# -- reply-topic policy and bad requests ---------------------------------------------------------


async def test_a_request_naming_a_non_reply_topic_is_logged_and_nothing_is_written_there(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.service.search")
    env = served.env
    name = "policy"
    await served.client.create(name, dim=2, space="l2")
    w = await served.client.add(name, ["a"], [[1.0, 0.0]], ack=True)
    targets = [env.topics.commands, env.topics.search, "lhv.commands"]
    before = {t: await end_offsets(env.bootstrap, t) for t in targets}
    ok_topic = await reply_topic(env.bootstrap)
    async with RawRequester(env.bootstrap, ok_topic) as raw:
        for i, target in enumerate(targets):
            headers = [("kafka_replyTopic", target.encode()), ("kafka_correlationId", b"x%d" % i)]
            await raw.send(
                env.topics.search, name.encode(), {"index": name, "vector": [1, 0]}, headers
            )
            # malformed, with headers naming the forbidden topic: no error reply there either
            await raw.send(env.topics.search, name.encode(), b"{broken", headers)
        # a good request sent after them is answered, so they were all read
        await raw.send(
            env.topics.search,
            name.encode(),
            {"index": name, "vector": [1, 0], "min_offset": w.offset},
            raw.headers(b"good"),
        )
        assert orjson.loads((await raw.reply(b"good")).value)["status"] == "ok"

    def refused(target: str) -> int:
        return sum(
            1
            for r in caplog.records
            if r.name == "worker.service.search" and r.levelno == logging.WARNING
            and repr(target) in r.getMessage()
        )  # fmt: skip

    for _ in range(100):
        if all(refused(t) >= 2 for t in targets):
            break
        await asyncio.sleep(0.05)
    assert all(refused(t) >= 2 for t in targets), [r.getMessage() for r in caplog.records]
    for target in targets:
        after = await end_offsets(env.bootstrap, target)
        if target == env.topics.search:  # holds the requests themselves, nothing more
            home = home_partition(name.encode(), env.partitions)
            before[target][home] += 2 * len(targets) + 1
        assert after == before[target], target


async def test_malformed_requests_get_an_error_reply_or_are_skipped_without_headers(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.service.search")
    env = served.env
    name = "malformed"
    await served.client.create(name, dim=2, space="l2")
    topic = await reply_topic(env.bootstrap)
    async with RawRequester(env.bootstrap, topic) as raw:
        key = name.encode()
        bad = [
            (b"not-json", b"{oops"),
            (b"no-vector", orjson.dumps({"index": name, "k": 3})),
            (b"bad-k", orjson.dumps({"index": name, "vector": [1, 0], "k": 0})),
            (b"key-differs", orjson.dumps({"index": "other", "vector": [1, 0]})),
        ]
        for cid, value in bad:
            await raw.send(env.topics.search, key, value, raw.headers(cid))
        await raw.send(env.topics.search, key, b"{no headers at all", [])
        await raw.send(env.topics.search, key, {"index": name, "vector": [1, 0]}, [])
        await raw.send(
            env.topics.search, key, {"index": name, "vector": [1, 0]}, raw.headers(b"ok")
        )
        for cid, _ in bad:
            body = orjson.loads((await raw.reply(cid)).value)
            assert body["status"] == "error" and body["error"]["code"] == "invalid_request", cid
            assert body["error"]["message"] and body["correlation_id"] == cid.decode()
        good = orjson.loads((await raw.reply(b"ok")).value)
        assert good["status"] == "ok" and good["hits"] == []
    skipped = [r for r in caplog.records if "without reply headers" in r.getMessage()]
    assert len(skipped) == 2


async def test_java_style_request_is_answered_on_its_reply_partition(served: Served) -> None:
    env = served.env
    name = "java"
    await served.client.create(name, dim=3, space="l2")
    w = await served.client.add(name, ["a", "b"], [[1, 0, 0], [0, 1, 0]])
    topic = await reply_topic(env.bootstrap, partitions=3)
    async with RawRequester(env.bootstrap, topic) as raw:
        for partition in (2, 0, 1):
            cid = bytes([0xFF, 0x00, partition]) + os.urandom(13)  # not UTF-8
            body = {"index": name, "vector": [1, 0, 0], "k": 1, "min_offset": w.offset}
            await raw.send(env.topics.search, name.encode(), body, raw.headers(cid, partition))
            rec = await raw.reply(cid)
            assert rec.partition == partition
            assert rec.key == cid
            assert dict(rec.headers)["kafka_correlationId"] == cid
            reply = orjson.loads(rec.value)
            assert reply["correlation_id"] == cid.hex()
            assert reply["status"] == "ok" and reply["hits"][0]["id"] == "a"


async def test_a_query_on_another_partition_than_its_index_home_gets_wrong_partition(
    served: Served,
) -> None:
    env = served.env
    name = served.index_on(0, "wp")
    await served.client.create(name, dim=2, space="l2")
    topic = await reply_topic(env.bootstrap)
    async with RawRequester(env.bootstrap, topic) as raw:
        body = {"index": name, "vector": [1, 0]}
        reply = await raw.ask(env.topics.search, name.encode(), body, b"wp", partition=1)
    assert reply["status"] == "error" and reply["error"]["code"] == "wrong_partition"


# -- deadlines and readiness ------------------------------------------------------------------


async def test_a_request_past_its_deadline_gets_deadline_exceeded(served: Served) -> None:
    c = served.client
    await c.create("late", dim=2, space="l2")
    past = int(time.time() * 1000) - 1_000
    with pytest.raises(DeadlineExceeded):
        await c.query("late", {"vector": [1, 0], "deadline_ms": past})


async def test_min_offset_never_applied_gets_deadline_exceeded(served: Served) -> None:
    c = served.client
    await c.create("future", dim=2, space="l2")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="not applied"):
        await c.search("future", [1, 0], min_offset=10**12, timeout_s=0.5)
    assert time.monotonic() - started < 10


async def test_a_query_waits_while_its_partition_restores_and_gets_not_ready_at_its_deadline(
    served: Served,
) -> None:
    c = served.client
    p = 2
    name = served.index_on(p, "restoring")
    await c.create(name, dim=2, space="l2")
    w = await c.add(name, ["a"], [[1.0, 0.0]], ack=True)
    part = served.worker.partitions[p]
    part.status = PartitionStatus.RESTORING  # as right after an assignment
    try:
        with pytest.raises(NotReady, match="restoring"):
            await c.search(name, [1, 0], timeout_s=0.5)
        waiting = asyncio.create_task(c.search(name, [1, 0], k=1, after=w, timeout_s=10))
        await asyncio.sleep(0.5)
        assert not waiting.done()
    finally:
        part.status = PartitionStatus.SERVING
        await part.notify()
    hits = await waiting
    assert [h.id for h in hits] == ["a"]


# -- load, exactly-once replies, batching ------------------------------------------------------


async def test_200_concurrent_searchers_get_exactly_one_reply_per_request(
    served: Served,
) -> None:
    env = served.env
    name = "load"
    await served.client.create(name, dim=32, space="l2", M=8, ef_construction=64)
    w = await served.client.add(name, [str(i) for i in range(2_000)], vecs(2_000, 32, 5))
    qs = vecs(64, 32, 6)
    # one request per call: 200 requests in flight at once
    async with LhvClient(
        env.bootstrap, topics=env.topics, timeout_s=30, coalesce_searches=False
    ) as c:
        await c.search(name, qs[0], after=w)  # warm: applied, connections up
        search_before = await end_offsets(env.bootstrap, env.topics.search)
        stop_at = time.monotonic() + 10.0
        answered = Counter[int]()

        async def searcher(n: int) -> None:
            i = n
            while time.monotonic() < stop_at:
                hits = await c.search(name, qs[i % len(qs)], k=5)
                assert len(hits) == 5
                answered[n] += 1
                i += 1

        await asyncio.gather(*(searcher(n) for n in range(200)))
        assert c.pending == 0
        search_after = await end_offsets(env.bootstrap, env.topics.search)
        requests = sum(search_after.values()) - sum(search_before.values())
        total = sum(answered.values())
        assert requests == total
        # every reply on the client's reply topic, counted by correlation id
        consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(c.reply_topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            by_cid = Counter[bytes]()
            deadline = time.monotonic() + 60
            pos = 0
            while pos < end:
                assert time.monotonic() < deadline, "could not read the reply topic"
                for recs in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                    for rec in recs:
                        by_cid[dict(rec.headers)["kafka_correlationId"]] += 1
                        pos = rec.offset + 1
        finally:
            await stop_quietly(consumer)
    print(f"{total} requests from 200 searchers in 10 s: {total / 10:.0f}/s")
    assert sum(by_cid.values()) == total + 2  # and the warm-up and its `describe` of the name
    assert max(by_cid.values()) == 1, "a request got two replies"
    assert min(answered.values()) > 0


async def test_concurrent_requests_for_one_index_are_answered_by_batched_engine_calls(
    served: Served,
) -> None:
    name = "batched"
    await served.client.create(name, dim=64, space="l2")
    w = await served.client.add(name, [str(i) for i in range(5_000)], vecs(5_000, 64, 7))
    # one request per call, so the batching seen is the worker's
    c = LhvClient(served.env.bootstrap, topics=served.env.topics, coalesce_searches=False)
    await c.start()
    await c.search(name, vecs(1, 64, 8)[0], after=w)
    server = served.worker.search
    metrics = served.worker.metrics.registry
    labels = {"op": "search", "status": "ok"}
    calls0, searched0 = server.engine_calls, server.searched
    single0 = metrics.get_sample_value("lhv_search_batch_size_bucket", {**labels, "le": "1.0"})
    count0 = metrics.get_sample_value("lhv_search_batch_size_count", labels)
    try:
        rows = await c.search_many(name, vecs(500, 64, 9), k=10)
    finally:
        await c.stop()
    assert len(rows) == 500 and all(len(r) == 10 for r in rows)
    calls = server.engine_calls - calls0
    searched = server.searched - searched0
    single = metrics.get_sample_value("lhv_search_batch_size_bucket", {**labels, "le": "1.0"})
    count = metrics.get_sample_value("lhv_search_batch_size_count", labels)
    print(f"500 concurrent queries answered by {calls} engine calls")
    assert searched == 500
    assert calls < 250, f"{calls} engine calls for 500 concurrent queries"
    assert (count - count0) - (single - single0) > 250, "most queries should share a call"


async def test_a_multi_vector_request_gets_one_result_per_vector_in_order(
    served: Served,
) -> None:
    env = served.env
    name = "multi"
    await served.client.create(name, dim=8, space="l2")
    data = vecs(300, 8, 21)
    w = await served.client.add(name, [str(i) for i in range(300)], data)
    qs = vecs(5, 8, 22)
    singles = [await served.client.search(name, q, k=4, after=w) for q in qs]
    topic = await reply_topic(env.bootstrap)
    async with RawRequester(env.bootstrap, topic) as raw:
        body = {"index": name, "vectors": qs.tolist(), "k": 4, "min_offset": w.offset}
        reply = await raw.ask(env.topics.search, name.encode(), body, b"multi-1")
        assert reply["status"] == "ok" and "hits" not in reply
        assert [r["ids"] for r in reply["results"]] == [[h.id for h in hits] for hits in singles]
        for r, hits in zip(reply["results"], singles, strict=True):
            assert r["distances"] == pytest.approx([h.distance for h in hits], abs=1e-6)
        # one malformed vector: the whole request is refused, naming it
        bad = {"index": name, "vectors": [qs[0].tolist(), [1.0, 2.0]], "k": 4}
        reply = await raw.ask(env.topics.search, name.encode(), bad, b"multi-2")
        assert reply["status"] == "error" and reply["error"]["code"] == "invalid_request"
        assert reply["error"]["item"] == 1
        # vectors of the wrong dim for the index
        wrong = {"index": name, "vectors": [[1.0, 2.0], [3.0, 4.0]]}
        reply = await raw.ask(env.topics.search, name.encode(), wrong, b"multi-3")
        assert reply["error"]["code"] == "dim_mismatch"


async def test_include_vectors_returns_the_stored_vector_of_each_hit_sharded_or_not(
    served: Served,
) -> None:
    env = served.env
    data = vecs(60, 8, 31)
    ids = [f"v{i}" for i in range(60)]
    topic = await reply_topic(env.bootstrap)
    async with RawRequester(env.bootstrap, topic) as raw:
        for name, shards in (("withvec", 1), ("withvec-sh", 3)):
            await served.client.create(name, dim=8, space="l2", shards=shards)
            w = await served.client.add(name, ids, data)
            await served.client.search(name, data[0], k=1, after=w)  # applied everywhere
            body = {"index": name, "vector": data[5].tolist(), "k": 3, "include_vectors": True}
            reply = await raw.ask(env.topics.search, name.encode(), body, f"{name}-1".encode())
            assert reply["status"] == "ok", reply
            assert reply["hits"][0]["id"] == "v5"
            for hit in reply["hits"]:
                assert hit["vector"] == pytest.approx(data[int(hit["id"][1:])].tolist())
            multi = {"index": name, "vectors": data[[5, 7]].tolist(), "k": 2}
            reply = await raw.ask(
                env.topics.search,
                name.encode(),
                {**multi, "include_vectors": True},
                f"{name}-2".encode(),
            )
            assert [r["ids"][0] for r in reply["results"]] == ["v5", "v7"], reply
            for r in reply["results"]:
                for id_, vector in zip(r["ids"], r["vectors"], strict=True):
                    assert vector == pytest.approx(data[int(id_[1:])].tolist())
            # without the flag, no vectors
            reply = await raw.ask(env.topics.search, name.encode(), multi, f"{name}-3".encode())
            assert "vectors" not in reply["results"][0], reply
            # vector_encoding b64: the same vectors as base64 of little-endian float32
            packed = {**body, "vector_encoding": "b64"}
            reply = await raw.ask(env.topics.search, name.encode(), packed, f"{name}-5".encode())
            assert reply["hits"][0]["id"] == "v5" and "vector" not in reply["hits"][0], reply
            for hit in reply["hits"]:
                got = np.frombuffer(base64.b64decode(hit["vector_b64"]), "<f4")
                assert got.tolist() == data[int(hit["id"][1:])].tolist()
            packed = {**multi, "include_vectors": True, "vector_encoding": "b64"}
            reply = await raw.ask(env.topics.search, name.encode(), packed, f"{name}-6".encode())
            for r in reply["results"]:
                for id_, text in zip(r["ids"], r["vectors_b64"], strict=True):
                    got = np.frombuffer(base64.b64decode(text), "<f4")
                    assert got.tolist() == data[int(id_[1:])].tolist()
        # vectors a reply would carry are bounded as a get's are
        over = {"index": "withvec", "vector": data[0].tolist(), "k": 1001, "include_vectors": True}
        reply = await raw.ask(env.topics.search, b"withvec", over, b"withvec-4")
        assert reply["error"]["code"] == "invalid_request"
        assert "max_get_vectors" in reply["error"]["message"]


async def test_concurrent_client_searches_share_requests_and_each_gets_its_own_hits(
    served: Served,
) -> None:
    env = served.env
    name = "coalesced"
    await served.client.create(name, dim=16, space="cosine")
    w = await served.client.add(name, [str(i) for i in range(3_000)], vecs(3_000, 16, 31))
    qs = vecs(600, 16, 32)
    async with LhvClient(
        env.bootstrap, topics=env.topics, timeout_s=30, coalesce_searches=False
    ) as plain:
        expected = await plain.search_many(name, qs, k=7, after=w)
        before = await end_offsets(env.bootstrap, env.topics.search)
        got = await served.client.search_many(name, qs, k=7, after=w)
        after = await end_offsets(env.bootstrap, env.topics.search)
        requests = sum(after.values()) - sum(before.values())
        print(f"600 concurrent searches sent as {requests} requests")
        assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in expected]
        assert requests <= 600 // served.client.max_search_batch + 3
        # a wrong-length vector among them fails alone, on both clients
        for c in (served.client, plain):
            results = await asyncio.gather(
                *(c.search(name, q, k=3) for q in qs[:40]),
                c.search(name, [1.0, 2.0], k=3),
                return_exceptions=True,
            )
            assert isinstance(results[-1], DimMismatch)
            assert all(isinstance(r, list) and len(r) == 3 for r in results[:-1]), results
        assert served.client.pending == 0 and plain.pending == 0


async def test_coalesced_searches_too_large_together_are_split_and_each_answered(
    served: Served,
) -> None:
    """Documents with a few KB of metadata: 200 concurrent searches asking for it would
    coalesce into one reply of about 8 MB, over the worker's 1 MiB per reply record, so
    the worker refuses it whole; each search alone is small. The client splits the
    refused request until the replies fit, and every caller gets its own hits."""
    c = served.client
    name = "fat-meta"
    await c.create(name, dim=8, space="l2")
    n = 300
    metas = [{"doc": str(i), "text": "x" * 8_000} for i in range(n)]
    w = await c.add(name, [str(i) for i in range(n)], vecs(n, 8, 41), metadata=metas)
    qs = vecs(200, 8, 42)
    await c.search(name, qs[0], k=5, after=w)
    got = await asyncio.gather(
        *(c.search(name, q, k=5, include_metadata=True) for q in qs), return_exceptions=True
    )
    failed = [r for r in got if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    for hits in got:
        assert isinstance(hits, list) and len(hits) == 5
        assert all(h.metadata == metas[int(h.id)] for h in hits)
    assert c.pending == 0


# -- the client ---------------------------------------------------------------------------------


async def test_client_add_returns_the_offsets_of_its_records(served: Served) -> None:
    c = served.client
    name = served.index_on(1, "offsets")
    await c.create(name, dim=4, space="l2")
    first = await c.add(name, ["a"], vecs(1, 4, 1))
    second = await c.add(name, [str(i) for i in range(250)], vecs(250, 4, 2), batch_size=100)
    assert first.partition == second.partition == 1
    assert second.records == 3 and second.offset >= first.offset + 3
    acked = await c.add(name, ["b"], vecs(1, 4, 3), ack=True)
    assert acked.ack is not None and acked.ack["offset"] == acked.offset
    assert acked.ack["applied"] == 1


async def test_client_errors_raise_the_class_named_by_the_reply_code(served: Served) -> None:
    c = served.client
    with pytest.raises(IndexNotFound):
        await c.search("no-such-index", [1.0, 0.0])
    await c.create("dims", dim=3, space="l2")
    with pytest.raises(DimMismatch):
        await c.search("dims", [1.0, 0.0], after=await c.add("dims", ["a"], [[1, 0, 0]]))
    with pytest.raises(DimMismatch) as info:
        await c.add("dims", ["x", "y"], [[1, 0], [0, 1]], ack=True)
    assert info.value.item == 0


async def test_client_timeouts_and_cancellations_leave_nothing_pending(served: Served) -> None:
    env = served.env
    # nobody serves these topics: requests are never answered
    orphan = await make_env(env.bootstrap, env.s3, partitions=1)
    async with LhvClient(
        env.bootstrap, topics=orphan.topics, timeout_s=0.3, reply_grace_s=0.1
    ) as c:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await c.search("x", [1.0])
        with pytest.raises(TimeoutError):
            await c.create("x", dim=2)  # an acknowledged command, never acknowledged
        assert c.pending == 0
        tasks = [asyncio.create_task(c.search("x", [1.0], timeout_s=30)) for _ in range(20)]
        for _ in range(100):
            if c.pending == 20:
                break
            await asyncio.sleep(0.02)
        assert c.pending == 20
        for t in tasks[:10]:
            t.cancel()
        await asyncio.gather(*tasks[:10], return_exceptions=True)
        assert c.pending == 10
        stopping = asyncio.create_task(c.stop())
        results = await asyncio.gather(*tasks[10:], return_exceptions=True)
        await stopping
        assert all(isinstance(r, ClientClosed) for r in results), results
        assert c.pending == 0
    with pytest.raises(ClientClosed):
        await c.search("x", [1.0])
    await c.stop()  # idempotent


async def test_a_query_nobody_answers_is_due_within_its_own_timeout_name_lookup_included(
    served: Served,
) -> None:
    env = served.env
    orphan = await make_env(env.bootstrap, env.s3, partitions=1)  # no worker serves it
    async with LhvClient(env.bootstrap, topics=orphan.topics, timeout_s=1.0) as c:
        called_ms = time.time() * 1000
        with pytest.raises(TimeoutError):
            await c.search("x", [1.0])
    asked = [orjson.loads(r.value) for r in await read_all(env.bootstrap, orphan.topics.search)]
    assert [q["op"] for q in asked] == ["describe", "search"]
    # the lookup of the name and the search share the call's second: the worker is told so
    assert all(q["deadline_ms"] <= called_ms + 1000 + 1 for q in asked), asked


# -- the CLI ------------------------------------------------------------------------------------


def _conn(env: Env) -> list[str]:
    return ["--commands-topic", env.topics.commands, "--search-topic", env.topics.search]


async def test_cli_loads_every_format_then_searches_and_reports_stats(
    served: Served,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = served.env
    monkeypatch.setenv("LHV_BOOTSTRAP_SERVERS", env.bootstrap)
    data = vecs(250, 8, 11)
    np.save(tmp_path / "v.npy", data)
    (tmp_path / "ids.txt").write_text("".join(f"doc-{i}\n" for i in range(250)))
    np.savez(tmp_path / "v.npz", vectors=data[:40], ids=np.array([f"z{i}" for i in range(40)]))
    with (tmp_path / "v.fvecs").open("wb") as f:
        for row in data[:30]:
            f.write(struct.pack("<i", 8) + row.astype("<f4").tobytes())
    with (tmp_path / "v.jsonl").open("w") as f:
        for i in range(25):
            f.write(json.dumps({"id": f"j{i}", "vector": data[i].tolist(), "metadata": {"i": i}}))
            f.write("\n")

    async def lhv(*argv: str) -> int:
        return await asyncio.to_thread(cli.main, list(argv))

    opts = [*_conn(env), "--no-progress", "--batch-size", "64"]
    assert await lhv("load", "cli", str(tmp_path / "v.npy"), "--create", "--dim", "8",
                     "--space", "l2", "--ids-file", str(tmp_path / "ids.txt"), *opts) == 0  # fmt: skip
    assert "loaded 250 of 250 rows" in capsys.readouterr().out
    for f in ("v.npz", "v.fvecs", "v.jsonl"):
        assert await lhv("load", "cli", str(tmp_path / f), *opts) == 0, f
    out = capsys.readouterr().out
    assert "loaded 40 of 40" in out and "loaded 30 of 30" in out and "loaded 25 of 25" in out

    # fvecs rows 0..29 were loaded under ids "0".."29", same vectors as doc-0.., z0.., j0..
    vector = json.dumps(data[3].tolist())
    assert await lhv("search", "cli", "--vector", vector, "-k", "4", "--json", *_conn(env)) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert {h["id"] for h in line["hits"]} == {"doc-3", "z3", "3", "j3"}
    assert all(h["distance"] < 1e-4 for h in line["hits"])
    np.save(tmp_path / "q.npy", data[:2])
    assert (
        await lhv("search", "cli", "--file", str(tmp_path / "q.npy"), "-k", "2", *_conn(env)) == 0
    )
    table = capsys.readouterr().out
    assert "query 0" in table and "query 1" in table and "distance" in table

    assert await lhv("stats", "cli", "--json", *_conn(env)) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 250 + 40 + 30 + 25 and stats["dim"] == 8 and stats["space"] == "l2"
    assert await lhv("stats", "cli", *_conn(env)) == 0
    assert "count" in capsys.readouterr().out
    assert await lhv("stats", "no-such", *_conn(env)) == cli.EXIT_REFUSED
    assert "lhv stats: index_not_found: index 'no-such' does not exist" in capsys.readouterr().err


async def test_cli_load_exits_non_zero_naming_the_batches_that_failed(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = served.env
    data = vecs(50, 4, 12)
    # an id over the worker's limit (LHV_MAX_ID_BYTES), which only the worker checks:
    # its batch is rejected whole
    ids = [f"r{i}" if i not in (23, 41) else "x" * 600 for i in range(50)]
    with (tmp_path / "bad.jsonl").open("w") as f:
        for id_, row in zip(ids, data, strict=True):
            f.write(json.dumps({"id": id_, "vector": row.tolist()}) + "\n")
    argv = ["load", "bad", str(tmp_path / "bad.jsonl"), "--create", "--space", "cosine",
            "--batch-size", "10", "--no-progress", "--bootstrap-servers", env.bootstrap,
            *_conn(env)]  # fmt: skip
    assert await asyncio.to_thread(cli.main, argv) == 1
    captured = capsys.readouterr()
    assert "loaded 30 of 50 rows" in captured.out
    assert "REJECTED batch 2 (lines 21..30)" in captured.err  # .jsonl: 1-based lines
    assert "REJECTED batch 4 (lines 41..50)" in captured.err
    assert "2 of 5 batches rejected: not applied" in captured.err
    stats = await served.client.stats("bad")
    assert stats["count"] == 30


async def test_deeply_nested_requests_are_invalid_and_the_worker_answers_what_follows(
    served: Served,
) -> None:
    env = served.env
    name = served.index_on(0, "deep")
    await served.client.create(name, dim=2, space="l2")
    topic = await reply_topic(env.bootstrap)
    deep = b'{"a":' * 300 + b"1" + b"}" * 300  # deeper than orjson can write back
    async with RawRequester(env.bootstrap, topic) as raw:
        key = name.encode()
        commands = [
            (b"deep-add", b'{"op":"add","index":"%s","items":[{"id":"a","vector":[1,0],'
             b'"metadata":%s}]}' % (key, deep)),
            (b"huge-hint", orjson.dumps(
                {"op": "create", "index": f"{name}-b", "dim": 2, "max_elements_hint": 5_000_000}
            )),
            (b"good-add", orjson.dumps(
                {"op": "add", "index": name, "items": [{"id": "b", "vector": [0, 1]}]}
            )),
        ]  # fmt: skip
        for cid, value in commands:
            cmd_key = orjson.loads(value)["index"].encode() if cid == b"huge-hint" else key
            await raw.send(env.topics.commands, cmd_key, value, raw.headers(cid))
        acks = {cid: orjson.loads((await raw.reply(cid)).value) for cid, _ in commands}
        for cid in (b"deep-add", b"huge-hint"):
            assert acks[cid]["status"] == "error", cid
            assert acks[cid]["error"]["code"] == "invalid_request", acks[cid]
        assert "items[0].metadata" in acks[b"deep-add"]["error"]["message"]
        assert "max_json_depth" in acks[b"deep-add"]["error"]["message"]
        assert "max_elements_hint 5000000" in acks[b"huge-hint"]["error"]["message"]
        assert acks[b"good-add"]["status"] == "ok" and acks[b"good-add"]["applied"] == 1
        after = acks[b"good-add"]["offset"]

        # a deep filter and good searches sent with it: the bad one is refused alone
        search = {"index": name, "vector": [0, 1], "k": 5, "min_offset": after}
        await raw.send(
            env.topics.search,
            key,
            b'{"index":"%s","vector":[0,1],"filter":%s}' % (key, deep),
            raw.headers(b"deep-search"),
        )
        await raw.send(env.topics.search, key, search, raw.headers(b"good-search"))
        bad = orjson.loads((await raw.reply(b"deep-search")).value)
        assert bad["status"] == "error" and bad["error"]["code"] == "invalid_request"
        assert "filter" in bad["error"]["message"] and "32" in bad["error"]["message"]
        good = orjson.loads((await raw.reply(b"good-search")).value)
        assert good["status"] == "ok" and [h["id"] for h in good["hits"]] == ["b"]
    # the worker is up and still serves the partition, by client and by command
    hits = await served.client.search(name, np.array([0, 1], "f4"), k=5)
    assert [h.id for h in hits] == ["b"]
    assert (await served.client.stats(name))["count"] == 1
