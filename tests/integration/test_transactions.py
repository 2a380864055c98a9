"""Commands from transactional producers (Spring's `KafkaTemplate.executeInTransaction`,
any client with a `transactional.id`): workers read `read_committed`.

An aborted transaction's writes are never applied or acked; a committed one's are, in log
order; records behind a transaction still open wait for it without the partition being
taken for stalled; a log that ends in a transaction marker is caught up (serving after a
takeover and on a read replica, checkpointed up to the marker, a warm standby without
lag), though no record comes to apply at that offset. `lhv replay` reads the log the same
way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from workerkit import (
    Env,
    checkpoints_at_log_end,
    create_topics,
    end_offsets,
    make_env,
    read_all,
    running,
    stop_quietly,
    vec_b64,
    wait_caught_up,
)

from worker.client import LhvClient
from worker.ops.tools import replay_verify
from worker.service import Worker
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC

pytestmark = pytest.mark.asyncio(loop_scope="session")

DIM = 8


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=1)


@pytest.fixture
async def txn(env: Env) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, transactional_id=f"lhv-test-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def add_value(index: str, id_: str) -> bytes:
    vector = np.random.default_rng(abs(hash(id_)) % 2**32).standard_normal(DIM)
    item = {"id": id_, "vector_b64": vec_b64(vector.astype(np.float32))}
    return orjson.dumps({"op": "add", "index": index, "items": [item]})


async def send(
    producer: AIOKafkaProducer, env: Env, value: bytes, *, reply_topic: str, cid: bytes
) -> None:
    """One command in the producer's open transaction, asking for an ack (Spring)."""
    headers = [(REPLY_TOPIC, reply_topic.encode()), (CORRELATION_ID, cid)]
    await producer.send_and_wait(env.topics.commands, key=b"tx", value=value, headers=headers)


async def acked(env: Env, reply_topic: str, *, expect: int, timeout_s: float = 30.0) -> set[bytes]:
    """The correlation ids acked on `reply_topic` once `expect` acks arrived."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(reply_topic, 0)])
        seen: set[bytes] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < expect:
            assert time.monotonic() < deadline, f"only {len(seen)} of {expect} acks came"
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                seen.update(dict(r.headers)[CORRELATION_ID] for r in recs)
        return seen
    finally:
        await stop_quietly(consumer)


async def ids_of(client: LhvClient, ids: list[str]) -> list[str]:
    items = await client.get("tx", ids, include_vectors=False, timeout_s=10)
    return [it["id"] for it in items]


async def test_aborted_writes_are_never_applied_or_acked(env: Env, txn: AIOKafkaProducer) -> None:
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    async with running(env.config()) as worker, LhvClient(env.bootstrap, topics=env.topics) as c:
        await c.create("tx", dim=DIM)
        async with txn.transaction():
            await send(txn, env, add_value("tx", "kept"), reply_topic=reply_topic, cid=b"kept")
        await txn.begin_transaction()
        await send(txn, env, add_value("tx", "void"), reply_topic=reply_topic, cid=b"void")
        delete = orjson.dumps({"op": "delete", "index": "tx", "ids": ["kept"]})
        await send(txn, env, delete, reply_topic=reply_topic, cid=b"void-delete")
        await txn.abort_transaction()
        async with txn.transaction():
            await send(txn, env, add_value("tx", "later"), reply_topic=reply_topic, cid=b"later")
        plain = await c.add("tx", ["plain"], np.ones((1, DIM), np.float32), ack=True)

        assert await ids_of(c, ["kept", "void", "later", "plain"]) == ["kept", "later", "plain"]
        assert await acked(env, reply_topic, expect=2) == {b"kept", b"later"}
        await wait_caught_up([worker], env.bootstrap, env.topics.commands, timeout_s=30)
        assert await read_all(env.bootstrap, env.topics.dlq) == []
        assert worker.partitions[0].applied_offset >= plain.offset
    await _replay_agrees(env)


async def test_records_behind_an_open_transaction_wait_without_a_stall(
    env: Env, txn: AIOKafkaProducer, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka holds every record after an open transaction's first one back from a
    `read_committed` consumer (the last stable offset). The partition is not lagging
    meanwhile: with a stall timeout of 1 s, 4 s of an open transaction would otherwise make
    the worker exit to be restarted. What is held back is a metric, and, past the stall
    timeout, a warning naming the transaction's first offset."""
    config = env.config(stall_timeout_s=1.0)
    async with running(config) as worker, LhvClient(env.bootstrap, topics=env.topics) as c:
        await c.create("tx", dim=DIM)
        await txn.begin_transaction()
        first = await txn.send_and_wait(
            env.topics.commands, key=b"tx", value=add_value("tx", "in-txn")
        )
        after = await c.add("tx", ["after"], np.ones((1, DIM), np.float32))
        await asyncio.sleep(4)
        assert worker.health.stalled() == {}
        assert await ids_of(c, ["in-txn", "after"]) == []
        assert worker.partitions[0].status.value == "serving"
        assert held_back(worker) == after.offset - first.offset + 1
        warned = [r for r in caplog.records if "wait behind a transaction" in r.getMessage()]
        where = [
            (r.levelname, getattr(r, "partition", None), getattr(r, "offset", None)) for r in warned
        ]
        assert where == [("WARNING", 0, first.offset)]
        await txn.commit_transaction()
        items = await c.get("tx", ["in-txn", "after"], include_vectors=False, after=after)
        assert [it["id"] for it in items] == ["in-txn", "after"]  # the worker polls on
        await wait_caught_up([worker], env.bootstrap, env.topics.commands, timeout_s=30)
        deadline = time.monotonic() + 10
        while held_back(worker) != 0:
            assert time.monotonic() < deadline, "records still held back after the commit"
            await asyncio.sleep(0.1)


