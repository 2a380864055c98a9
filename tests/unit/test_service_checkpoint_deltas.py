"""Checkpoints that follow the change, over the in-memory command log and blob store: a
checkpoint after a small change writes a delta sized by that change, a new owner restores
base + deltas equal to the plain replay, a failed delta upload makes the next snapshot of
that index a base, and tombstones past the horizon are dropped at a checkpoint."""

from __future__ import annotations

import re

import numpy as np
from servicekit import Cluster, caught_up, eventually
from workerkit import all_indexes, assert_state_matches, oracle_from_records

from worker.service import Worker
from worker.service.config import CheckpointPolicy
from worker.service.partition import Partition
from worker.storage.blobstore import StoreUnavailable
from worker.storage.snapshots import DeltaPolicy

NAME = "big"
DIM = 32
#: deltas on, a chain long enough for the test, no checkpoint by the runner's own policy
POLICY = CheckpointPolicy(
    every_records=10**6,
    every_s=3600.0,
    deltas=DeltaPolicy(max_deltas=8, max_delta_share=1.0),
    tombstone_retention_ms=0,
)


def _add(
    cluster: Cluster, start: int, n: int, *, version: int = 0, reply: bytes | None = None
) -> None:
    vecs = np.random.default_rng(start).normal(size=(n, DIM))
    items = [
        {"id": f"v{start + j}", "vector": [float(x) for x in vecs[j]], "version": version}
        for j in range(n)
    ]
    cluster.command(NAME, {"op": "add", "items": items}, reply=reply)


def _seed(cluster: Cluster, n: int = 2_000) -> None:
    cluster.command(NAME, {"op": "create", "dim": DIM, "space": "l2", "M": 8})
    for start in range(0, n, 250):
        _add(cluster, start, 250)


def _oracle(cluster: Cluster):  # type: ignore[no-untyped-def]
    return oracle_from_records(cluster.broker.records("lhv.commands", 0))


async def _checkpoint(cluster: Cluster, w: Worker) -> Partition:
    """Wait until `w` applied the log, then checkpoint partition 0 (the runner is idle:
    nothing applies meanwhile)."""
    await eventually(caught_up(cluster, w), "the worker applies the log")
    part = w.partitions[0]
    assert await w.ownership.checkpoint(part, reason="test")
    return part


async def test_checkpoints_after_small_changes_write_deltas_sized_by_the_change() -> None:
    cluster = Cluster(partitions=1)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        part = await _checkpoint(cluster, a)
        base = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        assert base.deltas == ()
        sizes = []
        for start, n in ((10_000, 10), (20_000, 100)):
            _add(cluster, start, n)
            cluster.command(
                NAME, {"op": "delete", "ids": [f"v{start // 100 + k}" for k in range(3)]}
            )
            part = await _checkpoint(cluster, a)
            entry = part.manifest.indexes[NAME]  # type: ignore[union-attr]
            sizes.append(entry.deltas[-1].bytes)
        assert entry.key == base.key and len(entry.deltas) == 2
        raw = [n * DIM * 4 for n in (10, 100)]  # the vectors' own bytes
        assert sizes[0] < sizes[1] < base.bytes // 5
        assert sizes[1] - sizes[0] < 2 * (raw[1] - raw[0])
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores base + deltas")
        assert b.partitions[0].manifest.indexes[NAME].deltas == entry.deltas  # type: ignore[union-attr]
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_failed_delta_upload_makes_the_next_snapshot_a_base() -> None:
    cluster = Cluster(partitions=1)
    _seed(cluster, 500)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        part = await _checkpoint(cluster, a)
        _add(cluster, 10_000, 20)
        part = await _checkpoint(cluster, a)
        chained = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        assert len(chained.deltas) == 1
        _add(cluster, 20_000, 20)  # captured, then lost to the failed upload
        await eventually(caught_up(cluster, a), "a applies the log")
        cluster.blobs.fail_next(StoreUnavailable("S3 is down"))
        assert not await a.ownership.checkpoint(part, reason="test")
        assert NAME not in part.persisted
        assert part.manifest.indexes[NAME] == chained  # type: ignore[union-attr]
        _add(cluster, 30_000, 5)
        part.retry_at = 0.0
        part = await _checkpoint(cluster, a)
        rebased = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        assert rebased.deltas == () and rebased.key != chained.key
        _add(cluster, 40_000, 5)  # and the chain starts again on the new base
        part = await _checkpoint(cluster, a)
        assert len(part.manifest.indexes[NAME].deltas) == 1  # type: ignore[union-attr]
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_an_index_dropped_and_created_again_is_saved_as_a_base() -> None:
    cluster = Cluster(partitions=1)
    _seed(cluster, 500)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        part = await _checkpoint(cluster, a)
        first = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        cluster.command(NAME, {"op": "drop"})
        _seed(cluster, 250)
        part = await _checkpoint(cluster, a)
        again = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        assert again.deltas == () and again.key != first.key
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_tombstones_past_the_horizon_are_dropped_and_older_versioned_writes_refused() -> None:
    cluster = Cluster(partitions=1)
    _seed(cluster, 250)
    cluster.command(NAME, {"op": "delete", "ids": ["v1", "v2"], "version": 5})
    horizon = CheckpointPolicy(
        every_records=10**6,
        every_s=3600.0,
        deltas=POLICY.deltas,
        tombstone_retention_ms=1,
    )
    async with cluster.worker("a", checkpoint=horizon) as (a, client, _):
        await client.assign([0])
        part = await _checkpoint(cluster, a)
        index = a.partitions[0].indexes[NAME]
        assert index.stats()["deleted"] == 2  # no checkpoint was old enough yet
        part.history = [(at - 1.0, off) for at, off in part.history]  # it is now
        _add(cluster, 10_000, 1)
        part = await _checkpoint(cluster, a)
        assert index.stats()["deleted"] == 0 and index.version_floor == 5
        assert len(part.manifest.indexes[NAME].deltas) == 1  # type: ignore[union-attr]
        # an older versioned write for an id whose tombstone is gone: refused, not revived
        _add(cluster, 1, 1, version=3, reply=b"stale")
        await eventually(lambda: b"stale" in cluster.replies(), "the stale write is answered")
        answer = cluster.replies()[b"stale"]
        assert answer["status"] == "error" and answer["error"]["code"] == "invalid_request"
        assert "horizon" in answer["error"]["message"]
    async with cluster.worker("b", checkpoint=horizon) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores")
        restored = b.partitions[0].indexes[NAME]
        assert restored.version_floor == 5 and restored.stats()["deleted"] == 0
        assert {"v1", "v2"}.isdisjoint(it.id for it in restored.get(["v1", "v2"]))


