"""kill -9 of the worker at every step of a cross-partition merge, then restart: the merge
completes exactly once in effect.

One `lhv worker` process owns both partitions, so it is the source's owner and the
destination's owner at once. Each process is armed with the next failpoint of the
protocol (`worker/merge.py`) and dies there; its successor replays from the last
checkpoint, which drives the same merge to the next step (a replayed `merge` exports
again and produces a duplicate `merge_in`, a `merge_done` lost between the destination's
checkpoint and its production is produced again by the sweeper). After the last restart
the checkpoints in S3 must equal the merge-aware oracle built from the topic, the merge's
requester must have its ack, and the export objects must be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mergekit import (
    MergeOracle,
    ack_headers,
    add_records,
    merge_objects,
    names_on,
    protocol_auth,
    wait_ack,
)
from workerkit import (
    Env,
    WorkerProcess,
    assert_index_matches,
    create_topics,
    end_offsets,
    make_env,
    produce,
    read_all,
)

from lhv_index import Index
from worker.ops.tools import replay_verify
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import SnapshotStore

pytestmark = pytest.mark.asyncio(loop_scope="session")

STEPS = [
    "merge_exported",
    "merge_in_produced",
    "merge_in_applied",
    "merge_done_pending",
    "merge_done_applied",
    "merge_cleanup_pending",
]


def _worker(env: Env, log: Path, **extra: str) -> WorkerProcess:
    # A group of its own per process: the dead one's session need not expire first
    # (fencing by manifest generation keeps a late old owner out anyway).
    return WorkerProcess(env.child_env(LHV_GROUP_ID=f"g{uuid.uuid4().hex[:8]}", **extra), log)


async def _checkpointed(env: Env, *, timeout_s: float = 90.0) -> dict[str, Index]:
    """Once the merge objects are gone, wait for checkpoints to cover the log end."""
    deadline = time.monotonic() + timeout_s
    while await merge_objects(env):
        assert time.monotonic() < deadline, f"merge never completed: {await merge_objects(env)}"
        await asyncio.sleep(0.5)
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        while True:
            manifests = {p: (await store.read_manifest(p))[0] for p in range(env.partitions)}
            if all(m is not None and m.offset >= ends[p] - 1 for p, m in manifests.items()):
                break
            assert time.monotonic() < deadline, "checkpoints did not reach the log end"
            await asyncio.sleep(0.5)
        return {
            name: await store.load_index(name, entry)
            for m in manifests.values()
            if m is not None
            for name, entry in m.indexes.items()
        }


async def test_kill9_at_every_merge_step_completes_the_merge_once(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    src, dest = names_on(env.partitions, same=False, prefix="k9")
    rng = np.random.default_rng(21)
    n = 3_000
    setup = [
        (src, {"op": "create", "dim": 8, "space": "l2", "M": 8, "ef_construction": 32}),
        (dest, {"op": "create", "dim": 8, "space": "l2", "engine": "exact"}),
        *add_records(src, [f"s-{i}" for i in range(n)], rng.normal(size=(n, 8))),
        *add_records(dest, [f"s-{i}" for i in range(0, n, 10)], rng.normal(size=(n // 10, 8))),
    ]
    await produce(env.bootstrap, env.topics.commands, setup)
    await produce(
        env.bootstrap,
        env.topics.commands,
        [(src, {"op": "merge", "dest": dest, "clear_source": True})],
        headers=ack_headers(reply_topic, b"k9-merge"),
    )
    later = [f"s-{i}" for i in range(5)] + [f"late-{i}" for i in range(20)]
    await produce(
        env.bootstrap, env.topics.commands, add_records(src, later, rng.normal(size=(25, 8)))
    )

    for i, point in enumerate(STEPS):
        proc = _worker(env, tmp_path / f"w{i}.log", LHV_FAILPOINTS=point)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.proc.wait, 180)
        code = proc.proc.poll()
        log = proc.log_text()
        proc.kill9()
        assert code == -9, f"worker did not die at {point} (exit {code}):\n{log[-3000:]}"
        assert f"failpoint {point} reached" in log

    proc = _worker(env, tmp_path / "last.log")
    try:
        indexes = await _checkpointed(env)
        ack = await wait_ack(env.bootstrap, reply_topic, b"k9-merge", timeout_s=30)
    finally:
        code = proc.terminate()
    assert code == 0, proc.log_text()[-3000:]
    assert ack["status"] == "ok" and ack["applied"] == n - n // 10, ack

    records = await read_all(env.bootstrap, env.topics.commands)
    ops = [r.value for r in records]
    assert sum(b'"op":"merge_in"' in v for v in ops) >= 2, "the replayed merge produced again"
    oracle = MergeOracle(env.partitions, await protocol_auth(env)).run(records)
    for name in (src, dest):
        assert_index_matches(name, indexes[name], oracle[name])
    assert set(oracle[src].live) == set(later)
    assert len(oracle[dest].live) == n

    # The operator's check agrees: the replay, duplicates and all, rebuilds both indexes.
    async with S3BlobStore(env.s3) as blobs:
        replay = await replay_verify(env.config(), blobs)
    assert replay.consistent, (replay.diffs, replay.errors)
    assert sorted(replay.compared) == sorted([src, dest]) and replay.not_replayable == []
