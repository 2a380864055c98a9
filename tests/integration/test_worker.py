"""The worker on the real stack: apply, replay equivalence, checkpoints, restore, fencing,
bad input, acks, S3 outages and the retention guard."""

from __future__ import annotations

import asyncio
import base64
import random
import struct
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from workerkit import (
    Env,
    all_indexes,
    assert_state_matches,
    command_stream,
    end_offsets,
    index_names,
    make_env,
    oracle_from_records,
    produce,
    produce_raw,
    read_all,
    running,
    wait_caught_up,
)

from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import Fenced, SnapshotStore
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=3)


async def _open_blobs(env: Env) -> S3BlobStore:
    blobs = S3BlobStore(env.s3)
    await blobs.start()
    return blobs


async def test_live_apply_equals_fresh_replay_and_oracle(env: Env) -> None:
    stream = command_stream(20_000, partitions=env.partitions, n_indexes=9, seed=11)
    async with running(env.config()) as live:
        # Produce while the worker runs, in uneven chunks, so polls cut the stream anywhere.
        rng = random.Random(3)
        i = 0
        while i < len(stream):
            n = rng.randint(1, 3000)
            await produce(env.bootstrap, env.topics.commands, stream[i : i + n])
            i += n
        await wait_caught_up([live], env.bootstrap, env.topics.commands)
        live_state = {n: idx.logical_state() for n, idx in all_indexes([live]).items()}
        oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
        assert_state_matches(all_indexes([live]), oracle)

    # A fresh worker: new group, new S3 prefix, so no snapshot: it replays everything.
    fresh_env = await make_env(env.bootstrap, env.s3)
    fresh_cfg = env.config(group_id=fresh_env.group, s3=fresh_env.s3)
    async with running(fresh_cfg) as fresh:
        await wait_caught_up([fresh], env.bootstrap, env.topics.commands)
        replayed = all_indexes([fresh])
        assert set(replayed) == set(live_state)
        for name, idx in replayed.items():
            assert idx.logical_state() == live_state[name], name
        assert_state_matches(replayed, oracle)


async def test_restart_restores_from_s3_then_replays_the_tail(env: Env) -> None:
    first = command_stream(3_000, partitions=env.partitions, seed=5)
    async with running(env.config()) as w:
        await produce(env.bootstrap, env.topics.commands, first)
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
    # Stopped gracefully: every partition was checkpointed.
    blobs = await _open_blobs(env)
    try:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        manifests = [await store.read_manifest(p) for p in range(env.partitions)]
    finally:
        await blobs.stop()
    assert all(m is not None and m.offset >= 0 and m.indexes for m, _ in manifests)
    tail = command_stream(1_000, partitions=env.partitions, seed=6)[9:]  # no re-creates
    await produce(env.bootstrap, env.topics.commands, tail)
    async with running(env.config()) as w2:
        await wait_caught_up([w2], env.bootstrap, env.topics.commands)
        oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
        assert_state_matches(all_indexes([w2]), oracle)
        # It claimed each partition's manifest (a new generation) after loading it.
        for p, (m, _) in enumerate(manifests):
            assert m is not None
            restored = w2.partitions[p].manifest
            assert restored is not None and restored.generation > m.generation


async def test_two_workers_split_partitions_and_survivor_takes_over(env: Env) -> None:
    stream = command_stream(4_000, partitions=env.partitions, seed=9)
    await produce(env.bootstrap, env.topics.commands, stream[:2000])
    async with running(env.config()) as a:
        async with running(env.config()) as b:
            await produce(env.bootstrap, env.topics.commands, stream[2000:3000])
            for _ in range(600):  # the group rebalances once b joins
                if (
                    a.partitions
                    and b.partitions
                    and (len(a.partitions) + len(b.partitions) == env.partitions)
                ):
                    break
                await asyncio.sleep(0.1)
            assert a.partitions and b.partitions, "both workers should own partitions"
            assert not set(a.partitions) & set(b.partitions)
            await wait_caught_up([a, b], env.bootstrap, env.topics.commands)
            oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
            assert_state_matches(all_indexes([a, b]), oracle)
        # b left the group (its partitions were checkpointed); a takes everything.
        await produce(env.bootstrap, env.topics.commands, stream[3000:])
        await wait_caught_up([a], env.bootstrap, env.topics.commands)
        assert sorted(a.partitions) == list(range(env.partitions))
        oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
        assert_state_matches(all_indexes([a]), oracle)


