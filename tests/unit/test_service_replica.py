"""Read replicas over the in-memory log and bucket: a replica applies every kind of
command with the owners' code and writes nothing (no object, no record, no commit), it
answers the replica search topic like an owner, and it restores again from the newest
manifest when a step's object is gone."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, _Shared, caught_up, eventually

from worker.service import Worker
from worker.wire.headers import PROTOCOL_MAC
from worker.wire.topics import home_partition

REPLICA_GROUP = "lhv.replicas"


class WriteRecorder(_Shared):
    """The shared bucket, with every write a worker attempts recorded (and done)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster.blobs)
        self.writes: list[tuple[str, str]] = []

    async def put(self, key: str, data: bytes, *args: Any, **kw: Any) -> Any:
        self.writes.append(("put", key))
        return await self._inner.put(key, data, *args, **kw)

    async def put_if_match(self, key: str, data: bytes, *args: Any, **kw: Any) -> Any:
        self.writes.append(("put_if_match", key))
        return await self._inner.put_if_match(key, data, *args, **kw)

    async def delete(self, key: str, *args: Any, **kw: Any) -> Any:
        self.writes.append(("delete", key))
        return await self._inner.delete(key, *args, **kw)


def _names() -> tuple[str, str, str]:
    """src and local on one partition of 2, dest on the other."""
    src = "src"
    p = home_partition(src.encode(), 2)
    names = [f"i{i}" for i in range(200)]
    local = next(n for n in names if home_partition(n.encode(), 2) == p)
    dest = next(n for n in names if home_partition(n.encode(), 2) != p)
    return src, local, dest


def _items(prefix: str, n: int, start: float = 0.0) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "vector": [1.0 + start, float(i)]} for i in range(n)]


def _op(value: bytes | None) -> str:
    return str(orjson.loads(value or b"{}").get("op", ""))


def _states(worker: Worker) -> dict[str, Any]:
    return {
        name: index.logical_state()
        for part in worker.partitions.values()
        for name, index in part.indexes.items()
    }


def _partition_states(worker: Worker) -> dict[int, Any]:
    """Per partition: the catalog, the forwarding marks and the members' shard counts."""
    return {
        p: (part.catalog, part.forwarded, part.members) for p, part in worker.partitions.items()
    }


def _every_command_kind(cluster: Cluster, src: str, local: str, dest: str) -> None:
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    for name in (src, local, dest):
        cluster.command(name, exact, reply=f"create-{name}".encode())
    cluster.command(src, {"op": "add", "items": _items("s", 6)}, reply=b"add")
    cluster.command(local, {"op": "add", "items": _items("l", 3, 5.0)})
    cluster.command(dest, {"op": "add", "items": _items("s", 1, 9.0)})
    cluster.command(src, {"op": "delete", "ids": ["s5"]}, reply=b"delete")
    cluster.command(src, {"op": "add", "items": [{"id": "bad", "vector": [1.0]}]}, reply=b"bad")
    cluster.command(dest, {"op": "drop"})
    cluster.command(dest, exact)
    cluster.command(dest, {"op": "add", "items": _items("s", 1, 9.0)})
    cluster.command(local, {"op": "merge", "dest": src}, reply=b"merge-local")
    cluster.command("sharded", {**exact, "shards": 2}, reply=b"sharded")
    cluster.command("sharded", {"op": "add", "items": _items("h", 8)}, reply=b"add-sharded")
    cluster.command("current", {"op": "alias", "target": "sharded"}, reply=b"alias")
    cluster.command("current", {"op": "add", "items": _items("a", 2, 3.0)})
    cluster.command(src, {"op": "merge", "dest": dest, "clear_source": True}, reply=b"merge")


async def test_a_replica_applies_every_command_kind_and_writes_nothing() -> None:
    cluster = Cluster(partitions=2)
    src, local, dest = _names()
    recorder = WriteRecorder(cluster)
    async with (
        cluster.worker("owner") as (owner, owner_kafka, _),
        cluster.worker("replica", role="replica", blobs=recorder) as (replica, replica_kafka, _),
    ):
        await owner_kafka.assign([0, 1])
        await replica_kafka.assign([0, 1])
        _every_command_kind(cluster, src, local, dest)
        await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
        await eventually(caught_up(cluster, owner), "the owner applied everything")
        await eventually(caught_up(cluster, replica), "the replica applied everything")

        assert _states(replica) == _states(owner)
        assert _partition_states(replica) == _partition_states(owner)
        assert len(_states(replica)[src]["live"]) == 0, "the merge cleared the source"
        assert recorder.writes == [], "a replica writes no object"
        signed = [
            (r.key, r.value)
            for p in range(2)
            for r in cluster.broker.records(TOPICS.commands, p)
            if PROTOCOL_MAC in dict(r.headers)
        ]
        ops = sorted(_op(value) for _, value in signed)
        assert ops.count("merge_in") == 1 and ops.count("merge_done") == 1
        assert len(signed) > 2, "the sharded index's members and the alias were forwarded to"
        assert len(set(signed)) == len(signed), "only the owner produced protocol records"
        assert len(cluster.broker.records(TOPICS.dlq)) == 1, "only the owner dead-letters"
        acks = [
            dict(r.headers).get("kafka_correlationId")
            for r in cluster.broker.records("lhv.replies.unit")
        ]
        assert len(acks) == len(set(acks)), "each ack was sent once, by the owner"
        replica_commits = [
            tp for group, tp, _ in cluster.broker.commit_history
            if group == REPLICA_GROUP and tp.topic == TOPICS.commands
        ]  # fmt: skip
        assert replica_commits == [], "a replica commits no command offset"
        assert not any(part.after_checkpoint for part in replica.partitions.values())


