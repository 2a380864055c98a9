"""A worker over the in-memory log and store takes a partition over from the warm copy
it holds: no snapshot download, the state of a plain replay (sharded indexes, aliases and
merges included), the forwards and acks of what only the copy applied, and a next
checkpoint that covers what the copy applied past the manifest."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, _Shared, caught_up, eventually
from workerkit import all_indexes, assert_state_matches, oracle_from_records

from lhv_index import Limits
from worker.service import Worker
from worker.service import merge as merge_module
from worker.service.config import ImportPolicy
from worker.service.follower import ReadOnlyWrites
from worker.service.memory_kafka import MemoryClient, MemoryKafka
from worker.service.merge import MergeProtocol
from worker.service.standby import Standbys
from worker.service.warm import Warm, WarmCopy
from worker.storage.blobstore import S3Config
from worker.storage.snapshots import SnapshotStore
from worker.telemetry.metrics import Metrics
from worker.wire.limits import MessageLimits
from worker.wire.topics import home_partition

TP = TopicPartition(TOPICS.commands, 0)
KEY = "unit-test-internal-key-0123456789abcdef"


class _Reader:
    """`LogReader` over `MemoryKafka` (reads nothing while `held` is clear)."""

    def __init__(self, broker: MemoryKafka, tp: TopicPartition = TP) -> None:
        self._broker = broker
        self._position = 0
        self.held = asyncio.Event()
        self.held.set()
        TP = tp  # the partition this reader reads
        self._tp = TP

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def bounds(self) -> tuple[int, int]:
        return self._broker.log_start(self._tp), self._broker.log_end(self._tp)

    def seek(self, offset: int) -> None:
        self._position = offset

    async def position(self) -> int | None:
        return self._position

    def highwater(self) -> int | None:
        return self._broker.log_end(self._tp if hasattr(self, "_tp") else TP)

    async def read(self, *, timeout_ms: int, max_records: int) -> Sequence[Any]:
        if not self.held.is_set():
            await asyncio.sleep(0.01)
            return []
        records = self._broker.read(self._tp, self._position, max_records)
        if not records:
            await asyncio.sleep(0.01)
            return []
        self._position = records[-1].offset + 1
        return records


def _add(cluster: Cluster, ids: list[str], *, reply: bytes | None = None) -> int:
    vectors = np.random.default_rng(len(ids)).random((len(ids), 4)).tolist()
    items = [{"id": i, "vector": v} for i, v in zip(ids, vectors, strict=True)]
    return cluster.command("docs", {"op": "add", "items": items}, reply=reply)


class _Copies:
    """What a worker with `LHV_STANDBY_REPLICAS=1` builds: its `Standbys`, whose copies
    take the barrier steps read-only; the copies and their readers, for the tests."""

    def __init__(self, cluster: Cluster, worker: Worker, client: MemoryClient) -> None:
        self.store = SnapshotStore(cluster.blobs, topic=TOPICS.commands, worker_id="copy")
        self.steps = MergeProtocol(
            topics=TOPICS,
            registry=worker,
            kafka=client,
            blobs=cluster.blobs,
            tasks=worker.tasks,
            imports=ImportPolicy(),
            s3=S3Config(),
            internal_key=KEY,
            checkpoint_every_records=10**6,
            writes=ReadOnlyWrites(self.store),
        )
        self.readers: dict[int, _Reader] = {}
        self.copies: dict[int, WarmCopy] = {}
        self.standbys = Standbys(self._make, worker.metrics)
        worker.ownership._standbys = self.standbys
        self._cluster = cluster

    def _make(self, p: int, seed: Warm | None) -> WarmCopy:
        reader = _Reader(self._cluster.broker, TopicPartition(TOPICS.commands, p))
        self.readers[p] = reader
        self.copies[p] = WarmCopy(
            p,
            store=self.store,
            reader=reader,
            num_partitions=self._cluster.partitions,
            limits=MessageLimits(),
            index_limits=Limits(),
            steps=self.steps,
            seed=seed,
            retry_s=0.02,
            manifest_poll_s=0.02,
        )
        return self.copies[p]


async def _standbys(cluster: Cluster, worker: Worker, client: MemoryClient) -> Standbys:
    copies = _Copies(cluster, worker, client)
    await copies.steps.start()
    return copies.standbys


def _restores(metrics: Metrics, source: str) -> float:
    return metrics.registry.get_sample_value("lhv_restores_total", {"source": source}) or 0.0


async def test_a_partition_warm_here_is_promoted_with_no_download_and_acks_what_only_the_copy_applied() -> (
    None
):
    cluster = Cluster(partitions=1)
    cluster.command("docs", {"op": "create", "dim": 4, "space": "l2"})
    _add(cluster, ["a", "b"])
    async with cluster.worker("owner") as (owner, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        await client.assign([])  # checkpointed at offset 1, as an owner that died later
    late = _add(cluster, ["c", "d"], reply=b"late")  # the owner never saw it
    store = SnapshotStore(cluster.blobs, topic=TOPICS.commands, worker_id="copy")

    async with cluster.worker("survivor") as (survivor, client, _):
        standbys = await _standbys(cluster, survivor, client)
        survivor.ownership._standbys = standbys  # what LHV_STANDBY_REPLICAS=1 builds
        standbys.reconcile([0])
        await eventually(lambda: standbys.held() == {0: late}, "the copy applies the late add")
        await client.assign([0])
        await eventually(caught_up(cluster, survivor), "the survivor serves")
        assert _restores(survivor.metrics, "standby") == 1
        assert _restores(survivor.metrics, "snapshot") == 0
        partition = survivor.partitions[0]
        assert partition.applied_offset == late
        assert "docs" in partition.dirty  # changed past the manifest: the next checkpoint
        oracle = oracle_from_records(cluster.broker.records(TOPICS.commands, 0))
        assert_state_matches(all_indexes([survivor]), oracle)
        await eventually(lambda: b"late" in cluster.replies(), "the late add is acknowledged")
        assert cluster.replies()[b"late"]["status"] == "ok"
        assert await survivor.ownership.checkpoint(partition, reason="test")
        manifest, _ = await store.read_manifest(0)
        assert manifest is not None and manifest.offset == late
        restored = await store.load_index("docs", manifest.indexes["docs"])
        assert len(restored) == 4
        await standbys.stop()


def _states(worker: Worker) -> dict[int, Any]:
    """Per partition: each index's logical state, the catalog, the marks, the members."""
    return {
        p: (
            {name: index.logical_state() for name, index in part.indexes.items()},
            part.catalog,
            part.forwarded,
            part.members,
        )
        for p, part in worker.partitions.items()
    }


