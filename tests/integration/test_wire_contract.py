"""The wire contract of DESIGN.md as a producer in another language sees it: commands and
queries produced as raw JSON with Spring reply headers, acks and replies read with a plain
consumer, each checked field by field against what the contract promises.

One worker serves the whole module; each test uses its own indexes.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from workerkit import Env, create_topics, end_offsets, make_env, running, stop_quietly

from worker.service import Worker
from worker.service.partition import PartitionStatus
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import Manifest, SnapshotStore
from worker.wire.headers import CORRELATION_ID, REPLY_PARTITION, REPLY_TOPIC
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Wire:
    """Commands and queries produced by hand with reply headers; acks and replies read
    from a reply topic of our own, matched on the kafka_correlationId header."""

    def __init__(self, env: Env, reply_topic: str) -> None:
        self.env = env
        self.reply_topic = reply_topic
        self.producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
        self.consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, enable_auto_commit=False)
        self.records: dict[bytes, Any] = {}

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        parts = await self.producer.partitions_for(self.reply_topic)
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)

    async def stop(self) -> None:
        await self.producer.stop()
        await stop_quietly(self.consumer)

    async def _ask(
        self,
        topic: str,
        index: str,
        body: dict[str, Any],
        key: str | None,
        partition: int | None = None,
        reply_partition: int | None = None,
    ) -> Any:
        cid = uuid.uuid4().hex.encode()
        headers = [(REPLY_TOPIC, self.reply_topic.encode()), (CORRELATION_ID, cid)]
        if reply_partition is not None:
            headers.append((REPLY_PARTITION, struct.pack(">i", reply_partition)))
        meta = await self.producer.send_and_wait(
            topic,
            key=(index if key is None else key).encode(),
            value=orjson.dumps({"index": index, **body}),
            headers=headers,
            partition=partition,
        )
        rec = await self.reply(cid)
        assert rec.key == cid and dict(rec.headers)[CORRELATION_ID] == cid
        if reply_partition is not None:
            assert rec.partition == reply_partition
        reply = orjson.loads(rec.value)
        assert reply["correlation_id"] == cid.decode()
        return meta.offset, reply

    async def command(
        self,
        index: str,
        body: dict[str, Any],
        *,
        key: str | None = None,
        partition: int | None = None,
        reply_partition: int | None = None,
    ) -> Any:
        """The ack of `body` on the commands topic; its `offset` checked against the
        record's own."""
        topic = self.env.topics.commands
        offset, ack = await self._ask(topic, index, body, key, partition, reply_partition)
        assert ack["offset"] == offset
        return ack

    async def query(self, index: str, body: dict[str, Any]) -> Any:
        return (await self._ask(self.env.topics.search, index, body, None))[1]

    async def reply(self, cid: bytes, *, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while cid not in self.records:
            assert time.monotonic() < deadline, f"no reply for {cid!r}"
            batch = await self.consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                for rec in recs:
                    self.records[dict(rec.headers)[CORRELATION_ID]] = rec
        return self.records[cid]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def wire(bootstrap_servers: str, s3_config: S3Config) -> AsyncIterator[Wire]:
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    topic = f"lhv.replies.contract-{uuid.uuid4().hex[:10]}"
    await create_topics(bootstrap_servers, [topic], 2)
    async with running(env.config(query_wait_ms=5_000)) as worker:
        await _serving(worker, env.partitions)
        w = Wire(env, topic)
        await w.start()
        try:
            yield w
        finally:
            await w.stop()


async def _serving(worker: Worker, partitions: int) -> None:
    for _ in range(300):  # the group has formed and every partition serves
        if len(worker.partitions) == partitions and all(
            p.status is PartitionStatus.SERVING for p in worker.partitions.values()
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker never served every partition")


def b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def get_one(wire: Wire, name: str, id_: str, after: int, **flags: Any) -> Any:
    reply = await wire.query(name, {"op": "get", "ids": [id_], "min_offset": after, **flags})
    assert reply["status"] == "ok", reply
    return reply["items"][0] if reply["items"] else None


# -- commands and acks ---------------------------------------------------------------------------


async def test_every_ack_names_its_record_and_echoes_the_request_id(wire: Wire) -> None:
    name = fresh("ack")
    ack = await wire.command(name, {"op": "create", "dim": 2, "space": "l2", "request_id": "r1"})
    assert ack["status"] == "ok" and ack["request_id"] == "r1" and "error" not in ack
    assert isinstance(ack["applied"], int) and isinstance(ack["skipped"], int)
    item = {"id": "a", "vector": [1, 0]}
    ack = await wire.command(name, {"op": "add", "items": [item], "request_id": "r2"})
    assert (ack["status"], ack["applied"], ack["skipped"], ack["request_id"]) == ("ok", 1, 0, "r2")
    again = await wire.command(name, {"op": "add", "items": [{"id": "a", "vector": [0, 1]}]})
    assert (again["applied"], again["skipped"]) == (1, 0)  # no versions: the later one wins
    bad = await wire.command(name, {"op": "add", "items": [{"id": "b", "vector": [1]}]})
    assert bad["status"] == "error" and bad["error"]["code"] == "dim_mismatch"
    assert bad["error"]["message"]


async def test_create_with_the_defaults_spelled_out_is_a_no_op_other_params_are_index_exists(
    wire: Wire,
) -> None:
    name = fresh("create")
    first = await wire.command(name, {"op": "create", "dim": 4, "space": "l2"})
    assert first["status"] == "ok"
    stats = await wire.query(name, {"op": "stats"})
    assert stats["engine"] == "hnsw"  # the default engine
    spelled = {"op": "create", "dim": 4, "space": "l2", **stats["params"]}
    spelled.update(engine="hnsw", dim=4, space="l2")
    same = await wire.command(name, spelled)
    assert same["status"] == "ok", same
    other = await wire.command(name, {"op": "create", "dim": 4, "space": "l2", "M": 32})
    assert other["status"] == "error" and other["error"]["code"] == "index_exists"


async def test_stats_replies_every_field_the_contract_names(wire: Wire) -> None:
    name = fresh("stats")
    await wire.command(name, {"op": "create", "dim": 3, "space": "cosine", "engine": "exact"})
    items = [{"id": str(i), "vector": [1, i, 0]} for i in range(3)]
    await wire.command(name, {"op": "add", "items": items})
    ack = await wire.command(name, {"op": "delete", "ids": ["0"]})
    stats = await wire.query(name, {"op": "stats", "min_offset": ack["offset"]})
    assert stats["status"] == "ok" and stats["index"] == name
    assert (stats["count"], stats["deleted"], stats["dim"]) == (2, 1, 3)
    assert (stats["space"], stats["engine"]) == ("cosine", "exact")
    assert isinstance(stats["params"], dict)
    assert stats["applied_offset"] >= ack["offset"]
    assert stats["checkpoint_offset"] is None or isinstance(stats["checkpoint_offset"], int)
    assert isinstance(stats["took_ms"], (int, float)) and stats["took_ms"] >= 0


async def test_an_invalid_item_rejects_the_whole_add(wire: Wire) -> None:
    name = fresh("whole")
    await wire.command(name, {"op": "create", "dim": 2, "space": "cosine"})
    cases = {
        "dim_mismatch": {"id": "bad", "vector": [1, 2, 3]},
        "invalid_request": {"id": "bad", "vector": [0, 0]},  # zero vector under cosine
    }
    for code, bad in cases.items():
        good = {"id": f"good-{code}", "vector": [1, 0]}
        ack = await wire.command(name, {"op": "add", "items": [good, bad]})
        assert ack["status"] == "error" and ack["error"]["code"] == code, ack
        assert ack["error"]["item"] == 1
        assert await get_one(wire, name, f"good-{code}", ack["offset"]) is None
    nan = await wire.command(
        name, {"op": "add", "items": [{"id": "n", "vector_b64": b64([1, np.nan])}]}
    )
    assert nan["status"] == "error" and nan["error"]["code"] == "invalid_request"
    unknown = await wire.command(
        fresh("nope"), {"op": "add", "items": [{"id": "a", "vector": [1, 0]}]}
    )
    assert unknown["error"]["code"] == "index_not_found"


async def test_a_command_whose_index_differs_from_its_key_is_invalid(wire: Wire) -> None:
    name = fresh("key")
    await wire.command(name, {"op": "create", "dim": 2})
    home = home_partition(name.encode(), wire.env.partitions)
    other = next(  # a key with the same home: the record is ordered with the index's
        key
        for key in (f"{name}-{i}" for i in range(1_000))
        if home_partition(key.encode(), wire.env.partitions) == home
    )
    ack = await wire.command(name, {"op": "drop"}, key=other)
    assert ack["status"] == "error" and ack["error"]["code"] == "invalid_request"
    stats = await wire.query(name, {"op": "stats", "min_offset": ack["offset"]})
    assert stats["status"] == "ok"


async def test_a_command_on_another_partition_than_its_index_home_is_refused_wrong_partition(
    wire: Wire,
) -> None:
    name = fresh("home")
    home = home_partition(name.encode(), wire.env.partitions)
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})
    item = {"id": "a", "vector": [1, 0]}
    ack = await wire.command(name, {"op": "add", "items": [item]}, partition=1 - home)
    assert ack["status"] == "error" and ack["error"]["code"] == "wrong_partition"
    got = await wire.query(name, {"op": "get", "ids": ["a"]})
    assert got["status"] == "ok" and got["items"] == []


