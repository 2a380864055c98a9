"""Checkpoints that do not stall ingest, over the in-memory command log and blob store:
records are applied while a checkpoint's upload is in flight, the manifest names the
offset of the capture, and a revoke during an upload either waits for it or cancels it,
losing nothing either way."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import orjson
from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, caught_up, eventually
from workerkit import all_indexes, assert_state_matches, oracle_from_records

from lhv_index import Base
from lhv_index._capture import FilePiece
from worker.service.config import CheckpointPolicy
from worker.storage.blobstore import BlobData, MemoryBlobStore, StoreUnavailable
from worker.storage.snapshots import DeltaPolicy

NAME = "docs"
DIM = 8
#: the runner checkpoints after 5 records (and never by time)
POLICY = CheckpointPolicy(every_records=5, every_s=3600.0)


class _HeldUploads:
    """Holds the first snapshot upload of a `MemoryBlobStore` whose key ends with `kind`
    until `release()`; then it is made, or fails if `fail` is given."""

    def __init__(
        self, blobs: MemoryBlobStore, *, kind: str = ".lhv", fail: Exception | None = None
    ) -> None:
        self._put = blobs.put
        self._kind = kind
        self._fail = fail
        self.entered = asyncio.Event()
        self._open = asyncio.Event()
        self.held_key = ""
        blobs.put = self.put  # type: ignore[method-assign]

    async def put(self, key: str, data: BlobData) -> str:
        if "/snapshots/" in key and key.endswith(self._kind) and not self.held_key:
            self.held_key = key
            self.entered.set()
            await self._open.wait()
            if self._fail is not None:
                raise self._fail
        return await self._put(key, data)

    def release(self) -> None:
        self._open.set()

    @property
    def offset(self) -> int:
        """The offset the held snapshot was captured at (its key names it)."""
        return int(self.held_key.rsplit("/", 1)[1].split("-", 1)[0])


def _add(cluster: Cluster, start: int, n: int, *, reply: bytes | None = None) -> int:
    vecs = np.random.default_rng(start).normal(size=(n, DIM))
    items = [{"id": f"v{start + j}", "vector": [float(x) for x in vecs[j]]} for j in range(n)]
    return cluster.command(NAME, {"op": "add", "items": items}, reply=reply)


def _seed(cluster: Cluster) -> None:
    """Five records: the runner's policy starts a checkpoint once they are applied."""
    cluster.command(NAME, {"op": "create", "dim": DIM, "space": "l2"})
    for k in range(4):
        _add(cluster, 100 * k, 20)


def _oracle(cluster: Cluster):  # type: ignore[no-untyped-def]
    return oracle_from_records(cluster.broker.records("lhv.commands", 0))


def _stored_offset(cluster: Cluster) -> int:
    (manifest,) = [v for k, v in cluster.blobs.objects.items() if k.endswith("manifest.json")]
    return int(orjson.loads(manifest)["offset"])