async def test_zombie_cannot_overwrite_the_new_owners_manifest(env: Env) -> None:
    stream = command_stream(500, partitions=env.partitions, seed=2)
    async with running(env.config()) as zombie:
        await produce(env.bootstrap, env.topics.commands, stream)
        await wait_caught_up([zombie], env.bootstrap, env.topics.commands)
        p = min(zombie.partitions)
        part = zombie.partitions[p]
        blobs = await _open_blobs(env)
        try:
            # A new owner claims the partition (what restore does) while the zombie still
            # believes it owns it.
            other = SnapshotStore(blobs, topic=env.topics.commands, worker_id="new-owner")
            manifest, etag = await other.read_manifest(p)
            assert manifest is not None
            claimed, _ = await other.write_manifest(
                replace(manifest, generation=manifest.generation + 1), etag=etag
            )
            # The zombie has new state and tries to checkpoint: fenced, state dropped.
            part.dirty.update(part.indexes)
            done = await zombie.ownership.checkpoint(part, reason="test")
            assert done is False
            assert p not in zombie.partitions
            after, _ = await other.read_manifest(p)
            assert after is not None and after.writer == "new-owner"
            assert after.generation == claimed.generation
            with pytest.raises(Fenced):
                await other.write_manifest(after, etag=etag)
        finally:
            await blobs.stop()


def _b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def _bad_inputs(name: str, dim: int) -> list[tuple[str, bytes | None, bytes | None, str]]:
    """(what, key, value, expected error code)"""
    k = name.encode()
    good = [0.1] * dim
    add = {"op": "add", "index": name}
    j = orjson.dumps
    return [
        ("undecodable json", k, b"{not json", "invalid_request"),
        ("not an object", k, j([1, 2, 3]), "invalid_request"),
        ("unknown op", k, j({"op": "explode", "index": name}), "invalid_request"),
        (
            "missing index",
            k,
            j({"op": "add", "items": [{"id": "a", "vector": good}]}),
            "invalid_request",
        ),
        (
            "key differs from index",
            k,
            j({**add, "index": "other", "items": [{"id": "a", "vector": good}]}),
            "invalid_request",
        ),
        (
            "unknown index",
            b"nope-" + k,
            j({"op": "add", "index": "nope-" + name, "items": [{"id": "a", "vector": good}]}),
            "index_not_found",
        ),
        (
            "dim mismatch",
            k,
            j({**add, "items": [{"id": "a", "vector": [0.1] * (dim + 1)}]}),
            "dim_mismatch",
        ),
        (
            "nan in a b64 vector",
            k,
            j({**add, "items": [{"id": "a", "vector_b64": _b64([float("nan")] * dim)}]}),
            "invalid_request",
        ),
        (
            "zero vector under cosine",
            k,
            j({**add, "items": [{"id": "a", "vector": [0.0] * dim}]}),
            "invalid_request",
        ),
        ("empty id", k, j({**add, "items": [{"id": "", "vector": good}]}), "invalid_request"),
        (
            "metadata not an object",
            k,
            j({**add, "items": [{"id": "a", "vector": good, "metadata": [1]}]}),
            "invalid_request",
        ),
        (
            "oversize metadata",
            k,
            j({**add, "items": [{"id": "a", "vector": good, "metadata": {"x": "y" * 70_000}}]}),
            "invalid_request",
        ),
        (
            "too many items",
            k,
            j({**add, "items": [{"id": f"i{i}", "vector": good} for i in range(10_001)]}),
            "invalid_request",
        ),
        (
            "negative version",
            k,
            j({"op": "delete", "index": name, "ids": ["a"], "version": -1}),
            "invalid_request",
        ),
        (
            "both vector and vector_b64",
            k,
            j({**add, "items": [{"id": "a", "vector": good, "vector_b64": _b64(good)}]}),
            "invalid_request",
        ),
        (
            "create with other params",
            k,
            j({"op": "create", "index": name, "dim": dim + 3}),
            "index_exists",
        ),
        ("no key", None, j({**add, "items": [{"id": "a", "vector": good}]}), "invalid_request"),
        ("empty value", k, None, "invalid_request"),
    ]