def _contents(worker: Worker) -> dict[int, Any]:
    """`_states` but what the order of forwards from two partitions into a third may
    change from one run to the next (the offsets they land at: items' clocks, marks):
    each index's live items (vector, metadata), the catalog, the marked origin
    partitions, the members."""
    return {
        p: (
            {
                name: {i: (v, m) for i, (v, m, _clock) in state["live"].items()}
                for name, state in indexes.items()
            },
            catalog,
            set(marks),
            members,
        )
        for p, (indexes, catalog, marks, members) in _states(worker).items()
    }


def _sharded_workload(cluster: Cluster, *, late: bool) -> None:
    """A sharded index with its home and members on the two partitions, and an alias to
    it; `late`: the plain-name writes an owner that died never applied."""
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    if not late:
        cluster.command("wide", {**exact, "shards": 2}, reply=b"create")
        cluster.command("plain", exact)
        cluster.command("wide", {"op": "add", "items": _items("w", 6)}, reply=b"early")
        return
    cluster.command("cur", {"op": "alias", "target": "wide"}, reply=b"alias")
    cluster.command("wide", {"op": "add", "items": _items("x", 5, 1.0)}, reply=b"late-wide")
    cluster.command("cur", {"op": "add", "items": _items("y", 3, 2.0)}, reply=b"late-alias")
    cluster.command("wide", {"op": "delete", "ids": ["w1", "x2"]})
    cluster.command("plain", {"op": "add", "items": _items("p", 2)})


def _items(prefix: str, n: int, start: float = 0.0) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "vector": [1.0 + start, float(i)]} for i in range(n)]


async def _takeover(*, warm: bool) -> dict[int, Any]:
    """An owner applies the sharded workload and checkpoints, then dies; the late records
    come; a survivor takes both partitions over (from its standby copies, or by a plain
    restore and replay). Returns the survivor's state, caught up."""
    cluster = Cluster(partitions=2)
    _sharded_workload(cluster, late=False)
    async with cluster.worker("owner") as (owner, client, _):
        await client.assign([0, 1])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        await eventually(lambda: b"early" in cluster.replies(), "the members took the writes")
        await eventually(caught_up(cluster, owner), "the owner applies the forwards")
        await client.assign([])  # checkpointed, as an owner that died later
    _sharded_workload(cluster, late=True)
    ends = {p: cluster.end(p) - 1 for p in (0, 1)}
    async with cluster.worker("survivor") as (survivor, client, _):
        standbys = None
        if warm:
            standbys = await _standbys(cluster, survivor, client)
            standbys.reconcile([0, 1])
            await eventually(lambda: standbys.held() == ends, "the copies apply the late records")
            assert ends == {p: cluster.end(p) - 1 for p in (0, 1)}, "a copy forwards nothing"
        await client.assign([0, 1])
        await eventually(lambda: b"late-alias" in cluster.replies(), "the late writes acked")
        await eventually(caught_up(cluster, survivor), "the survivor applies the forwards")
        assert _restores(survivor.metrics, "standby") == (2 if warm else 0)
        assert _restores(survivor.metrics, "snapshot") == (0 if warm else 2)
        assert all(cluster.replies()[c]["status"] == "ok" for c in (b"late-wide", b"alias"))
        state = _contents(survivor)
        if standbys is not None:
            await standbys.stop()
        return state