async def test_acks_go_to_the_reply_partition_the_command_names(wire: Wire) -> None:
    name = fresh("rp")
    for partition in (1, 0):
        ack = await wire.command(
            name, {"op": "create", "dim": 2, "space": "l2"}, reply_partition=partition
        )
        assert ack["status"] == "ok"


async def test_index_names_and_dims_past_the_limits_are_invalid_requests(wire: Wire) -> None:
    longest = "n" + uuid.uuid4().hex + "x" * 95  # 128 characters
    assert len(longest) == 128
    ok = await wire.command(longest, {"op": "create", "dim": 2, "space": "l2"})
    assert ok["status"] == "ok", ok
    too_long = longest + "y"
    refused = await wire.command(too_long, {"op": "create", "dim": 2, "space": "l2"})
    assert refused["status"] == "error" and refused["error"]["code"] == "invalid_request"
    for bad in ("-leading-dash", "has/slash", "ünïcode"):
        ack = await wire.command(bad, {"op": "create", "dim": 2})
        assert ack["error"]["code"] == "invalid_request", bad
    huge = await wire.command(fresh("dim"), {"op": "create", "dim": 1_000_000})
    assert huge["error"]["code"] == "invalid_request"


async def test_drop_removes_the_index_and_a_new_create_starts_empty(wire: Wire) -> None:
    name = fresh("drop")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})
    await wire.command(name, {"op": "add", "items": [{"id": "a", "vector": [1, 0]}]})
    dropped = await wire.command(name, {"op": "drop"})
    assert dropped["status"] == "ok"
    gone = await wire.query(name, {"vector": [1, 0], "min_offset": dropped["offset"]})
    assert gone["status"] == "error" and gone["error"]["code"] == "index_not_found"
    again = await wire.command(name, {"op": "create", "dim": 3, "space": "ip"})
    assert again["status"] == "ok"
    stats = await wire.query(name, {"op": "stats", "min_offset": again["offset"]})
    assert (stats["count"], stats["dim"], stats["space"]) == (0, 3, "ip")


