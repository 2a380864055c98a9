"""A base and its deltas through the real S3: multipart upload, a restore that streams
each segment to a file, GC of a replaced chain, and a segment gone under a reader."""

from __future__ import annotations

import numpy as np
import pytest

from lhv_index import Clock, Delete, EngineKind, Index, IndexParams, Space, Upsert
from worker.storage.blobstore import S3BlobStore
from worker.storage.snapshots import Manifest, SegmentKind, SnapshotGone, SnapshotStore

DIM = 128
#: exact engine, 40k x 128 f32: a 20 MiB base, past the 16 MiB multipart threshold
BASE_ITEMS = 40_000


def _upserts(start: int, n: int, offset: int) -> list[Upsert]:
    vecs = np.random.default_rng(start).normal(size=(n, DIM)).astype(np.float32)
    return [
        Upsert(id=f"i{start + j}", vector=vecs[j], metadata={"j": j}, clock=Clock(0, offset, j))
        for j in range(n)
    ]


async def test_a_chain_saved_to_s3_restores_in_a_fresh_store_and_gc_drops_the_old_one(
    blobstore: S3BlobStore,
) -> None:
    index = Index("big", IndexParams(dim=DIM, space=Space.L2, engine=EngineKind.EXACT))
    for start in range(0, BASE_ITEMS, 10_000):
        index.apply(_upserts(start, 10_000, 1))
    writer = SnapshotStore(blobstore, topic="cmd", worker_id="a")
    assert writer.next_kind(None) is SegmentKind.BASE
    entry = await writer.save_base(4, index.capture_base(), offset=1)
    assert entry.bytes > blobstore.config.multipart_threshold_bytes
    for offset in (2, 3):
        index.apply(_upserts(BASE_ITEMS + offset * 1000, 1000, offset))
        index.apply([Delete(id=f"i{offset * 7 + k}", clock=Clock(0, offset, k)) for k in range(50)])
        assert writer.next_kind(entry) is SegmentKind.DELTA
        entry = entry.with_delta(await writer.save_delta(4, index.capture_delta(), offset=offset))
    manifest, etag = await writer.write_manifest(
        Manifest(topic="cmd", partition=4, offset=3, indexes={"big": entry}), etag=None
    )

    async with S3BlobStore(blobstore.config) as fresh_blobs:
        reader = SnapshotStore(fresh_blobs, topic="cmd", worker_id="b")
        read, _ = await reader.read_manifest(4)
        assert read is not None and read.indexes["big"] == entry
        loaded = await reader.load_index("big", read.indexes["big"])
        assert loaded.logical_state() == index.logical_state()

    rebased = await writer.save_base(4, index.capture_base(), offset=4)
    manifest, _ = await writer.write_manifest(
        Manifest(topic="cmd", partition=4, offset=4, indexes={"big": rebased}), etag=etag
    )
    assert await writer.collect_garbage(manifest) == 3
    assert await blobstore.list("partitions/cmd/00004/snapshots/") == [rebased.key]
    with pytest.raises(SnapshotGone) as gone:  # a reader still holding the old manifest
        await writer.load_index("big", entry)
    assert gone.value.retriable and gone.value.key == entry.key
