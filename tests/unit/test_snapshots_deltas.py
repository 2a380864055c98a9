"""SnapshotStore chains (a base and its deltas) over the in-memory blob store: manifests
old and new, restore, the base-or-delta policy, GC, corruption and objects gone."""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import orjson
import pytest

from lhv_index import Clock, Delete, EngineKind, Index, IndexParams, Space, Upsert, write_snapshot
from lhv_index.errors import SnapshotError
from worker.storage.blobstore import BlobInfo, BlobNotFound, MemoryBlobStore, StoreUnavailable
from worker.storage.snapshots import (
    DeltaPolicy,
    IndexEntry,
    Manifest,
    Segment,
    SegmentKind,
    SnapshotGone,
    SnapshotStore,
)

DIM = 8


def _upserts(ids: range, offset: int, seed: int = 0) -> list[Upsert]:
    vecs = np.random.default_rng(seed).normal(size=(len(ids), DIM)).astype(np.float32)
    return [
        Upsert(id=f"i{k}", vector=vecs[j], metadata={"k": k}, clock=Clock(0, offset, j))
        for j, k in enumerate(ids)
    ]


def _index(engine: str = "hnsw", space: str = "cosine") -> Index:
    index = Index("docs", IndexParams(dim=DIM, space=Space(space), engine=EngineKind(engine)))
    index.apply(_upserts(range(200), 1))
    return index


async def _chain(store: SnapshotStore, index: Index) -> IndexEntry:
    """A base at offset 1, then two deltas: upserts, deletes, re-adds, a dropped tombstone."""
    entry = await store.save_index(0, index, offset=1)
    index.apply(_upserts(range(150, 260), 2, seed=1))
    index.apply([Delete(id=f"i{k}", clock=Clock(0, 3, k)) for k in range(0, 40)])
    index.apply([Delete(id="i120", clock=Clock(2, 3, 99))])  # raises the floor when dropped
    entry = entry.with_delta(await store.save_delta(0, index.capture_delta(), offset=3))
    index.apply(_upserts(range(10, 20), 4, seed=2))  # re-adds over tombstones
    index.apply([Delete(id="i100", clock=Clock(3, 5, 0))])
    delta = index.capture_delta(compact_before=4)  # drops the tombstones of offset 3
    return entry.with_delta(await store.save_delta(0, delta, offset=5))


@pytest.mark.parametrize(("engine", "space"), [("hnsw", "cosine"), ("exact", "l2")])
async def test_base_and_deltas_restore_the_captured_index(engine: str, space: str) -> None:
    async with MemoryBlobStore() as blobs:
        writer = SnapshotStore(blobs, topic="cmd", worker_id="a")
        index = _index(engine, space)
        entry = await _chain(writer, index)
        manifest = Manifest(topic="cmd", partition=0, offset=5, indexes={"docs": entry})
        await writer.write_manifest(manifest, etag=None)

        reader = SnapshotStore(blobs, topic="cmd", worker_id="b")
        back, _ = await reader.read_manifest(0)
        assert back is not None and back.indexes["docs"] == entry
        assert [d.offset for d in entry.deltas] == [3, 5] and entry.covered_offset == 5
        loaded = await reader.load_index("docs", back.indexes["docs"])
        assert loaded.logical_state() == index.logical_state()
        assert loaded.version_floor == index.version_floor == 2


async def test_a_manifest_with_deltas_is_format_2_and_without_them_format_1() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        index = _index()
        base = await store.save_index(0, index, offset=1)
        single = Manifest(topic="cmd", partition=0, offset=1, indexes={"docs": base})
        body = orjson.loads(single.encode())
        assert body["format"] == 1
        assert set(body["indexes"]["docs"]) == {"key", "offset", "bytes", "params", "crc32"}
        index.apply(_upserts(range(5), 2))
        chained = base.with_delta(await store.save_delta(0, index.capture_delta(), offset=2))
        body = orjson.loads(Manifest(topic="cmd", partition=0, indexes={"docs": chained}).encode())
        assert body["format"] == 2
        assert set(body["indexes"]["docs"]) == {"params", "base", "deltas"}
        assert Manifest.decode(single.encode()).indexes["docs"] == base


