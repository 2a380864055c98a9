"""kill -9 of the worker at every step of a cross-partition merge, then restart: the merge
completes exactly once in effect.

One `lhv worker` process owns both partitions, so it is the source's owner and the
destination's owner at once. Each process is armed with the next failpoint of the
protocol (`worker/service/merge.py`) and dies there; its successor replays from the last
checkpoint, which drives the same merge to the next step (a replayed `merge` exports
again and produces a duplicate `merge_in`, a `merge_done` lost between the destination's
checkpoint and its production is produced again by the sweeper). After the last restart
the checkpoints in S3 must equal the merge-aware oracle built from the topic, the merge's
requester must have its ack, and the export objects must be gone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mergekit import (
    MergeOracle,
    ack_headers,
    add_records,
    die_at_each,
    finish_merge,
    names_on,
    protocol_auth,
)
from workerkit import assert_index_matches, create_topics, make_env, produce, read_all

from worker.ops.tools import replay_verify
from worker.storage.blobstore import S3BlobStore, S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")

STEPS = [
    "merge_exported",
    "merge_in_produced",
    "merge_in_applied",
    "merge_done_pending",
    "merge_done_applied",
    "merge_cleanup_pending",
]


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

    await die_at_each(env, STEPS, tmp_path)
    indexes, ack = await finish_merge(env, tmp_path, reply_topic, b"k9-merge", timeout_s=90)
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
