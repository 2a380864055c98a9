"""kill -9 of the worker at every step of a merge into a sharded index, then restart: the
merge completes exactly once in effect.

One `lhv worker` process owns every partition (the source, the destination's home and its
members). Each process is armed with the next failpoint of the protocol and dies there;
its successor replays from the last checkpoint. After the last restart the destination's
members hold the oracle's items id for id, the source is empty, the requester has its
ack, no merge object is left, and `lhv replay --verify` agrees with the checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mergekit import ack_headers, add_records, die_at_each, finish_merge
from workerkit import create_topics, make_env, produce

from worker.ops.tools import replay_verify
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.wire.shards import shard_key
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

SHARDS = 3
STEPS = [
    "merge_exported",
    "merge_in_produced",
    "forwarded",
    "merge_in_applied",
    "merge_done_pending",
    "merge_done_applied",
    "merge_cleanup_pending",
]


async def test_kill9_at_every_step_of_a_merge_into_a_sharded_index_completes_it_once(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=4)
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    dest = "k9-into"
    src = next(
        f"k9-from-{i}"
        for i in range(1000)
        if home_partition(f"k9-from-{i}".encode(), 4) != home_partition(dest.encode(), 4)
    )
    rng = np.random.default_rng(5)
    n = 2_000
    src_vecs = rng.normal(size=(n, 8)).astype(np.float32)
    dest_vecs = rng.normal(size=(n // 10, 8)).astype(np.float32)
    src_ids = [f"s-{i}" for i in range(n)]
    dest_ids = src_ids[::10]
    setup = [
        (src, {"op": "create", "dim": 8, "space": "l2", "engine": "exact"}),
        (dest, {"op": "create", "dim": 8, "space": "l2", "engine": "exact", "shards": SHARDS}),
        *add_records(src, src_ids, src_vecs),
        *add_records(dest, dest_ids, dest_vecs),
    ]
    await produce(env.bootstrap, env.topics.commands, setup)
    await produce(
        env.bootstrap,
        env.topics.commands,
        [(src, {"op": "merge", "dest": dest, "clear_source": True})],
        headers=ack_headers(reply_topic, b"k9-shard-merge"),
    )

    await die_at_each(env, STEPS, tmp_path)
    indexes, ack = await finish_merge(env, tmp_path, reply_topic, b"k9-shard-merge", timeout_s=120)
    assert ack["status"] == "ok" and ack["applied"] == n - n // 10, ack

    expected = {id_: v.tobytes() for id_, v in zip(src_ids, src_vecs, strict=True)}
    expected.update({id_: v.tobytes() for id_, v in zip(dest_ids, dest_vecs, strict=True)})
    got: dict[str, bytes] = {}
    for s in range(SHARDS):
        for id_, (vec, _meta, _clock) in (
            indexes[shard_key(dest, s, SHARDS)].logical_state()["live"].items()
        ):
            got[id_] = bytes(vec)
    assert got == expected
    assert not indexes[src].logical_state()["live"], "the source was cleared"

    async with S3BlobStore(env.s3) as blobs:
        replay = await replay_verify(env.config(), blobs)
    assert replay.consistent, (replay.diffs, replay.errors)
    assert replay.not_replayable == []
