"""kill -9 of the home owner of a sharded index right after it forwarded plain-name
writes (before their acks and before any checkpoint covers them), again and again: each
successor replays from the last checkpoint and forwards the same records again, and the
members apply every write exactly once (the duplicates are skipped by their origin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from mergekit import ack_headers, wait_ack
from workerkit import (
    OracleIndex,
    checkpoints_at_log_end,
    create_topics,
    make_env,
    own_group_worker,
    produce,
    read_all,
    vec_b64,
)

from worker.ops.tools import replay_verify
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.wire.shards import shard_key, shard_of

pytestmark = pytest.mark.asyncio(loop_scope="session")

NAME, SHARDS, DIM = "k9-sharded", 3, 8


async def test_kill9_after_forwarding_applies_every_plain_name_write_once(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=3)
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    rng = np.random.default_rng(5)
    commands = [(NAME, {"op": "create", "dim": DIM, "space": "l2", "shards": SHARDS})]
    ids = [f"k-{i}" for i in range(1500)]
    for b in range(10):
        chunk = ids[b * 150 : (b + 1) * 150]
        items = [{"id": i, "vector_b64": vec_b64(rng.normal(size=DIM))} for i in chunk]
        commands.append((NAME, {"op": "add", "items": items}))
        commands.append((NAME, {"op": "delete", "ids": chunk[:10]}))
    await produce(env.bootstrap, env.topics.commands, commands)

    # small batches: each process dies after its n-th batch that forwarded something
    for i, point in enumerate(["forwarded", "forwarded@3", "forwarded@5"]):
        proc = own_group_worker(
            env, tmp_path / f"w{i}.log", LHV_FAILPOINTS=point, LHV_MAX_POLL_RECORDS="3"
        )
        await proc.dies_at(point, timeout_s=180)

    await produce(
        env.bootstrap,
        env.topics.commands,
        [(NAME, {"op": "add", "items": [{"id": "last", "vector": [1.0] * DIM}]})],
        headers=ack_headers(reply_topic, b"last"),
    )
    proc = own_group_worker(env, tmp_path / "last.log")
    try:
        ack = await wait_ack(env.bootstrap, reply_topic, b"last", timeout_s=120)
        indexes = await checkpoints_at_log_end(env, timeout_s=90)
    finally:
        code = proc.terminate()
    assert code == 0, proc.log_text()[-3000:]
    assert ack["status"] == "ok" and ack["forwarded"], ack

    records = await read_all(env.bootstrap, env.topics.commands)
    forwarded = [r for r in records if r.key and r.key.startswith(f"{NAME}#".encode())]
    origins = [orjson.loads(r.value)["origin"] for r in forwarded]
    assert len(origins) > len({(o["offset"], o["part"]) for o in origins}), "no duplicates"
    oracle = OracleIndex({})
    for rec in records:
        body = orjson.loads(rec.value)
        if rec.key == NAME.encode() and body["op"] == "add":
            oracle.add(body, rec.offset)
        elif rec.key == NAME.encode() and body["op"] == "delete":
            oracle.delete(body, rec.offset)
    live: dict[str, bytes] = {}
    for s in range(SHARDS):
        for id_, (vec, _, _) in indexes[shard_key(NAME, s, SHARDS)].logical_state()["live"].items():
            assert shard_of(id_, SHARDS) == s
            live[id_] = bytes(vec)
    assert live == {i: v[0].astype(np.float32).tobytes() for i, v in oracle.live.items()}
    tombstones = sum(
        len(indexes[shard_key(NAME, s, SHARDS)].logical_state()["tombstones"])
        for s in range(SHARDS)
    )
    assert tombstones == len(oracle.tomb)

    async with S3BlobStore(env.s3) as blobs:
        replay = await replay_verify(env.config(), blobs)
    assert replay.consistent, (replay.diffs, replay.errors)