async def _manifest(env: Env, partition: int) -> Manifest | None:
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        return (await store.read_manifest(partition))[0]


async def _stored_keys(env: Env) -> set[str]:
    async with S3BlobStore(env.s3) as blobs:
        return set(await blobs.list(""))


async def test_a_dropped_index_loses_its_snapshots_at_the_next_checkpoint_and_stays_dropped(
    bootstrap_servers: str, s3_config: S3Config
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=1)
    topic = f"lhv.replies.contract-{uuid.uuid4().hex[:10]}"
    await create_topics(bootstrap_servers, [topic], 1)
    name, keep = "dropped", "kept"
    assert home_partition(name.encode(), 1) == 0
    wire = Wire(env, topic)
    await wire.start()
    try:
        async with running(env.config()) as worker:
            await _serving(worker, 1)
            for index in (name, keep):
                await wire.command(index, {"op": "create", "dim": 2, "space": "l2"})
                await wire.command(index, {"op": "add", "items": [{"id": "a", "vector": [1, 0]}]})
            named: tuple[str, ...] = ()
            for _ in range(300):  # a checkpoint names both indexes
                manifest = await _manifest(env, 0)
                if manifest is not None and {name, keep} <= set(manifest.indexes):
                    named = manifest.indexes[name].keys
                    break
                await asyncio.sleep(0.1)
            assert named, "no checkpoint named the index"
            assert set(named) <= await _stored_keys(env)
            dropped = await wire.command(name, {"op": "drop"})
            assert dropped["status"] == "ok"
            for _ in range(300):  # the next checkpoint covers the drop
                manifest = await _manifest(env, 0)
                if manifest is not None and manifest.offset >= dropped["offset"]:
                    break
                await asyncio.sleep(0.1)
            assert manifest is not None and name not in manifest.indexes
            assert keep in manifest.indexes
            for _ in range(300):  # its objects are collected
                if not set(named) & await _stored_keys(env):
                    break
                await asyncio.sleep(0.1)
            assert not set(named) & await _stored_keys(env)
        async with running(env.config()) as worker:  # a restore does not bring it back
            await _serving(worker, 1)
            gone = await wire.query(name, {"op": "stats"})
            assert gone["status"] == "error" and gone["error"]["code"] == "index_not_found"
            kept = await wire.query(keep, {"op": "get", "ids": ["a"]})
            assert [it["id"] for it in kept["items"]] == ["a"]
    finally:
        await wire.stop()


