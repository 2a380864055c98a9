"""The replay budget on the real stack: with the records and seconds bounds out of reach,
`lhv worker` still checkpoints during ingest once the replay a restart would need passes
`LHV_CHECKPOINT_MAX_REPLAY_S`, logs why, and a worker killed with -9 restarts from such a
checkpoint to the state of a plain replay."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

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

from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import Manifest, SnapshotStore


async def _manifest(env: Env) -> Manifest | None:
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        return (await store.read_manifest(0))[0]


async def test_a_worker_checkpoints_for_its_replay_budget_and_restarts_from_there(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=1)
    child = env.child_env(
        LHV_CHECKPOINT_RECORDS="1000000000",
        LHV_CHECKPOINT_SECONDS="3600",
        LHV_CHECKPOINT_MAX_REPLAY_S="0.05",
        LHV_CHECKPOINT_MAX_TIME_SHARE="1",
    )
    stream = command_stream(3_000, partitions=1, n_indexes=2, seed=31)
    first = WorkerProcess(child, tmp_path / "first.log")
    try:
        for start in range(0, 2_000, 250):
            await produce(env.bootstrap, env.topics.commands, stream[start : start + 250])
            await asyncio.sleep(0.3)
        deadline = time.monotonic() + 120
        while (m := await _manifest(env)) is None or m.offset < 0:
            assert time.monotonic() < deadline, first.log_text()[-3000:]
            await asyncio.sleep(0.3)
    finally:
        first.kill9()
    assert re.search(
        r"checkpoint started \(estimated replay [\d.]+s over the budget", first.log_text()
    )
    await produce(env.bootstrap, env.topics.commands, stream[2_000:])
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    second = WorkerProcess(child, tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 120
        while "partition serving at offset" not in second.log_text():
            assert time.monotonic() < deadline, second.log_text()[-3000:]
            await asyncio.sleep(0.3)
    finally:
        code = second.terminate()  # a final checkpoint of everything
    assert code == 0, second.log_text()[-3000:]
    restored = re.search(r"checkpoint offset (\d+), replaying to (\d+)", second.log_text())
    assert restored is not None and 0 <= int(restored[1]) < int(restored[2]) == ends[0] - 1
    manifest = await _manifest(env)
    assert manifest is not None and manifest.offset == ends[0] - 1
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        indexes = {n: await store.load_index(n, e) for n, e in manifest.indexes.items()}
    assert_state_matches(
        indexes, oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
    )