async def test_bad_input_goes_to_the_dlq_and_good_records_around_it_apply(env: Env) -> None:
    name = "dlq-target"
    home = home_partition(name.encode(), env.partitions)
    dim = 4
    bad = _bad_inputs(name, dim)
    assert len(bad) >= 15
    records: list[tuple[bytes | None, bytes | None, int | None]] = [
        (name.encode(), orjson.dumps({"op": "create", "index": name, "dim": dim}), home)
    ]
    for i, (_what, key, value, _code) in enumerate(bad):
        records.append((key, value, home))
        records.append(
            (
                name.encode(),
                orjson.dumps(
                    {
                        "op": "add",
                        "index": name,
                        "items": [{"id": f"good-{i}", "vector": [1.0, 0, 0, i]}],
                    }
                ),
                home,
            )
        )
    # A record for this index produced to a partition that is not its home.
    wrong = (home + 1) % env.partitions
    records.append(
        (
            name.encode(),
            orjson.dumps(
                {
                    "op": "add",
                    "index": name,
                    "items": [{"id": "misrouted", "vector": [1.0, 0, 0, 0]}],
                }
            ),
            wrong,
        )
    )
    async with running(env.config()) as w:
        await produce_raw(env.bootstrap, env.topics.commands, records)
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
        index = w.partitions[home].indexes[name]
        assert sorted(index.logical_state()["live"]) == sorted(f"good-{i}" for i in range(len(bad)))
        await w.flush_producer()
    dlq = await read_all(env.bootstrap, env.topics.dlq)
    got = sorted(dict(r.headers)["lhv_error_code"].decode() for r in dlq)
    expected = sorted([code for *_rest, code in bad] + ["wrong_partition"])
    assert got == expected
    by_offset = {}
    for rec in dlq:
        headers = dict(rec.headers)
        assert headers["lhv_source_topic"].decode() == env.topics.commands
        assert headers["lhv_error_message"]
        by_offset[int(headers["lhv_source_offset"].decode())] = rec
    # The original key and value are kept.
    for what, key, value, _code in bad:
        assert any(r.key == key and r.value == value for r in dlq), what


async def test_acks_report_applied_and_rejected_commands(env: Env) -> None:
    from lhv_index.errors import DimMismatch, IndexExists
    from worker.client import LhvClient

    name = "acked"
    async with running(env.config()), LhvClient(env.bootstrap, topics=env.topics) as c:
        ack = await c.create(name, dim=3, space="l2")
        assert ack.ack is not None and ack.ack["status"] == "ok" and ack.ack["applied"] == 1
        again = await c.create(name, dim=3, space="l2")  # identical: a no-op
        assert again.ack is not None and again.ack["status"] == "ok"
        with pytest.raises(IndexExists):
            await c.create(name, dim=4, space="l2")
        w = await c.add(name, ["a", "b"], [[1, 0, 0], [0, 1, 0]], ack=True)
        assert w.ack is not None and w.ack["applied"] == 2
        with pytest.raises(DimMismatch):
            await c.add(name, ["c"], [[1, 0, 0, 0]], ack=True)


async def test_acks_to_a_reply_topic_that_is_gone_are_dropped_and_the_partition_goes_on(
    env: Env,
) -> None:
    """Every command asks for an ack on a reply topic nobody created (a client that
    stopped deletes its own): the worker drops those acks after one bounded wait and
    applies everything, in order, without stopping the partition."""
    gone = [("kafka_replyTopic", b"lhv.replies.gone-forever"), ("kafka_correlationId", b"x")]
    stream = command_stream(400, partitions=env.partitions, n_indexes=3, seed=71)
    await produce(env.bootstrap, env.topics.commands, stream, headers=gone)
    async with running(env.config()) as w:
        await wait_caught_up([w], env.bootstrap, env.topics.commands, timeout_s=60)
        assert_state_matches(
            all_indexes([w]),
            oracle_from_records(await read_all(env.bootstrap, env.topics.commands)),
        )
        dropped = w.metrics.registry.get_sample_value("lhv_replies_dropped_total")
        assert dropped is not None and dropped >= len(stream)


