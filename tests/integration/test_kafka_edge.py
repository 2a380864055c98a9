"""No record can stop a worker at the Kafka edge, and outgoing records never poison each
other: records the Kafka client cannot parse, reply partitions that do not exist,
oversized DLQ records and replies, headers over the limits, stale replayed acks.

Each test shows the clear error (a DLQ record with its headers, a metric), the partition
still flowing (a good command after it is acked), the worker still up, and the final
state equal to the oracle of the readable records."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from workerkit import (
    Env,
    RawRecord,
    all_indexes,
    assert_state_matches,
    create_topics,
    index_names,
    make_env,
    oracle_from_records,
    produce_batch,
    read_all,
    read_readable,
    wait_caught_up,
)

from worker.client import LhvClient
from worker.client.client import stop_consumer as stop_quietly
from worker.service import Worker, inflate
from worker.service.config import DeliveryConfig, WorkerConfig
from worker.storage.blobstore import S3Config
from worker.wire.limits import MessageLimits
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

POISON_KEY = b"\xff\xfe-not-utf8"


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=2)


@contextlib.asynccontextmanager
async def up(config: WorkerConfig) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    """A running worker and its `run()` task (done = the worker exited)."""
    worker = Worker(config)
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        yield worker, task
    finally:
        worker.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await worker.stop()


def still_up(task: asyncio.Task[None]) -> None:
    if task.done():
        task.result()  # raises what ended it
        raise AssertionError("the worker's run() returned")


def metric(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def cmd(index: str, **body: Any) -> bytes:
    return orjson.dumps({"index": index, **body})


def add(index: str, *ids: str, dim: int = 4) -> bytes:
    items = [{"id": i, "vector": [float(n + 1), 1.0, 0.5, 0.25][:dim]} for n, i in enumerate(ids)]
    return cmd(index, op="add", items=items)


async def acked_add(env: Env, index: str, item: str) -> dict[str, Any]:
    """A good command after the bad one: its ack says it was applied."""
    async with LhvClient(env.bootstrap, topics=env.topics) as client:
        result = await client.add(index, [item], [[1.0, 2.0, 3.0, 4.0]], ack=True, timeout_s=60)
    assert result.ack is not None and result.ack["status"] == "ok", result.ack
    return result.ack


async def state_matches_oracle(env: Env, worker: Worker) -> None:
    await wait_caught_up([worker], env.bootstrap, env.topics.commands, timeout_s=60)
    records = await read_readable(env.bootstrap, env.topics.commands)
    assert_state_matches(all_indexes([worker]), oracle_from_records(records))


def one_index(env: Env) -> tuple[str, int]:
    name = index_names(1, env.partitions)[0]
    return name, home_partition(name.encode(), env.partitions)


def missing_index_on(env: Env, partition: int) -> str:
    """An index name that lives on `partition` and is never created."""
    for i in range(1000):
        name = f"missing-{i}"
        if home_partition(name.encode(), env.partitions) == partition:
            return name
    raise AssertionError("no name found")


async def dlq_by_source_offset(env: Env) -> dict[int, Any]:
    return {
        int(dict(r.headers)["lhv_source_offset"]): r
        for r in await read_all(env.bootstrap, env.topics.dlq)
    }


async def reply_topic(env: Env, partitions: int = 1) -> str:
    name = f"lhv.replies.test-{uuid.uuid4().hex[:10]}"
    await create_topics(env.bootstrap, [name], partitions)
    return name


class Replies:
    """Reads one reply topic from its end now."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.topic = topic
        self.seen: list[Any] = []

    async def __aenter__(self) -> Replies:
        await self.consumer.start()
        tp = TopicPartition(self.topic, 0)
        self.consumer.assign([tp])
        await self.consumer.seek_to_end(tp)
        await self.consumer.position(tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop_quietly(self.consumer)

    async def get(self, cid: bytes, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            for rec in self.seen:
                if dict(rec.headers).get("kafka_correlationId") == cid:
                    return dict(orjson.loads(rec.value))
            assert time.monotonic() < deadline, f"no reply for {cid!r}"
            for recs in (await self.consumer.getmany(timeout_ms=200)).values():
                self.seen.extend(recs)


def reply_headers(
    topic: str, cid: bytes, partition: int | None = None
) -> tuple[tuple[bytes, bytes], ...]:
    out = [(b"kafka_replyTopic", topic.encode()), (b"kafka_correlationId", cid)]
    if partition is not None:
        out.append((b"kafka_replyPartition", struct.pack(">i", partition)))
    return tuple(out)


# -- records the Kafka client cannot parse ------------------------------------------------------


async def test_a_command_with_a_non_utf8_header_key_is_dead_lettered_between_good_ones(
    env: Env,
) -> None:
    """Good records before and after the poison one in the same batch all apply; the
    poison record goes to the DLQ as `invalid_request`, built from its raw bytes."""
    name, home = one_index(env)
    async with up(env.config()) as (worker, task):
        await produce_batch(
            env.bootstrap,
            env.topics.commands,
            home,
            [RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2"))],
        )
        poison_value = add(name, "poisoned")
        offsets = await produce_batch(
            env.bootstrap,
            env.topics.commands,
            home,
            [
                RawRecord(name.encode(), add(name, "before")),
                RawRecord(name.encode(), poison_value, ((POISON_KEY, b"v"), (b"ok", b"w"))),
                RawRecord(name.encode(), add(name, "after")),
            ],
        )
        await acked_add(env, name, "later")
        await state_matches_oracle(env, worker)
        live = set(worker.partitions[home].indexes[name].logical_state()["live"])
        assert live == {"before", "after", "later"}
        await worker.flush_producer()
        dlq = (await dlq_by_source_offset(env))[offsets[1]]
        headers = dict(dlq.headers)
        assert headers["lhv_error_code"] == b"invalid_request"
        assert headers["lhv_error_message"] == b"record header keys are not UTF-8"
        assert dlq.value == poison_value and dlq.key == name.encode()
        assert headers["\\xff\\xfe-not-utf8"] == b"v" and headers["ok"] == b"w"
        assert metric(worker, "lhv_unreadable_records_total", topic="commands") == 1
        still_up(task)


async def test_a_worker_started_after_a_poison_record_stays_up_and_applies_what_follows(
    env: Env,
) -> None:
    """The crash-loop case: the poison record is already in the log (inside a gzip batch
    with good records around it) when the worker starts."""
    name, home = one_index(env)
    await produce_batch(
        env.bootstrap,
        env.topics.commands,
        home,
        [
            RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2")),
            RawRecord(name.encode(), add(name, "a")),
            RawRecord(name.encode(), add(name, "x"), ((POISON_KEY, b""),)),
            RawRecord(name.encode(), add(name, "b")),
        ],
        compression="gzip",
    )
    await produce_batch(
        env.bootstrap, env.topics.commands, home, [RawRecord(name.encode(), add(name, "c"))]
    )
    for _ in range(2):  # a second worker (a restart) passes the record as well
        async with up(env.config()) as (worker, task):
            await acked_add(env, name, "d")
            await state_matches_oracle(env, worker)
            assert set(worker.partitions[home].indexes[name].logical_state()["live"]) == {
                "a",
                "b",
                "c",
                "d",
            }
            still_up(task)
    dlq = await read_all(env.bootstrap, env.topics.dlq)
    assert {dict(r.headers)["lhv_error_message"] for r in dlq} == {
        b"record header keys are not UTF-8"
    }


async def test_a_query_with_a_non_utf8_header_key_is_skipped_and_the_next_is_answered(
    env: Env,
) -> None:
    name, home = one_index(env)
    replies_topic = await reply_topic(env)
    async with up(env.config()) as (worker, task), Replies(env.bootstrap, replies_topic) as replies:
        async with LhvClient(env.bootstrap, topics=env.topics) as client:
            await client.create(name, dim=4, space="l2")
            await client.add(name, ["a"], [[1.0, 0, 0, 0]], ack=True)
        query = cmd(name, op="stats")
        await produce_batch(
            env.bootstrap,
            env.topics.search,
            home,
            [
                RawRecord(
                    name.encode(), query, (*reply_headers(replies_topic, b"q1"), (POISON_KEY, b""))
                ),
                RawRecord(name.encode(), query, reply_headers(replies_topic, b"q2")),
            ],
        )
        reply = await replies.get(b"q2")
        assert reply["status"] == "ok" and reply["count"] == 1
        for _ in range(100):
            if metric(worker, "lhv_unreadable_records_total", topic="search"):
                break
            await asyncio.sleep(0.1)
        assert metric(worker, "lhv_unreadable_records_total", topic="search") == 1
        assert not any(dict(r.headers).get("kafka_correlationId") == b"q1" for r in replies.seen)
        await acked_add(env, name, "b")
        await state_matches_oracle(env, worker)
        still_up(task)


# -- acks, replies and DLQ records that cannot be sent as they are ------------------------------


async def test_an_ack_to_a_reply_partition_that_does_not_exist_is_dropped(env: Env) -> None:
    name, home = one_index(env)
    replies_topic = await reply_topic(env, partitions=1)
    async with up(env.config()) as (worker, task):
        await produce_batch(
            env.bootstrap,
            env.topics.commands,
            home,
            [
                RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2")),
                RawRecord(name.encode(), add(name, "a"), reply_headers(replies_topic, b"c7", 7)),
            ],
        )
        await acked_add(env, name, "b")
        assert metric(worker, "lhv_outgoing_dropped_total", kind="ack", reason="bad_partition") == 1
        await state_matches_oracle(env, worker)
        assert set(worker.partitions[home].indexes[name].logical_state()["live"]) == {"a", "b"}
        still_up(task)


async def test_acks_to_many_missing_reply_topics_do_not_hold_the_partition(env: Env) -> None:
    """Forty commands, each asking for its ack on a reply topic of its own that does not
    exist: the batch waits for their metadata once, not forty times 5 s, so a command
    after them is applied and acked while its producer still waits (60 s)."""
    name, home = one_index(env)
    records = [RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2"))]
    records += [
        RawRecord(
            name.encode(),
            add(name, f"i{i}"),
            reply_headers(f"lhv.replies.never-{uuid.uuid4().hex}", b"c%d" % i),
        )
        for i in range(40)
    ]
    async with up(env.config()) as (worker, task):
        await produce_batch(env.bootstrap, env.topics.commands, home, records)
        await acked_add(env, name, "after")
        assert metric(worker, "lhv_replies_dropped_total") == 40
        # aiokafka's producer no longer asks the broker about them at each refresh
        tracked = worker.outbox._producer.client._topics  # type: ignore[union-attr]
        assert not [t for t in tracked if t.startswith("lhv.replies.never-")]
        await state_matches_oracle(env, worker)
        still_up(task)


async def test_a_command_inflating_past_the_limits_is_dead_lettered_cut_to_fit(env: Env) -> None:
    """~20 KB of gzip on the wire that inflates to 20 MiB: rejected, and its DLQ record is
    cut to the outgoing bound with the original size and hash."""
    name, home = one_index(env)
    huge = cmd(name, op="add", items=[])[:-1] + b" " * (20 << 20) + b"}"
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, compression_type="gzip", max_request_size=32 << 20
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            env.topics.commands,
            key=name.encode(),
            value=cmd(name, op="create", dim=4, space="l2"),
            partition=home,
        )
        meta = await producer.send_and_wait(
            env.topics.commands, key=name.encode(), value=huge, partition=home
        )
    finally:
        await producer.stop()
    async with up(env.config()) as (worker, task):
        await acked_add(env, name, "b")
        await worker.flush_producer()
        dlq = (await dlq_by_source_offset(env))[meta.offset]
        headers = dict(dlq.headers)
        assert headers["lhv_error_code"] == b"invalid_request"
        assert b"over the limit" in headers["lhv_error_message"]
        assert headers["lhv_value_truncated"] == b"true"
        assert int(headers["lhv_original_value_bytes"]) == len(huge)
        assert headers["lhv_original_value_sha256"] == hashlib.sha256(huge).hexdigest().encode()
        assert huge.startswith(dlq.value) and 0 < len(dlq.value) < (1 << 20)
        assert metric(worker, "lhv_dlq_truncated_total") == 1
        await state_matches_oracle(env, worker)
        still_up(task)


@pytest.mark.parametrize("codec", ["gzip", "zstd", "lz4", "snappy"])
async def test_a_batch_inflating_past_the_bound_is_dead_lettered_without_being_inflated(
    env: Env, codec: str
) -> None:
    """A record of 16 MiB compressed to under 1 MiB (any codec Kafka has): the worker never
    inflates more than `max_inflated_batch_bytes`; the batch is dead-lettered, the good
    records around it (batches of their own, in the same codec) are applied."""
    name, home = one_index(env)
    bomb = cmd(name, op="add", items=[])[:-1] + b" " * (16 << 20) + b"}"
    producer = AIOKafkaProducer(
        bootstrap_servers=env.bootstrap, compression_type=codec, max_request_size=64 << 20
    )
    await producer.start()
    try:
        for value in (cmd(name, op="create", dim=4, space="l2"), bomb):
            meta = await producer.send_and_wait(
                env.topics.commands, key=name.encode(), value=value, partition=home
            )
        after = cmd(name, op="add", items=[{"id": "after", "vector": [1, 0, 0, 0]}])
        await producer.send_and_wait(
            env.topics.commands, key=name.encode(), value=after, partition=home
        )
    finally:
        await producer.stop()
    config = env.config(
        limits=MessageLimits(max_message_bytes=1 << 20), max_inflated_batch_bytes=2 << 20
    )
    try:
        async with up(config) as (worker, task):
            await acked_add(env, name, "b")
            await worker.flush_producer()
            dlq = (await dlq_by_source_offset(env))[meta.offset]
            headers = dict(dlq.headers)
            assert headers["lhv_error_code"] == b"invalid_request"
            assert f"inflates past {2 << 20} bytes".encode() in headers["lhv_error_message"]
            live = worker.partitions[home].indexes[name].logical_state()["live"]
            assert {"after", "b"} <= set(live)
            await state_matches_oracle(env, worker)
            still_up(task)
    finally:
        inflate.uninstall()  # process-wide: later tests get aiokafka's own again


async def test_a_dlq_record_the_broker_refuses_does_not_stop_later_ones(env: Env) -> None:
    """The DLQ topic accepts less than the worker was told (`max.message.bytes` of 100 kB
    against a 1 MiB bound): the broker refuses a 500 kB DLQ record, which is sent again
    without its value, and later DLQ records to the same partition still arrive (an
    idempotent producer would fail them all with OutOfOrderSequenceNumber)."""
    name, home = one_index(env)
    dlq_topic = f"{env.topics.dlq}.small"
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(dlq_topic, 1, 1, topic_configs={"max.message.bytes": "100000"})]
        )
    finally:
        await admin.close()
    from dataclasses import replace

    config = env.config(topics=replace(env.topics, dlq=dlq_topic))
    missing = missing_index_on(env, home)
    big_bad = add(missing, "x")[:-1] + b',"request_id":"' + b"r" * 500_000 + b'"}'
    async with up(config) as (worker, task):
        offsets = await produce_batch(
            env.bootstrap,
            env.topics.commands,
            home,
            [
                RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2")),
                RawRecord(missing.encode(), big_bad),
            ],
        )
        bad_after = await produce_batch(
            env.bootstrap,
            env.topics.commands,
            home,
            [RawRecord(missing.encode(), add(missing, "a"))],
        )
        await acked_add(env, name, "b")
        await worker.flush_producer()
        await worker.flush_producer()  # the resend of the refused record
        dlq = {
            int(dict(r.headers)["lhv_source_offset"]): r
            for r in await read_all(env.bootstrap, dlq_topic)
        }
        assert set(dlq) == {offsets[1], bad_after[0]}
        resent = dict(dlq[offsets[1]].headers)
        assert resent["lhv_value_truncated"] == b"true" and dlq[offsets[1]].value == b""
        assert int(resent["lhv_original_value_bytes"]) == len(big_bad)
        assert dict(dlq[bad_after[0]].headers)["lhv_error_code"] == b"index_not_found"
        assert metric(worker, "lhv_outgoing_dropped_total", kind="dlq", reason="too_large") >= 1
        await state_matches_oracle(env, worker)
        still_up(task)


async def test_a_reply_too_large_to_send_becomes_a_small_error_reply(env: Env) -> None:
    name, home = one_index(env)
    replies_topic = await reply_topic(env)
    config = env.config(
        delivery=DeliveryConfig(max_request_bytes=65_536, broker_max_message_bytes=65_536)
    )
    ids = [f"item-{i:04d}" for i in range(900)]  # under max_get_vectors
    async with up(config) as (worker, task), Replies(env.bootstrap, replies_topic) as replies:
        async with LhvClient(env.bootstrap, topics=env.topics) as client:
            await client.create(name, dim=4, space="l2")
            # the reply: ~100 KB of ids and vectors as JSON floats, over 64 KiB (metadata
            # this large would be refused before it is read: test_service_search.py)
            vectors = [[i + 0.123456789 * j for j in range(4)] for i in range(len(ids))]
            await client.add(name, ids, vectors, ack=True)
        await produce_batch(
            env.bootstrap,
            env.topics.search,
            home,
            [
                RawRecord(
                    name.encode(),
                    cmd(name, op="get", ids=ids),
                    reply_headers(replies_topic, b"big"),
                ),
                RawRecord(
                    name.encode(),
                    cmd(name, op="get", ids=ids[:2]),
                    reply_headers(replies_topic, b"small"),
                ),
            ],
        )
        big = await replies.get(b"big")
        assert big["status"] == "error" and big["error"]["code"] == "invalid_request"
        assert "ask for less" in big["error"]["message"] and big["index"] == name
        small = await replies.get(b"small")
        assert small["status"] == "ok" and len(small["items"]) == 2
        assert (
            metric(worker, "lhv_outgoing_dropped_total", kind="reply", reason="replaced_too_large")
            == 1
        )
        await acked_add(env, name, "z")
        await state_matches_oracle(env, worker)
        still_up(task)


# -- bounds on headers ---------------------------------------------------------------------------


async def test_correlation_ids_and_headers_over_the_limits_get_no_answer(env: Env) -> None:
    """A 400 KB correlation id: the command goes to the DLQ without an ack, the query is
    skipped (counted); too many headers, likewise. Normal ones go on being answered."""
    name, home = one_index(env)
    replies_topic = await reply_topic(env)
    long_cid = b"c" * 400_000
    many = tuple((f"h{i}".encode(), b"") for i in range(100))
    async with up(env.config()) as (worker, task), Replies(env.bootstrap, replies_topic) as replies:
        offsets = await produce_batch(
            env.bootstrap,
            env.topics.commands,
            home,
            [
                RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2")),
                RawRecord(name.encode(), add(name, "long"), reply_headers(replies_topic, long_cid)),
                RawRecord(
                    name.encode(), add(name, "many"), (*reply_headers(replies_topic, b"m"), *many)
                ),
                RawRecord(name.encode(), add(name, "fine"), reply_headers(replies_topic, b"fine")),
            ],
        )
        assert (await replies.get(b"fine"))["status"] == "ok"
        await produce_batch(
            env.bootstrap,
            env.topics.search,
            home,
            [
                RawRecord(
                    name.encode(), cmd(name, op="stats"), reply_headers(replies_topic, long_cid)
                ),
                RawRecord(
                    name.encode(),
                    cmd(name, op="stats"),
                    (*reply_headers(replies_topic, b"qm"), *many),
                ),
                RawRecord(name.encode(), cmd(name, op="stats"), reply_headers(replies_topic, b"q")),
            ],
        )
        assert (await replies.get(b"q"))["count"] == 1
        assert metric(worker, "lhv_records_refused_total", reason="headers_over_limits") == 2
        await worker.flush_producer()
        dlq = await dlq_by_source_offset(env)
        assert (
            b"kafka_correlationId of 400000 bytes"
            in dict(dlq[offsets[1]].headers)["lhv_error_message"]
        )
        assert (
            b"102 record headers are over the limit of 64"
            in (dict(dlq[offsets[2]].headers)["lhv_error_message"])
        )
        assert not any(
            dict(r.headers).get("kafka_correlationId") in (long_cid, b"m", b"qm")
            for r in replies.seen
        )
        await acked_add(env, name, "after")
        await wait_caught_up([worker], env.bootstrap, env.topics.commands)
        assert set(worker.partitions[home].indexes[name].logical_state()["live"]) == {
            "fine",
            "after",
        }
        still_up(task)


# -- replay ---------------------------------------------------------------------------------------


async def test_acks_of_old_records_replayed_after_a_restart_are_not_sent_again(env: Env) -> None:
    """Records from ten minutes ago asking for acks to a topic that is long gone: the
    replay applies them without a metadata wait or a warning per record."""
    name, home = one_index(env)
    old = int(time.time() * 1000) - 600_000
    gone = reply_headers("lhv.replies.gone-long-ago", b"x")
    records = [RawRecord(name.encode(), cmd(name, op="create", dim=4, space="l2"), gone, old)]
    records += [RawRecord(name.encode(), add(name, f"i{i}"), gone, old) for i in range(50)]
    await produce_batch(env.bootstrap, env.topics.commands, home, records)
    async with up(env.config()) as (worker, task):
        await acked_add(env, name, "new")  # acked after the replayed records were reported
        assert metric(worker, "lhv_acks_skipped_total") == len(records)
        assert metric(worker, "lhv_replies_dropped_total") == 0
        await state_matches_oracle(env, worker)
        still_up(task)