# -- metadata, vectors, versions ------------------------------------------------------------------


async def test_metadata_absent_or_null_keeps_empty_object_clears_object_replaces(
    wire: Wire,
) -> None:
    name = fresh("meta")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})

    async def put(**extra: Any) -> Any:
        ack = await wire.command(
            name, {"op": "add", "items": [{"id": "a", "vector": [1, 0], **extra}]}
        )
        item = await get_one(wire, name, "a", ack["offset"])
        return item["metadata"]

    assert await put(metadata={"x": 1, "y": 2}) == {"x": 1, "y": 2}
    assert await put() == {"x": 1, "y": 2}
    assert await put(metadata=None) == {"x": 1, "y": 2}
    assert await put(metadata={"z": 3}) == {"z": 3}  # replaced, not merged
    assert await put(metadata={}) in (None, {})


async def test_get_returns_vectors_as_stored_in_json_or_b64_and_only_live_ids_in_order(
    wire: Wire,
) -> None:
    name = fresh("get")
    await wire.command(name, {"op": "create", "dim": 3, "space": "cosine"})
    stored = [3.0, 4.0, 0.5]
    items = [
        {"id": "a", "vector_b64": b64(stored), "metadata": {"m": 1}, "version": 7},
        {"id": "b", "vector": [0, 1, 0]},
        {"id": "c", "vector": [1, 1, 1]},
    ]
    await wire.command(name, {"op": "add", "items": items})
    ack = await wire.command(name, {"op": "delete", "ids": ["c"]})
    ids = ["b", "c", "zz", "a"]
    got = await wire.query(name, {"op": "get", "ids": ids, "min_offset": ack["offset"]})
    assert got["status"] == "ok" and [it["id"] for it in got["items"]] == ["b", "a"]
    a = got["items"][1]
    assert a["vector"] == stored and a["metadata"] == {"m": 1} and a["version"] == 7
    enc = await wire.query(name, {"op": "get", "ids": ["a"], "vector_encoding": "b64"})
    assert "vector" not in enc["items"][0]
    raw = base64.b64decode(enc["items"][0]["vector_b64"])
    assert list(struct.unpack("<3f", raw)) == stored
    bare = await wire.query(
        name, {"op": "get", "ids": ["a"], "include_vectors": False, "include_metadata": False}
    )
    assert set(bare["items"][0]) <= {"id", "version"}


