"""kill -9 of `lhv worker` at the worst moments, then restart: nothing lost, nothing doubled.

Each crash point is armed through LHV_FAILPOINTS, so the process dies exactly there:
mid-batch (applied in memory, acks not sent), mid-snapshot (a snapshot uploaded, the
manifest not written), and between the manifest write and the Kafka commit. One more
kill comes from outside at an arbitrary moment. After the last restart the worker's
checkpoints in S3 must equal the oracle built from the topic.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from workerkit import (
    Env,
    WorkerProcess,
    assert_state_matches,
    command_stream,
    create_topics,
    end_offsets,
    make_env,
    oracle_from_records,
    produce,
    read_all,
)

from lhv_index.errors import LhvError
from worker.client import LhvClient
from worker.storage.blobstore import S3BlobStore
from worker.storage.snapshots import SnapshotStore

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _checkpointed_state(env: Env, *, timeout_s: float = 120.0):
    """Wait until every partition's manifest covers the log end; load those snapshots."""
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    blobs = S3BlobStore(env.s3)
    await blobs.start()
    try:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        deadline = time.monotonic() + timeout_s
        while True:
            manifests = {p: (await store.read_manifest(p))[0] for p in range(env.partitions)}
            if all(m is not None and m.offset >= ends[p] - 1 for p, m in manifests.items()):
                break
            assert time.monotonic() < deadline, (
                f"checkpoints did not reach the log end: "
                f"{ {p: (m.offset if m else None) for p, m in manifests.items()} } vs {ends}"
            )
            await asyncio.sleep(0.5)
        indexes = {}
        for m in manifests.values():
            assert m is not None
            for name, entry in m.indexes.items():
                indexes[name] = await store.load_index(name, entry)
        return indexes
    finally:
        await blobs.stop()


async def _acks(env: Env, topic: str) -> list[dict]:
    import orjson

    return [orjson.loads(r.value) for r in await read_all(env.bootstrap, topic)]


async def test_kill9_at_every_step_loses_nothing(
    bootstrap_servers: str, s3_config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    stream = command_stream(6_000, partitions=env.partitions, seed=13)
    ack_headers = [("kafka_replyTopic", reply_topic.encode()), ("kafka_correlationId", b"kill9")]
    crashes = ["mid_batch@1", "mid_snapshot@1", "after_manifest@1", "after_manifest@2"]
    chunk = len(stream) // (len(crashes) + 2)
    sent = 0
    for i, point in enumerate(crashes):
        proc = WorkerProcess(env.child_env(LHV_FAILPOINTS=point), tmp_path / f"w{i}.log")
        await produce(
            env.bootstrap, env.topics.commands, stream[sent : sent + chunk], headers=ack_headers
        )
        sent += chunk
        await proc.dies_at(point, timeout_s=90)
    # One kill from outside, at whatever moment it lands.
    proc = WorkerProcess(env.child_env(), tmp_path / "outside.log")
    await produce(
        env.bootstrap, env.topics.commands, stream[sent : sent + chunk], headers=ack_headers
    )
    sent += chunk
    await asyncio.sleep(4)
    proc.kill9()
    # The last worker runs to the end, and stops gracefully.
    await produce(env.bootstrap, env.topics.commands, stream[sent:], headers=ack_headers)
    proc = WorkerProcess(env.child_env(), tmp_path / "last.log")
    try:
        indexes = await _checkpointed_state(env)
    finally:
        code = proc.terminate()
    assert code == 0, proc.log_text()[-3000:]
    records = await read_all(env.bootstrap, env.topics.commands)
    oracle = oracle_from_records(records)
    assert_state_matches(indexes, oracle)
    # Every acknowledged write is in the final state (the oracle holds every record).
    acks = await _acks(env, reply_topic)
    acked = {a["offset"] for a in acks if a.get("status") == "ok"}
    assert acked, "the workers acknowledged nothing"
    assert len(acked) >= len(stream) * 0.5


async def test_a_static_member_killed_and_restarted_takes_its_partitions_back_at_once(
    bootstrap_servers: str, s3_config, tmp_path: Path
) -> None:
    """With LHV_GROUP_INSTANCE_ID the coordinator hands a restarted worker its partitions
    as soon as it rejoins, instead of waiting out the dead process's session (60 s here);
    the writes acknowledged before the kill are all there."""
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    child = env.child_env(LHV_GROUP_INSTANCE_ID="static-1", LHV_SESSION_TIMEOUT_MS="60000")
    first = WorkerProcess(child, tmp_path / "first.log")
    try:
        async with LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c:
            await c.create("s", dim=4, space="l2", engine="exact")
            written = await c.add(
                "s", [f"v{i}" for i in range(500)], [[i, 1, 2, 3] for i in range(500)]
            )
            await c.search("s", [1, 1, 2, 3], after=written)
        first.kill9()
        killed = time.monotonic()
        second = WorkerProcess(child, tmp_path / "second.log")
        try:
            async with LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c:
                while True:
                    try:
                        stats = await c.stats("s", timeout_s=2)
                        break
                    except (TimeoutError, LhvError):
                        assert time.monotonic() - killed < 60, (
                            "no answer before the session ran out"
                        )
                answered = time.monotonic() - killed
            assert stats["count"] == 500
            # well inside the 60 s session: the partitions were not waiting for it
            assert answered < 30, f"answered {answered:.1f} s after the kill"
        finally:
            assert second.terminate() == 0, second.log_text()[-3000:]
    finally:
        if first.proc.poll() is None:
            first.kill9()