async def test_worker_keeps_applying_while_s3_is_down_and_checkpoints_after(
    make_local_stack,
) -> None:
    local = await asyncio.to_thread(make_local_stack)  # a private stack: S3 gets stopped
    env = await make_env(local.bootstrap_servers, S3Config.from_env(local.env()), partitions=2)
    stream = command_stream(1_500, partitions=env.partitions, seed=21)
    async with running(env.config()) as w:
        await produce(env.bootstrap, env.topics.commands, stream[:500])
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
        before = {p: part.checkpoint_offset for p, part in w.partitions.items()}
        await asyncio.to_thread(local.stop_s3)
        try:
            await produce(env.bootstrap, env.topics.commands, stream[500:])
            await wait_caught_up([w], env.bootstrap, env.topics.commands)
            await asyncio.sleep(3)  # past the checkpoint interval: attempts fail meanwhile
            applied = {p: part.applied_offset for p, part in w.partitions.items()}
            assert any(applied[p] > before[p] for p in applied)
            assert all(part.checkpoint_offset <= before[p] for p, part in w.partitions.items())
        finally:
            await asyncio.to_thread(local.start_s3)
        # S3 is back: checkpoints catch up with what was applied, nothing was lost.
        for _ in range(300):
            if all(w.partitions[p].checkpoint_offset >= applied[p] for p in applied):
                break
            await asyncio.sleep(0.1)
        assert all(w.partitions[p].checkpoint_offset >= applied[p] for p in applied)
        oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
        assert_state_matches(all_indexes([w]), oracle)


async def test_retention_guard_refuses_a_partition_whose_log_lost_records(env: Env) -> None:
    stream = command_stream(400, partitions=env.partitions, seed=4)
    async with running(env.config()) as w:
        await produce(env.bootstrap, env.topics.commands, stream)
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
    more = command_stream(400, partitions=env.partitions, seed=8)[9:]
    await produce(env.bootstrap, env.topics.commands, more)
    # Delete records past the checkpoint (as retention would) on every partition.
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    await admin.start()
    try:
        await admin.delete_records(
            {
                TopicPartition(env.topics.commands, p): RecordsToDelete(before_offset=end - 1)
                for p, end in ends.items()
            }
        )
    finally:
        await admin.close()
    async with running(env.config()) as w2:
        for _ in range(300):
            if len(w2.partitions) == env.partitions and all(
                part.status.value == "refused" for part in w2.partitions.values()
            ):
                break
            await asyncio.sleep(0.1)
        states = {p: part.status.value for p, part in w2.partitions.items()}
        assert states == dict.fromkeys(range(env.partitions), "refused")
        assert all("gone" in part.refused_reason for part in w2.partitions.values())
    async with running(env.config(accept_data_loss=True)) as w3:
        await wait_caught_up([w3], env.bootstrap, env.topics.commands)


async def test_large_records_are_buffered_and_applied_within_the_byte_bounds(env: Env) -> None:
    """A backlog of large `add` records, far over the worker's read-ahead bound: fetching
    pauses and resumes, each apply batch stays near `max_batch_bytes`, and every write
    lands (state equals the oracle of the topic)."""
    rng = np.random.default_rng(5)
    name = index_names(1, env.partitions)[0]
    stream: list[tuple[str, dict[str, Any]]] = [(name, {"op": "create", "dim": 64, "space": "l2"})]
    for r in range(60):  # 60 records of ~45 KB: 2.7 MB in all
        vecs = rng.normal(size=(128, 64)).astype("<f4")
        items = [
            {"id": f"r{r}-{i % 100}", "vector_b64": base64.b64encode(v.tobytes()).decode()}
            for i, v in enumerate(vecs)
        ]
        stream.append((name, {"op": "add", "items": items}))
    await produce(env.bootstrap, env.topics.commands, stream)
    config = env.config(max_pending_bytes=200_000, max_batch_bytes=100_000)
    async with running(config) as worker:
        await wait_caught_up([worker], env.bootstrap, env.topics.commands)
        batches = worker.metrics.registry.get_sample_value("lhv_apply_seconds_count")
        assert_state_matches(
            all_indexes([worker]),
            oracle_from_records(await read_all(env.bootstrap, env.topics.commands)),
        )
    # 2.7 MB in batches of at most ~100 KB (+ one poll): many batches, not one
    assert batches is not None and batches >= 20, batches