async def test_higher_versions_win_whatever_the_arrival_order_and_tombstones_hold(
    wire: Wire,
) -> None:
    name = fresh("lww")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})

    async def add(id_: str, vector: list[float], version: int) -> Any:
        item = {"id": id_, "vector": vector, "version": version}
        return await wire.command(name, {"op": "add", "items": [item]})

    await add("x", [1, 0], 5)
    late = await add("x", [0, 1], 3)  # a late retry of an older write
    assert (late["status"], late["applied"], late["skipped"]) == ("ok", 0, 1)
    assert (await get_one(wire, name, "x", late["offset"]))["vector"] == [1, 0]
    old_delete = await wire.command(name, {"op": "delete", "ids": ["x"], "version": 4})
    assert (old_delete["applied"], old_delete["skipped"]) == (0, 1)
    assert await get_one(wire, name, "x", old_delete["offset"]) is not None
    deleted = await wire.command(name, {"op": "delete", "ids": ["x", "never"], "version": 9})
    assert deleted["status"] == "ok"
    older = await add("x", [0, 1], 8)
    assert older["skipped"] == 1 and await get_one(wire, name, "x", older["offset"]) is None
    before_tombstone = await add("never", [0, 1], 2)  # its delete arrived first
    assert await get_one(wire, name, "never", before_tombstone["offset"]) is None
    tie = await add("x", [0, 1], 9)  # same version, later offset: the later record wins
    item = await get_one(wire, name, "x", tie["offset"])
    assert item is not None and item["vector"] == [0, 1] and item["version"] == 9


async def test_within_one_add_a_later_duplicate_id_wins(wire: Wire) -> None:
    name = fresh("dup")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})
    items = [{"id": "d", "vector": [1, 0]}, {"id": "d", "vector": [0, 1], "metadata": {"n": 2}}]
    ack = await wire.command(name, {"op": "add", "items": items})
    assert ack["status"] == "ok" and ack["applied"] + ack["skipped"] >= 1
    item = await get_one(wire, name, "d", ack["offset"])
    assert item["vector"] == [0, 1] and item["metadata"] == {"n": 2}


# -- search --------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["hnsw", "annoy", "exact"])
async def test_distances_follow_one_convention_for_every_engine(wire: Wire, engine: str) -> None:
    q = np.array([1.0, 2.0, 2.0], dtype=np.float32)
    v = np.array([2.0, 1.0, -1.0], dtype=np.float32)
    expected = {
        "cosine": 1 - float(q @ v) / float(np.linalg.norm(q) * np.linalg.norm(v)),
        "l2": float(((q - v) ** 2).sum()),
        "ip": 1 - float(q @ v),
    }
    for space, want in expected.items():
        name = fresh(f"dist-{engine}-{space}")
        await wire.command(name, {"op": "create", "dim": 3, "space": space, "engine": engine})
        ack = await wire.command(name, {"op": "add", "items": [{"id": "v", "vector": v.tolist()}]})
        reply = await wire.query(
            name, {"vector": q.tolist(), "k": 5, "min_offset": ack["offset"], "ef": 10}
        )
        assert reply["status"] == "ok" and reply["op"] == "search", reply
        assert [h["id"] for h in reply["hits"]] == ["v"]  # fewer than k: what there is
        assert reply["hits"][0]["distance"] == pytest.approx(want, abs=1e-5), space
        assert isinstance(reply["applied_offset"], int) and reply["applied_offset"] >= ack["offset"]


@pytest.mark.parametrize("engine", ["hnsw", "annoy", "exact"])
async def test_fewer_live_items_than_k_return_what_there_is_after_deletes(
    wire: Wire, engine: str
) -> None:
    name = fresh(f"few-{engine}")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2", "engine": engine})
    items = [{"id": str(i), "vector": [1, i], "metadata": {"even": i % 2 == 0}} for i in range(40)]
    await wire.command(name, {"op": "add", "items": items})
    ack = await wire.command(name, {"op": "delete", "ids": [str(i) for i in range(3, 40)]})
    reply = await wire.query(name, {"vector": [1, 0], "k": 10, "min_offset": ack["offset"]})
    assert reply["status"] == "ok" and [h["id"] for h in reply["hits"]] == ["0", "1", "2"]
    flt = await wire.query(name, {"vector": [1, 0], "k": 10, "filter": {"even": True}})
    assert [h["id"] for h in flt["hits"]] == ["0", "2"]


async def test_search_hits_carry_metadata_only_when_asked(wire: Wire) -> None:
    name = fresh("hits")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})
    items = [{"id": "a", "vector": [1, 0], "metadata": {"t": "x"}}, {"id": "b", "vector": [0, 1]}]
    ack = await wire.command(name, {"op": "add", "items": items})
    plain = await wire.query(name, {"vector": [1, 0], "k": 2, "min_offset": ack["offset"]})
    assert [set(h) for h in plain["hits"]] == [{"id", "distance"}] * 2
    rich = await wire.query(name, {"vector": [1, 0], "k": 2, "include_metadata": True})
    assert [h.get("metadata") for h in rich["hits"]] == [{"t": "x"}, None]
    by_b64 = await wire.query(name, {"vector_b64": b64([0, 1]), "k": 1})
    assert [h["id"] for h in by_b64["hits"]] == ["b"]