async def test_a_takeover_from_standbys_of_a_sharded_index_equals_a_plain_replay() -> None:
    warm = await _takeover(warm=True)
    plain = await _takeover(warm=False)
    assert warm == plain
    catalogs = [set(catalog) for _, catalog, _, _ in warm.values()]
    assert set().union(*catalogs) == {"wide", "cur"}
    assert {name: s for _, _, _, m in warm.values() for name, s in m.items()} == {
        "wide#0": 2,
        "wide#1": 2,
    }
    assert any(marks for _, _, marks, _ in warm.values()), "forwarded records were applied"


def _merge_names() -> tuple[str, str]:
    """src and dest on different partitions of 2."""
    src = "src"
    p = home_partition(src.encode(), 2)
    dest = next(f"i{i}" for i in range(200) if home_partition(f"i{i}".encode(), 2) != p)
    return src, dest


class _HeldDeletes(_Shared):
    """The shared bucket, whose deletes wait for `released` (the owner's cleanup of a
    merge's export and marker comes only once the test lets it)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster.blobs)
        self.released = asyncio.Event()

    async def delete(self, key: str, *args: Any, **kw: Any) -> Any:
        if key.startswith("merges/"):
            await self.released.wait()
        return await self._inner.delete(key, *args, **kw)


async def test_standbys_stay_warm_across_a_merge_to_another_partition_and_take_over_from_it() -> (
    None
):
    cluster = Cluster(partitions=2)
    bucket = _HeldDeletes(cluster)
    src, dest = _merge_names()
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    cluster.command(src, exact)
    cluster.command(dest, exact)
    cluster.command(src, {"op": "add", "items": _items("s", 5)})
    cluster.command(dest, {"op": "add", "items": _items("d", 2)})
    async with (
        cluster.worker("owner", blobs=bucket) as (owner, owner_kafka, _),
        cluster.worker("survivor") as (survivor, client, _),
    ):
        copies = _Copies(cluster, survivor, client)
        await copies.steps.start()
        copies.standbys.reconcile([0, 1])
        await owner_kafka.assign([0, 1])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        body = {"op": "merge", "dest": dest, "clear_source": True}
        cluster.command(src, body, reply=b"merge")
        await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
        await eventually(caught_up(cluster, owner), "the owner applied every step")
        ends = {p: cluster.end(p) - 1 for p in (0, 1)}
        await eventually(lambda: copies.standbys.held() == ends, "the copies followed the merge")
        assert {p: c.loads for p, c in copies.copies.items()} == {0: 1, 1: 1}, "never reloaded"
        bucket.released.set()
        owners = _states(owner)
        await owner_kafka.assign([])  # a graceful hand-over: checkpointed on revoke
        await client.assign([0, 1])
        await eventually(caught_up(cluster, survivor), "the survivor serves")
        assert _restores(survivor.metrics, "standby") == 2
        assert _states(survivor) == owners
        assert len(owners[home_partition(src.encode(), 2)][0][src]["live"]) == 0
        await copies.standbys.stop()


async def test_a_standby_whose_merge_export_is_gone_reloads_from_the_newest_manifest() -> None:
    cluster = Cluster(partitions=2)
    src, dest = _merge_names()
    dest_p = home_partition(dest.encode(), 2)
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    cluster.command(src, exact)
    cluster.command(dest, exact)
    cluster.command(src, {"op": "add", "items": _items("s", 4)})
    async with (
        cluster.worker("owner") as (owner, owner_kafka, _),
        cluster.worker("survivor") as (survivor, client, _),
    ):
        await owner_kafka.assign([0, 1])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        copies = _Copies(cluster, survivor, client)
        await copies.steps.start()
        copies.standbys.reconcile([0, 1])
        await eventually(lambda: set(copies.standbys.held()) == {0, 1}, "the copies loaded")
        copies.readers[dest_p].held.clear()  # the dest copy falls behind
        cluster.command(src, {"op": "merge", "dest": dest}, reply=b"merge")
        await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
        await eventually(
            lambda: not [k for k in cluster.blobs.objects if "merges/" in k],
            "the export collected by the owner",
            timeout_s=30,
        )
        copies.readers[dest_p].held.set()
        await eventually(caught_up(cluster, owner), "the owner applied everything")
        ends = {p: cluster.end(p) - 1 for p in (0, 1)}
        await eventually(lambda: copies.standbys.held() == ends, "the copies caught up")
        assert copies.copies[dest_p].loads == 2, "reloaded from the manifest past the merge_in"
        warm = await copies.standbys.promote(dest_p)
        assert warm is not None
        states = _states(owner)[dest_p][0]
        assert {n: i.logical_state() for n, i in warm.indexes.items()} == states
        await copies.standbys.stop()


async def test_a_copy_past_a_merge_its_dead_owner_may_not_have_exported_restores_from_the_manifest() -> (
    None
):
    cluster = Cluster(partitions=2)
    src, dest = _merge_names()
    exact = {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}
    cluster.command(src, exact)
    cluster.command(dest, exact)
    cluster.command(src, {"op": "add", "items": _items("s", 3)})
    async with cluster.worker("owner") as (owner, client, _):
        await client.assign([0, 1])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        await client.assign([])  # checkpointed, as an owner that died later
    cluster.command(src, {"op": "merge", "dest": dest}, reply=b"merge")  # never exported
    ends = {p: cluster.end(p) - 1 for p in (0, 1)}
    async with cluster.worker("survivor") as (survivor, client, _):
        standbys = await _standbys(cluster, survivor, client)
        standbys.reconcile([0, 1])
        await eventually(lambda: standbys.held() == ends, "the copies apply the merge")
        await client.assign([0, 1])
        await eventually(lambda: b"merge" in cluster.replies(), "the merge's ack", timeout_s=30)
        assert cluster.replies()[b"merge"]["status"] == "ok"
        # src's copy went past a step only an owner takes: src replayed from its manifest
        assert _restores(survivor.metrics, "standby") == 1
        assert _restores(survivor.metrics, "snapshot") == 1
        await eventually(caught_up(cluster, survivor), "the survivor serves")
        dest_part = survivor.partitions[home_partition(dest.encode(), 2)]
        assert len(dest_part.indexes[dest]) == 3
        await standbys.stop()


async def test_standbys_follow_imports_and_reload_when_an_import_source_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects: dict[str, bytes] = {}  # the import sources' bucket

    async def read_object(s3: S3Config, bucket: str, key: str, max_bytes: int) -> bytes | None:
        return objects.get(key)

    monkeypatch.setattr(merge_module, "read_object", read_object)
    prefix = f"s3://{S3Config().bucket}/{S3Config().key_prefix}imports/"

    def upload(name: str, rows: int, seed: int) -> str:
        out = io.BytesIO()
        np.save(out, np.random.default_rng(seed).random((rows, 2)).astype(np.float32))
        objects[f"{S3Config().key_prefix}imports/{name}"] = out.getvalue()
        return prefix + name

    cluster = Cluster(partitions=1)
    cluster.command("docs", {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    async with (
        cluster.worker("owner") as (owner, owner_kafka, _),
        cluster.worker("survivor") as (survivor, client, _),
    ):
        await owner_kafka.assign([0])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        assert await owner.ownership.checkpoint(owner.partitions[0], reason="test")
        copies = _Copies(cluster, survivor, client)
        await copies.steps.start()
        copies.standbys.reconcile([0])
        await eventually(lambda: 0 in copies.standbys.held(), "the copy loaded")
        cluster.command("docs", {"op": "import", "source": upload("a.npy", 40, 1)}, reply=b"a")
        await eventually(lambda: b"a" in cluster.replies(), "the import's ack")
        assert cluster.replies()[b"a"]["status"] == "ok"
        await eventually(lambda: copies.standbys.held() == {0: cluster.end(0) - 1}, "followed")
        assert copies.copies[0].loads == 1, "the import kept the copy warm"

        copies.readers[0].held.clear()  # the copy falls behind
        cluster.command("docs", {"op": "import", "source": upload("b.npy", 30, 2)}, reply=b"b")
        await eventually(lambda: b"b" in cluster.replies(), "the second import's ack")
        await eventually(caught_up(cluster, owner), "the owner applied it")
        assert await owner.ownership.checkpoint(owner.partitions[0], reason="test")
        objects.clear()  # the sources removed once a checkpoint covers the imports
        copies.readers[0].held.set()
        await eventually(lambda: copies.standbys.held() == {0: cluster.end(0) - 1}, "caught up")
        assert copies.copies[0].loads == 2, "reloaded from the manifest past the import"
        warm = await copies.standbys.promote(0)
        assert warm is not None
        assert {n: i.logical_state() for n, i in warm.indexes.items()} == {
            n: i.logical_state() for n, i in owner.partitions[0].indexes.items()
        }
        assert len(warm.indexes["docs"]) == 40  # rows 0..29 imported again
        await copies.standbys.stop()