async def test_a_replica_restored_from_the_owners_manifests_has_the_owners_state() -> None:
    cluster = Cluster(partitions=2)
    src, local, dest = _names()
    async with cluster.worker("owner") as (owner, owner_kafka, _):
        await owner_kafka.assign([0, 1])
        _every_command_kind(cluster, src, local, dest)
        await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
        await eventually(caught_up(cluster, owner), "the owner applied everything")
        for part in list(owner.partitions.values()):
            assert await owner.ownership.checkpoint(part, reason="test")
        async with cluster.worker("replica", role="replica") as (replica, replica_kafka, _):
            await replica_kafka.assign([0, 1])
            await eventually(caught_up(cluster, replica), "the replica restored")
            assert all(part.checkpoint_offset >= 0 for part in replica.partitions.values())
            assert _states(replica) == _states(owner)
            assert _partition_states(replica) == _partition_states(owner)
            assert any(catalog for catalog, _, _ in _partition_states(replica).values())


async def test_a_replica_answers_its_topic_with_the_owners_hits_and_says_it_is_a_replica() -> None:
    cluster = Cluster(partitions=2)
    cluster.command("docs", {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    cluster.command("docs", {"op": "add", "items": _items("d", 20)})
    query = {"op": "search", "vector": [1.0, 3.2], "k": 5}
    async with (
        cluster.worker("owner") as (owner, owner_kafka, _),
        cluster.worker("replica", role="replica") as (replica, replica_kafka, _),
    ):
        await owner_kafka.assign([0, 1])
        await replica_kafka.assign([0, 1])
        await eventually(caught_up(cluster, owner), "the owner applied everything")
        await eventually(caught_up(cluster, replica), "the replica applied everything")
        cluster.query("docs", query, b"owner")
        cluster.query("docs", query, b"replica", topic=TOPICS.replica_search)
        cluster.query("docs", {"op": "stats"}, b"stats", topic=TOPICS.replica_search)
        await eventually(lambda: {b"owner", b"replica", b"stats"} <= set(cluster.replies()), "3")
        replies = cluster.replies()
        assert replies[b"replica"]["hits"] == replies[b"owner"]["hits"]
        assert replies[b"replica"]["applied_offset"] == replies[b"owner"]["applied_offset"]
        stats = replies[b"stats"]
        assert stats["role"] == "replica" and stats["worker"] == "replica"
        assert stats["lag"] == 0

        # read-your-writes through the replica: its answer waits for the write
        replica_kafka.pause(TopicPartition(TOPICS.commands, home_partition(b"docs", 2)))
        wrote = cluster.command("docs", {"op": "add", "items": [{"id": "new", "vector": [1, 3.2]}]})
        cluster.query(
            "docs", {**query, "k": 1, "min_offset": wrote}, b"ryw", topic=TOPICS.replica_search
        )
        await asyncio.sleep(0.3)  # the replica holds the query meanwhile
        assert b"ryw" not in cluster.replies(), "no stale answer before the write is applied"
        replica_kafka.resume(TopicPartition(TOPICS.commands, home_partition(b"docs", 2)))
        await eventually(lambda: b"ryw" in cluster.replies(), "the answer after the write")
        assert [h["id"] for h in cluster.replies()[b"ryw"]["hits"]] == ["new"]


async def test_a_replica_restores_again_when_a_merge_in_export_is_gone() -> None:
    cluster = Cluster(partitions=2)
    src, _local, dest = _names()
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    cluster.command(src, exact)
    cluster.command(dest, exact)
    cluster.command(src, {"op": "add", "items": _items("s", 4)})
    dest_tp = TopicPartition(TOPICS.commands, home_partition(dest.encode(), 2))
    async with (
        cluster.worker("owner") as (owner, owner_kafka, _),
        cluster.worker("replica", role="replica") as (replica, replica_kafka, _),
    ):
        await owner_kafka.assign([0, 1])
        await replica_kafka.assign([0, 1])
        await eventually(caught_up(cluster, replica), "the replica follows")
        assert replica.follower is not None
        first = replica.follower.restores_done
        replica_kafka.pause(dest_tp)  # the replica falls behind on dest's partition
        cluster.command(src, {"op": "merge", "dest": dest}, reply=b"merge")
        await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
        await eventually(
            lambda: not [k for k in cluster.blobs.objects if "merges/" in k],
            "the export collected by the owner",
            timeout_s=30,
        )
        replica_kafka.resume(dest_tp)
        await eventually(caught_up(cluster, owner), "the owner applied everything")
        await eventually(
            lambda: replica.follower is not None and replica.follower.restores_done > first,
            "the replica restored again from the newest manifest",
        )
        await eventually(caught_up(cluster, replica), "the replica caught up")
        assert _states(replica) == _states(owner)


async def test_a_replica_started_before_any_owner_verifies_the_owners_protocol_records() -> None:
    cluster = Cluster(partitions=2)
    src, _local, dest = _names()
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    async with cluster.worker("replica", role="replica", internal_key=None) as (replica, rk, _):
        await rk.assign([0, 1])  # no owner yet: no protocol key in the bucket
        async with cluster.worker("owner", internal_key=None) as (owner, owner_kafka, _):
            await owner_kafka.assign([0, 1])
            for name in (src, dest):
                cluster.command(name, exact)
            cluster.command(src, {"op": "add", "items": _items("s", 4)})
            cluster.command(src, {"op": "merge", "dest": dest}, reply=b"merge")
            await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
            await eventually(caught_up(cluster, owner), "the owner applied everything")
            await eventually(caught_up(cluster, replica), "the replica applied everything")
            assert _states(replica) == _states(owner)
            assert len(_states(replica)[dest]["live"]) == 4
