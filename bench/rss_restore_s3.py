"""Peak resident memory of restoring a base + one delta through S3: the streaming restore
(`SnapshotStore.load_index`: each segment downloaded to a temp file and decoded from it)
vs a restore from bytes (each object read whole into memory, then decoded).

Builds one hnsw index (default 200,000 x 128, cosine, M=16; ef_construction 40 to build
quickly, which does not change the snapshot's size), saves a base and a delta of
`--changed` rewritten ids through `SnapshotStore` to the stack's S3 under a fresh prefix,
then restores in a fresh process per mode and prints, in MiB: the baseline after imports,
the peak (VmHWM) and the resident size once restored (the index itself). Needs a stack
(`source .stack/env`); removes its objects at the end.

    python bench/rss_restore_s3.py
    python bench/rss_restore_s3.py --n 50000 --changed 5000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lhv_index import Clock, Index, IndexParams, Space, Upsert
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import Manifest, SnapshotStore

DIM = 128
TOPIC = "rss"


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _build(config: S3Config, n: int, changed: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    index = Index("big", IndexParams(dim=DIM, space=Space.COSINE, M=16, ef_construction=40))
    started = time.monotonic()
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        vecs = rng.normal(size=(m, DIM)).astype(np.float32)
        index.apply(
            [
                Upsert(id=f"i{start + k}", vector=vecs[k], metadata=None, clock=Clock(0, 1, k))
                for k in range(m)
            ]
        )
    build_s = time.monotonic() - started
    async with S3BlobStore(config) as blobs:
        store = SnapshotStore(blobs, topic=TOPIC, worker_id="bench")
        entry = await store.save_base(0, index.capture_base(), offset=1)
        vecs = rng.normal(size=(changed, DIM)).astype(np.float32)
        index.apply(
            [
                Upsert(id=f"i{k}", vector=vecs[k], metadata=None, clock=Clock(0, 2, k))
                for k in range(changed)
            ]
        )
        entry = entry.with_delta(await store.save_delta(0, index.capture_delta(), offset=2))
        await store.write_manifest(
            Manifest(topic=TOPIC, partition=0, offset=2, indexes={"big": entry}), etag=None
        )
    return {
        "build_s": round(build_s, 1),
        "base_mib": round(entry.bytes / 2**20, 1),
        "delta_mib": round(entry.delta_bytes / 2**20, 1),
    }


async def _restore(config: S3Config, mode: str) -> dict[str, float]:
    from lhv_index import apply_delta, read_snapshot

    async with S3BlobStore(config) as blobs:
        store = SnapshotStore(blobs, topic=TOPIC, worker_id="bench")
        manifest, _ = await store.read_manifest(0)
        assert manifest is not None
        entry = manifest.indexes["big"]
        gc.collect()
        baseline = _status_mib("VmRSS")  # imports, the S3 client and the manifest
        started = time.monotonic()
        if mode == "stream":
            index = await store.load_index("big", entry)
        else:  # each object whole in memory, then decoded from the bytes
            data, _ = await blobs.get(entry.key)
            index, _ = await asyncio.to_thread(read_snapshot, data)
            del data
            for seg in entry.deltas:
                data, _ = await blobs.get(seg.key)
                await asyncio.to_thread(apply_delta, index, data)
                del data
        elapsed = time.monotonic() - started
    gc.collect()
    return {
        "mode": mode,
        "items": len(index),
        "restore_s": round(elapsed, 2),
        "baseline_mib": round(baseline),
        "peak_mib": round(_status_mib("VmHWM")),
        "after_mib": round(_status_mib("VmRSS")),
    }


async def _cleanup(config: S3Config) -> None:
    async with S3BlobStore(config) as blobs:
        for key in await blobs.list():
            await blobs.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--changed", type=int, default=10_000)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["stream", "bytes"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = S3Config.from_env()
    if args.mode:
        config = replace(base, prefix=args.prefix)
        print(json.dumps(asyncio.run(_restore(config, args.mode))))
        return
    prefix = f"{base.key_prefix}bench-rss-{uuid.uuid4().hex[:8]}/"
    config = replace(base, prefix=prefix)
    try:
        print(json.dumps({"n": args.n, "changed": args.changed, **asyncio.run(
            _build(config, args.n, args.changed)
        )}))  # fmt: skip
        for mode in ("stream", "bytes"):
            cmd = [sys.executable, __file__, "--mode", mode, "--prefix", prefix]
            subprocess.run(cmd, check=True)
    finally:
        asyncio.run(_cleanup(config))


if __name__ == "__main__":
    main()