def test_the_delta_and_tombstone_settings_come_from_the_environment() -> None:
    from worker.service.config import WorkerConfig

    default = WorkerConfig.from_env({"LHV_S3_BUCKET": "b"}).checkpoint
    assert default.tombstone_retention_ms == 0 and default.deltas == DeltaPolicy()
    env = {"LHV_S3_BUCKET": "b", "LHV_TOMBSTONE_RETENTION_MS": "3600000", "LHV_MAX_DELTAS": "0"}
    policy = WorkerConfig.from_env(env).checkpoint
    assert policy.tombstone_retention_ms == 3_600_000 and policy.deltas.max_deltas == 0
    part = Partition(number=0)
    part.durable(100.0, 7)
    assert part.horizon(0.0, 10**9) is None  # 0: tombstones kept for good
    assert part.horizon(50.0, 120.0) is None  # no checkpoint old enough
    part.durable(140.0, 9)
    assert part.horizon(50.0, 160.0) == 8 and part.history == [(100.0, 7), (140.0, 9)]
    assert part.horizon(10.0, 160.0) == 10 and part.history == [(140.0, 9)]


async def test_a_chain_past_the_deferred_insert_budget_is_cut_by_a_new_base() -> None:
    # a restore inserts every delta's items again, in the background: with a budget far
    # below what even one delta takes to apply, the second delta of the chain becomes a
    # base instead
    from dataclasses import replace

    tight = replace(POLICY, max_deferred_s=1e-6)
    cluster = Cluster(partitions=1)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=tight) as (a, client, _):
        await client.assign([0])
        first = (await _checkpoint(cluster, a)).manifest.indexes[NAME]  # type: ignore[union-attr]
        _add(cluster, 10_000, 50)
        one = (await _checkpoint(cluster, a)).manifest.indexes[NAME]  # type: ignore[union-attr]
        assert one.key == first.key and len(one.deltas) == 1  # no chain yet: a delta
        _add(cluster, 20_000, 50)
        two = (await _checkpoint(cluster, a)).manifest.indexes[NAME]  # type: ignore[union-attr]
        assert two.key != first.key and two.deltas == ()  # the chain was cut by a base
    async with cluster.worker("b", checkpoint=tight) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores the new base")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_restore_serves_the_chain_and_tail_before_inserting_them(caplog) -> None:  # type: ignore[no-untyped-def]
    # the new owner's index holds the deltas' items and the replayed tail in its buffer
    # of deferred inserts when it starts serving (searchable, state equal to the log), and
    # inserts them into its engine in the background; a checkpoint meanwhile is a delta
    cluster = Cluster(partitions=1)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        await _checkpoint(cluster, a)
        _add(cluster, 10_000, 1_500)
        cluster.command(NAME, {"op": "delete", "ids": ["v3", "v10001"]})
        await _checkpoint(cluster, a)
    _add(cluster, 20_000, 1_500)  # the tail: replayed by the next owner
    _add(cluster, 5, 10, version=1)  # rewrites of base items
    caplog.set_level("INFO", logger="worker.service.ownership")
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b replays the tail")
        assert_state_matches(all_indexes([b]), _oracle(cluster))
        index = b.partitions[0].indexes[NAME]
        tail = np.random.default_rng(20_000).normal(size=(1_500, DIM))
        assert index.search(tail[7], 1)[0][0].id == "v20007"  # replayed, found at once
        await eventually(lambda: index.pending_inserts == 0, "the deferred items are inserted")
        assert "deferred items inserted" in caplog.text
        deferred = re.search(r"inserting (\d+) items deferred by the restore", caplog.text)
        assert deferred is not None and int(deferred.group(1)) == 1_499 + 1_510
        assert_state_matches(all_indexes([b]), _oracle(cluster))
        chain = np.random.default_rng(10_000).normal(size=(1_500, DIM))
        assert index.search(chain[2], 1)[0][0].id == "v10002"
        assert index.search(chain[1], 1)[0][0].id != "v10001"  # deleted