def held_back(worker: Worker) -> float:
    sample = worker.metrics.registry.get_sample_value("lhv_records_held_back", {"partition": "0"})
    return sample if sample is not None else -1.0


async def test_a_log_ending_in_a_transaction_marker_is_caught_up(
    env: Env, txn: AIOKafkaProducer
) -> None:
    """The commit marker takes the last offset, and no record comes to apply at it: the
    worker is caught up all the same, its checkpoint covers the marker, the warm standby
    on the other worker has no lag, and a worker taking the partition over, like a read
    replica, serves at once (it would otherwise wait for a record past the marker)."""
    config = env.config(standby_replicas=1)
    async with (
        running(config) as first,
        running(config) as second,
        LhvClient(env.bootstrap, topics=env.topics) as c,
    ):
        await c.create("tx", dim=DIM)
        async with txn.transaction():
            await txn.send_and_wait(env.topics.commands, key=b"tx", value=add_value("tx", "last"))
        end = (await end_offsets(env.bootstrap, env.topics.commands))[0]
        await wait_caught_up([first, second], env.bootstrap, env.topics.commands)
        owner, holder = (first, second) if 0 in first.partitions else (second, first)
        assert owner.partitions[0].applied_offset == end - 1
        restored = await checkpoints_at_log_end(env, timeout_s=30)
        assert restored["tx"].get(["last"])[0].id == "last"
        await _standby_lag_zero(holder)
    at_replicas = replace(env.topics, search=env.topics.replica_search)
    async with (
        running(env.config()) as taker,
        running(env.config(role="replica")) as replica,
        LhvClient(env.bootstrap, topics=env.topics) as c,
        LhvClient(env.bootstrap, topics=at_replicas) as r,
    ):
        assert await ids_of(c, ["last"]) == ["last"]
        assert taker.partitions[0].applied_offset == end - 1
        assert await ids_of(r, ["last"]) == ["last"]
        assert replica.partitions[0].applied_offset == end - 1
    await _replay_agrees(env)


async def _replay_agrees(env: Env) -> None:
    """`lhv replay --verify` rebuilds the partition from the log as the worker read it
    (the aborted writes left out, up to a manifest offset that may be a marker's) and
    finds the snapshot equal."""
    async with S3BlobStore(env.s3) as blobs:
        replay = await replay_verify(env.config(), blobs, timeout_s=20)
    assert replay.consistent, (replay.diffs, replay.errors)
    assert replay.compared == ["tx"]


async def _standby_lag_zero(worker: Worker, timeout_s: float = 30.0) -> None:
    assert worker.standbys is not None
    deadline = time.monotonic() + timeout_s
    while worker.standbys.lags() != {0: 0}:
        assert time.monotonic() < deadline, f"standby lags {worker.standbys.lags()}"
        await asyncio.sleep(0.2)