async def test_records_apply_during_an_upload_and_the_manifest_names_the_capture_offset() -> None:
    cluster = Cluster(partitions=1)
    held = _HeldUploads(cluster.blobs)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        async with asyncio.timeout(20):
            await held.entered.wait()
        part = a.partitions[0]
        assert part.checkpoint_in_flight
        captured_at = held.offset
        for k in range(3):  # fewer than the policy's 5: no second checkpoint after this one
            _add(cluster, 1_000 + 10 * k, 10)
        await eventually(caught_up(cluster, a), "a applies while the upload is held")
        assert part.checkpoint_in_flight, "the upload is still held"
        assert part.applied_offset == cluster.end(0) - 1 > captured_at
        assert {it.id for it in part.indexes[NAME].get(["v1000", "v1020"])} == {"v1000", "v1020"}
        assert part.checkpoint_offset < captured_at
        held.release()
        await eventually(lambda: not part.checkpoint_in_flight, "the checkpoint ends")
        assert part.checkpoint_offset == captured_at == _stored_offset(cluster)
        assert NAME in part.dirty, "changed after its capture: dirty for the next checkpoint"
        committed = cluster.broker.committed("lhv")
        assert committed[TopicPartition(TOPICS.commands, 0)] == captured_at + 1
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_revoke_during_an_upload_waits_for_it_and_loses_nothing() -> None:
    cluster = Cluster(partitions=1)
    held = _HeldUploads(cluster.blobs)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        async with asyncio.timeout(20):
            await held.entered.wait()
        part = a.partitions[0]
        acked = [_add(cluster, 1_000 + 10 * k, 10, reply=f"w{k}".encode()) for k in range(3)]
        await eventually(
            lambda: all(f"w{k}".encode() in cluster.replies() for k in range(3)),
            "the writes after the capture are acknowledged",
        )
        revoke = asyncio.create_task(client.assign([]))
        await eventually(lambda: 0 not in a._runners, "the runner stopped")
        assert not revoke.done(), "the revoke waits for the upload in flight"
        held.release()
        async with asyncio.timeout(20):
            await revoke
        # the checkpoint in flight, then the revoke's own, covering every acknowledged write
        assert [off for _, off in part.history][-2:] == [held.offset, acked[-1]]
        assert _stored_offset(cluster) == acked[-1] == cluster.end(0) - 1
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores")
        assert b.partitions[0].checkpoint_offset == cluster.end(0) - 1
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_revoke_past_its_timeout_cancels_the_upload_and_writes_no_manifest() -> None:
    cluster = Cluster(partitions=1)
    held = _HeldUploads(cluster.blobs)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY, rebalance_timeout_ms=200) as (a, client, _):
        await client.assign([0])
        async with asyncio.timeout(20):
            await held.entered.wait()
        before = _stored_offset(cluster)
        async with asyncio.timeout(20):
            await client.assign([])  # the checkpoint on revoke times out: cancelled
        assert 0 not in a.partitions
        held.release()  # too late: the cancelled upload writes nothing
        for _ in range(20):
            await asyncio.sleep(0)
        assert _stored_offset(cluster) == before
    async with cluster.worker("b", checkpoint=POLICY) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores and replays")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_failed_upload_in_the_background_keeps_the_index_dirty_and_rebases_it() -> None:
    cluster = Cluster(partitions=1)
    held = _HeldUploads(cluster.blobs, kind=".delta.lhv", fail=StoreUnavailable("S3 is down"))
    _seed(cluster)
    policy = CheckpointPolicy(
        every_records=5, every_s=3600.0, deltas=DeltaPolicy(max_deltas=8, max_delta_share=1.0)
    )
    async with cluster.worker("a", checkpoint=policy) as (a, client, _):
        await client.assign([0])
        part = a.partitions[0]
        await eventually(lambda: part.checkpoint_offset == 4, "the first checkpoint: a base")
        base = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        for k in range(5):
            _add(cluster, 1_000 + 10 * k, 10)
        async with asyncio.timeout(20):
            await held.entered.wait()  # the delta of those writes, captured at offset 9
        held.release()
        await eventually(lambda: not part.checkpoint_in_flight, "the upload fails")
        assert part.checkpoint_offset == 4 and part.manifest.indexes[NAME] == base  # type: ignore[union-attr]
        assert NAME in part.dirty and NAME not in part.persisted
        assert part.retry_at > 0, "retried after a backoff"
        part.retry_at = 0.0
        _add(cluster, 2_000, 10)  # one record: the failed checkpoint is due by itself
        await eventually(
            lambda: part.checkpoint_offset == cluster.end(0) - 1, "the retry covers everything"
        )
        rebased = part.manifest.indexes[NAME]  # type: ignore[union-attr]
        assert rebased.deltas == () and rebased.key != base.key
    async with cluster.worker("b", checkpoint=policy) as (b, client_b, _):
        await client_b.assign([0])
        await eventually(caught_up(cluster, b), "b restores")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_each_capture_is_released_once_uploaded_not_with_the_checkpoint() -> None:
    import gc

    from worker.service.ownership import _Snapshot

    cluster = Cluster(partitions=1)
    for name in ("a", "b"):  # captured and uploaded in name order
        cluster.command(name, {"op": "create", "dim": DIM, "space": "l2"})
        vecs = np.random.default_rng(7).normal(size=(30, DIM))
        items = [{"id": f"v{j}", "vector": [float(x) for x in vecs[j]]} for j in range(30)]
        cluster.command(name, {"op": "add", "items": items})
    cluster.command("a", {"op": "delete", "ids": ["v0"]})  # 5 records: a checkpoint starts
    entered, release = asyncio.Event(), asyncio.Event()
    put = cluster.blobs.put

    async def hold_b(key: str, data: BlobData) -> str:
        if "/snapshots/b/" in key:
            entered.set()
            await release.wait()
        return await put(key, data)

    cluster.blobs.put = hold_b  # type: ignore[method-assign]
    async with cluster.worker("a", checkpoint=POLICY) as (w, client, _):
        await client.assign([0])
        async with asyncio.timeout(20):
            await entered.wait()
        try:
            snaps = {
                o.name: o
                for o in gc.get_objects()
                if isinstance(o, _Snapshot) and o.index in w.partitions[0].indexes.values()
            }
            assert set(snaps) == {"a", "b"}
            assert snaps["a"].data is None, "a is uploaded: its copy is gone"
            assert snaps["b"].data is not None, "b is being uploaded"
        finally:
            release.set()
        part = w.partitions[0]
        await eventually(lambda: part.checkpoint_offset == 4, "the checkpoint ends")
        assert set(part.manifest.indexes) == {"a", "b"}  # type: ignore[union-attr]


def _held_base_files(worker_indexes: object) -> list[FilePiece]:
    """The engine files of the base being uploaded (found among live objects)."""
    from worker.service.ownership import _Snapshot

    (snap,) = [
        o
        for o in gc.get_objects()
        if isinstance(o, _Snapshot) and o.index in worker_indexes and o.data is not None  # type: ignore[operator]
    ]
    assert isinstance(snap.data, Base)
    files = [p for _, pieces in snap.data.engine for p in pieces if isinstance(p, FilePiece)]
    assert files and not any(f.closed for f in files)
    return files


async def test_a_base_whose_upload_fails_has_its_engine_files_closed() -> None:
    cluster = Cluster(partitions=1)
    held = _HeldUploads(cluster.blobs, fail=StoreUnavailable("S3 is down"))
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY) as (a, client, _):
        await client.assign([0])
        part = a.partitions[0]
        async with asyncio.timeout(20):
            await held.entered.wait()
        files = _held_base_files(part.indexes.values())
        held.release()
        await eventually(lambda: not part.checkpoint_in_flight, "the upload fails")
        assert NAME in part.dirty, "the checkpoint failed"
        assert all(f.closed for f in files)


async def test_a_base_whose_upload_is_cancelled_by_a_revoke_has_its_engine_files_closed() -> None:
    cluster = Cluster(partitions=1)
    held = _HeldUploads(cluster.blobs)
    _seed(cluster)
    async with cluster.worker("a", checkpoint=POLICY, rebalance_timeout_ms=200) as (a, client, _):
        await client.assign([0])
        async with asyncio.timeout(20):
            await held.entered.wait()
        files = _held_base_files(a.partitions[0].indexes.values())
        async with asyncio.timeout(20):
            await client.assign([])  # the checkpoint on revoke times out: cancelled
        held.release()
        assert all(f.closed for f in files)