async def test_a_selective_filter_still_returns_k_matching_hits(wire: Wire) -> None:
    name = fresh("filter")
    await wire.command(name, {"op": "create", "dim": 8, "space": "l2", "M": 8})
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(2_000, 8)).astype(np.float32)
    items = [
        {
            "id": str(i),
            "vector": vectors[i].tolist(),
            "metadata": {"tag": "rare" if i % 200 == 0 else "common"},
        }
        for i in range(2_000)
    ]
    ack = await wire.command(name, {"op": "add", "items": items})
    reply = await wire.query(
        name,
        {
            "vector": vectors[1].tolist(),
            "k": 10,
            "filter": {"tag": "rare"},
            "include_metadata": True,
            "min_offset": ack["offset"],
        },
    )
    assert reply["status"] == "ok"
    assert sorted(int(h["id"]) for h in reply["hits"]) == list(range(0, 2_000, 200))


async def test_query_errors_use_the_contract_codes(wire: Wire) -> None:
    name = fresh("qerr")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})
    unknown = await wire.query(fresh("absent"), {"vector": [1, 0]})
    assert unknown["status"] == "error" and unknown["error"]["code"] == "index_not_found"
    assert unknown["error"]["message"] and "hits" not in unknown
    wrong_dim = await wire.query(name, {"vector": [1, 0, 0]})
    assert wrong_dim["error"]["code"] == "dim_mismatch"
    too_many = await wire.query(name, {"vector": [1, 0], "k": 10**6})
    assert too_many["error"]["code"] == "invalid_request"
    bad_name = await wire.query("../escape", {"vector": [1, 0]})
    assert bad_name["error"]["code"] == "invalid_request"


async def test_optional_fields_sent_as_null_are_read_as_absent(wire: Wire) -> None:
    name = fresh("nulls")
    created = await wire.command(
        name, {"op": "create", "dim": 2, "space": "l2", "M": None, "request_id": None}
    )
    assert created["status"] == "ok", created
    item = {"id": "a", "vector": [1, 0], "metadata": None, "version": None}
    ack = await wire.command(name, {"op": "add", "items": [item]})
    assert (ack["status"], ack["applied"]) == ("ok", 1)
    nulls = dict.fromkeys(("k", "ef", "filter", "include_metadata", "include_vectors"))
    reply = await wire.query(name, {"vector": [1, 0], "min_offset": ack["offset"], **nulls})
    assert reply["status"] == "ok" and reply["hits"] == [{"id": "a", "distance": 0.0}]
    got = await wire.query(name, {"op": "get", "ids": ["a"], "vector_encoding": None})
    assert got["items"] == [{"id": "a", "vector": [1.0, 0.0], "metadata": None, "version": 0}]
    deleted = await wire.command(name, {"op": "delete", "ids": ["a"], "version": None})
    assert (deleted["status"], deleted["applied"]) == ("ok", 1)


async def test_a_command_asking_its_ack_on_a_non_reply_topic_is_applied_and_nothing_is_written_there(
    wire: Wire,
) -> None:
    env = wire.env
    name = fresh("noack")
    await wire.command(name, {"op": "create", "dim": 2, "space": "l2"})
    before = await end_offsets(env.bootstrap, env.topics.commands)
    headers = [(REPLY_TOPIC, env.topics.commands.encode()), (CORRELATION_ID, b"loop")]
    item = {"id": "a", "vector": [1, 0]}
    meta = await wire.producer.send_and_wait(
        env.topics.commands,
        key=name.encode(),
        value=orjson.dumps({"op": "add", "index": name, "items": [item]}),
        headers=headers,
    )
    assert await get_one(wire, name, "a", meta.offset) is not None
    marker = await wire.command(name, {"op": "delete", "ids": ["zz"]})  # acked after it
    assert marker["offset"] == meta.offset + 1
    after = await end_offsets(env.bootstrap, env.topics.commands)
    before[meta.partition] += 2  # the add and the marker, nothing else
    assert after == before
