"""SnapshotStore over the in-memory blob store: manifests, fencing, snapshots, GC."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest

from lhv_index import Clock, Index, IndexParams, Upsert
from worker.storage.blobstore import MIB, MemoryBlobStore, S3Config, _chunks_of_file
from worker.storage.snapshots import Fenced, Manifest, SnapshotStore


def _index(n: int = 10) -> Index:
    idx = Index("docs", IndexParams(dim=4, space="l2"))
    rng = np.random.default_rng(0)
    idx.apply(
        [
            Upsert(
                id=f"i{i}",
                vector=rng.normal(size=4).astype(np.float32),
                metadata={"n": i},
                clock=Clock(0, i, 0),
            )
            for i in range(n)
        ]
    )
    return idx


async def test_manifest_writes_are_fenced_by_etag() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        assert await store.read_manifest(0) == (None, None)
        m, etag = await store.write_manifest(Manifest(topic="cmd", partition=0), etag=None)
        with pytest.raises(Fenced):  # create-only when it exists
            await store.write_manifest(Manifest(topic="cmd", partition=0), etag=None)
        claimed, etag2 = await store.write_manifest(replace(m, generation=1), etag=etag)
        with pytest.raises(Fenced):  # the old owner still holds the old etag
            await store.write_manifest(replace(m, offset=5), etag=etag)
        back, etag3 = await store.read_manifest(0)
        assert back == claimed and etag3 == etag2 and back.writer == "a"


async def test_snapshot_round_trip_and_garbage_collection() -> None:
    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        idx = _index()
        old = await store.save_index(3, idx, offset=7)
        new = await store.save_index(3, idx, offset=9)
        loaded = await store.load_index("docs", new)
        assert loaded.logical_state() == idx.logical_state()
        manifest = Manifest(topic="cmd", partition=3, offset=9, indexes={"docs": new})
        assert await store.collect_garbage(manifest) == 1
        assert old.key not in await blobs.list("")
        assert new.key in await blobs.list("")


async def test_a_corrupted_snapshot_is_never_loaded() -> None:
    from lhv_index.errors import Internal

    async with MemoryBlobStore() as blobs:
        store = SnapshotStore(blobs, topic="cmd", worker_id="a")
        entry = await store.save_index(0, _index(), offset=1)
        data, _ = await blobs.get(entry.key)
        broken = bytearray(data)
        broken[len(broken) // 2] ^= 0xFF
        await blobs.put(entry.key, bytes(broken))
        with pytest.raises(Internal):
            await store.load_index("docs", entry)


class _ShortReads(io.RawIOBase):
    """A file whose reads return at most `most` bytes: what a pipe or a socket may do."""

    def __init__(self, data: bytes, most: int) -> None:
        self._data, self._pos, self._most = data, 0, most

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = len(self._data) if size < 0 else size
        out = self._data[self._pos : self._pos + min(size, self._most)]
        self._pos += len(out)
        return out


@pytest.mark.parametrize("extra", [0, 1, 3 * MIB])
@pytest.mark.parametrize("most", [None, 3 * MIB + 7])
async def test_a_file_is_uploaded_in_whole_parts_whatever_its_reads_return(
    extra: int, most: int | None
) -> None:
    cfg = S3Config(bucket="b", part_size_bytes=5 * MIB, multipart_threshold_bytes=11 * MIB)
    data = np.random.default_rng(1).integers(0, 256, 23 * MIB + extra, dtype=np.uint8).tobytes()
    f: io.RawIOBase | io.BytesIO = io.BytesIO(data) if most is None else _ShortReads(data, most)
    first = f.read(cfg.multipart_threshold_bytes + 1)
    parts = [part async for part in _chunks_of_file(first, f, cfg)]  # type: ignore[arg-type]
    assert b"".join(parts) == data
    assert [len(p) for p in parts[:-1]] == [cfg.part_size_bytes] * (len(parts) - 1)
    assert 0 < len(parts[-1]) <= cfg.part_size_bytes