async def test_a_manifest_written_before_deltas_still_loads() -> None:
    async with MemoryBlobStore() as blobs:
        index = _index()
        out = io.BytesIO()
        size = write_snapshot(index, out, source={"topic": "cmd", "partition": 2, "offset": 7})
        key = "partitions/cmd/00002/snapshots/docs/00000000000000000007-0123456789ab.lhv"
        await blobs.put(key, out.getvalue())
        old = {  # exactly what the one-snapshot writer wrote: no crc32, no deltas
            "format": 1,
            "topic": "cmd",
            "partition": 2,
            "offset": 7,
            "generation": 3,
            "writer": "old",
            "written_at": 1.5,
            "indexes": {
                "docs": {"key": key, "offset": 7, "bytes": size, "params": index.params.to_dict()}
            },
        }
        await blobs.put("partitions/cmd/00002/manifest.json", orjson.dumps(old))
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        manifest, _ = await store.read_manifest(2)
        assert manifest is not None and manifest.generation == 3
        entry = manifest.indexes["docs"]
        assert entry.key == key and entry.crc32 is None and entry.deltas == ()
        loaded = await store.load_index("docs", entry)
        assert loaded.logical_state() == index.logical_state()


def _entry(base_bytes: int, delta_bytes: list[int]) -> IndexEntry:
    entry = IndexEntry(key="b", offset=0, bytes=base_bytes, params={})
    for i, n in enumerate(delta_bytes):
        entry = entry.with_delta(Segment(key=f"d{i}", offset=i + 1, bytes=n))
    return entry


def test_the_next_snapshot_is_a_base_once_the_deltas_pass_a_bound() -> None:
    policy = DeltaPolicy(max_delta_share=0.5, max_deltas=3)
    assert policy.next_kind(None) is SegmentKind.BASE
    assert policy.next_kind(_entry(1000, [])) is SegmentKind.DELTA
    assert policy.next_kind(_entry(1000, [200, 300])) is SegmentKind.DELTA  # at the share
    assert policy.next_kind(_entry(1000, [200, 301])) is SegmentKind.BASE  # past the share
    assert policy.next_kind(_entry(1000, [1, 1])) is SegmentKind.DELTA
    assert policy.next_kind(_entry(1000, [1, 1, 1])) is SegmentKind.BASE  # at the count
    assert DeltaPolicy(max_deltas=0).next_kind(_entry(1000, [])) is SegmentKind.BASE


def test_delta_policy_reads_its_variables_and_refuses_nonsense() -> None:
    assert DeltaPolicy.from_env({}) == DeltaPolicy(max_delta_share=0.5, max_deltas=16)
    env = {"LHV_MAX_DELTA_SHARE": "0.25", "LHV_MAX_DELTAS": "4"}
    assert DeltaPolicy.from_env(env) == DeltaPolicy(max_delta_share=0.25, max_deltas=4)
    with pytest.raises(ValueError, match="max_deltas"):
        DeltaPolicy(max_deltas=-1)
    with pytest.raises(ValueError, match="max_delta_share"):
        DeltaPolicy.from_env({"LHV_MAX_DELTA_SHARE": "-0.1"})


def test_a_delta_older_than_its_chain_is_refused() -> None:
    entry = _entry(10, [1, 1])
    with pytest.raises(ValueError, match="older"):
        entry.with_delta(Segment(key="x", offset=1, bytes=1))
    body = orjson.loads(Manifest(topic="t", partition=0, indexes={"i": entry}).encode())
    body["indexes"]["i"]["deltas"].reverse()
    with pytest.raises(Exception, match="unreadable manifest"):
        Manifest.decode(orjson.dumps(body))


async def test_garbage_collection_keeps_the_chain_and_deletes_replaced_objects() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        index = _index()
        old = await _chain(store, index)
        index.apply(_upserts(range(3), 6))
        new = await store.save_index(0, index, offset=6)
        index.apply(_upserts(range(3, 6), 7))
        new = new.with_delta(await store.save_delta(0, index.capture_delta(), offset=7))
        index.apply(_upserts(range(6, 9), 9))
        uploading = await store.save_delta(0, index.capture_delta(), offset=9)  # no manifest yet

        manifest = Manifest(topic="cmd", partition=0, offset=7, indexes={"docs": new})
        assert await store.collect_garbage(manifest) == 3
        left = set(await blobs.list("partitions/cmd/00000/snapshots/"))
        assert left == {*new.keys, uploading.key}
        assert not left & set(old.keys)
        assert (await store.load_index("docs", new)).logical_state() != {}


