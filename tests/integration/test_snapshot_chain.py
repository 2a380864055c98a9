"""A base and its deltas through the real S3: multipart upload, a restore that streams
each segment to a file, GC of a replaced chain, a segment gone under a reader, and a
worker killed after delta checkpoints."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from workerkit import (
    Env,
    WorkerProcess,
    assert_state_matches,
    command_stream,
    end_offsets,
    make_env,
    oracle_from_records,
    produce,
    read_all,
)

from lhv_index import Clock, Delete, EngineKind, Index, IndexParams, Space, Upsert
from worker.ops.tools import verify_snapshots
from worker.storage.blobstore import S3BlobStore, S3Config
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
    entry = await writer.save_index(4, index, offset=1)
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

    rebased = await writer.save_index(4, index, offset=4)
    manifest, _ = await writer.write_manifest(
        Manifest(topic="cmd", partition=4, offset=4, indexes={"big": rebased}), etag=etag
    )
    assert await writer.collect_garbage(manifest) == 3
    assert await blobstore.list("partitions/cmd/00004/snapshots/") == [rebased.key]
    with pytest.raises(SnapshotGone) as gone:  # a reader still holding the old manifest
        await writer.load_index("big", entry)
    assert gone.value.retriable and gone.value.key == entry.key


async def _manifests(env: Env) -> dict[int, Manifest | None]:
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        return {p: (await store.read_manifest(p))[0] for p in range(env.partitions)}


async def test_a_worker_killed_after_delta_checkpoints_restarts_to_the_replayed_state(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    """`lhv worker` checkpoints small changes as deltas on a base; kill -9 after a few,
    write more, restart: the new process restores base + deltas, replays the tail, and its
    checkpoints equal the plain replay of the log; `lhv snapshot verify` checks every part."""
    env = await make_env(bootstrap_servers, s3_config, partitions=1)
    child = env.child_env(
        LHV_CHECKPOINT_RECORDS="150",
        LHV_CHECKPOINT_SECONDS="1",
        LHV_MAX_DELTAS="16",
        LHV_MAX_DELTA_SHARE="10",
    )
    stream = command_stream(3_000, partitions=1, n_indexes=2, seed=21)
    # an index the stream never drops: its chain grows whatever the stream's drops and
    # creates reset and however the worker batches and paces its checkpoints
    steady = [("steady", {"op": "create", "dim": 4, "space": "l2"})]
    first = WorkerProcess(child, tmp_path / "first.log")
    try:
        await produce(env.bootstrap, env.topics.commands, steady)
        for start in range(0, 2_000, 250):
            await produce(env.bootstrap, env.topics.commands, stream[start : start + 250])
            await asyncio.sleep(0.5)
        deadline = time.monotonic() + 120
        n = 0
        while True:  # a checkpoint whose chains hold at least two deltas
            m = (await _manifests(env))[0]
            if m is not None and max((len(e.deltas) for e in m.indexes.values()), default=0) >= 2:
                break
            assert time.monotonic() < deadline, first.log_text()[-3000:]
            n += 1
            item = {"id": f"s{n}", "vector": [1.0, float(n), 0.0, 0.5]}
            await produce(
                env.bootstrap, env.topics.commands, [("steady", {"op": "add", "items": [item]})]
            )
            await asyncio.sleep(0.3)
    finally:
        first.kill9()
    await produce(env.bootstrap, env.topics.commands, stream[2_000:])
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    second = WorkerProcess(child, tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            m = (await _manifests(env))[0]
            if m is not None and m.offset >= ends[0] - 1:
                break
            assert time.monotonic() < deadline, second.log_text()[-3000:]
            await asyncio.sleep(0.5)
    finally:
        code = second.terminate()
    assert code == 0, second.log_text()[-3000:]
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        manifest, _ = await store.read_manifest(0)
        assert manifest is not None
        indexes = {n: await store.load_index(n, e) for n, e in manifest.indexes.items()}
        report = await verify_snapshots(blobs, env.topics.commands)
    assert_state_matches(
        indexes, oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
    )
    assert report.ok, [str(p) for p in report.problems]
    assert report.checked == sum(1 + len(e.deltas) for e in manifest.indexes.values())