async def _corrupt(blobs: MemoryBlobStore, key: str, at: float) -> None:
    data, _ = await blobs.get(key)
    broken = bytearray(data)
    broken[int(len(broken) * at)] ^= 0xFF
    await blobs.put(key, bytes(broken))


@pytest.mark.parametrize("at", [0.02, 0.5, 0.99], ids=["envelope", "middle", "end"])
async def test_a_corrupted_delta_is_never_applied(at: float) -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        entry = await _chain(store, _index())
        await _corrupt(blobs, entry.deltas[1].key, at)
        with pytest.raises(SnapshotError, match=entry.deltas[1].key):
            await store.load_index("docs", entry)


async def test_a_segment_of_another_size_than_the_manifest_says_is_refused() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        entry = await _chain(store, _index())
        data, _ = await blobs.get(entry.deltas[0].key)
        await blobs.put(entry.deltas[0].key, data[:-10])
        with pytest.raises(SnapshotError, match="the manifest says"):
            await store.load_index("docs", entry)


async def test_a_delta_replaced_by_another_of_the_same_size_is_refused() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        index = _index()
        entry = await store.save_index(0, index, offset=1)
        index.apply(_upserts(range(5), 2))
        first = await store.save_delta(0, index.capture_delta(), offset=2)
        index.apply(_upserts(range(5), 3, seed=9))  # the same ids, other vectors
        other = await store.save_delta(0, index.capture_delta(), offset=3)
        assert first.bytes == other.bytes and first.crc32 != other.crc32
        await blobs.put(first.key, (await blobs.get(other.key))[0])  # a sound frame
        with pytest.raises(SnapshotError, match="crc32"):
            await store.load_index("docs", entry.with_delta(first))


async def test_a_lone_base_rewritten_in_place_still_loads_as_before_deltas() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        index = _index()
        entry = await store.save_index(0, index, offset=1)
        index.apply([Delete(id="i1", clock=Clock(0, 2, 0))])
        out = io.BytesIO()
        write_snapshot(index, out, source={})
        await blobs.put(entry.key, out.getvalue())
        loaded = await store.load_index("docs", entry)
        assert loaded.logical_state() == index.logical_state()


class _CollectedWhileReading(MemoryBlobStore):
    """Deletes `doomed` once `trigger` has been read: GC running under a reader."""

    trigger = ""
    doomed: tuple[str, ...] = ()

    async def get_to_file(self, key: str, out: BinaryIO) -> BlobInfo:
        info = await super().get_to_file(key, out)
        if key == self.trigger:
            for k in self.doomed:
                await self.delete(k)
        return info


async def test_a_delta_deleted_under_a_reader_is_a_retriable_snapshot_gone() -> None:
    async with _CollectedWhileReading() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        entry = await _chain(store, _index())
        blobs.trigger, blobs.doomed = entry.key, entry.keys[1:]
        with pytest.raises(SnapshotGone) as info:
            await store.load_index("docs", entry)
        assert info.value.retriable and isinstance(info.value, BlobNotFound)
        assert info.value.key == entry.deltas[0].key


class _ShortReads(MemoryBlobStore):
    """The first `short` reads of any object come back cut in half."""

    short = 0

    async def get_to_file(self, key: str, out: BinaryIO) -> BlobInfo:
        info = await super().get_to_file(key, out)
        if self.short > 0:
            self.short -= 1
            out.truncate(info.size // 2)
            return BlobInfo(key, info.etag, info.size // 2)
        return info


async def test_a_read_cut_short_is_read_again_and_then_store_unavailable() -> None:
    async with _ShortReads() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        index = _index()
        entry = await _chain(store, index)
        blobs.short = 2
        assert (await store.load_index("docs", entry)).logical_state() == index.logical_state()
        blobs.short = 100
        with pytest.raises(StoreUnavailable):
            await store.load_index("docs", entry)
