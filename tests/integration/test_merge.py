"""Merge across owners and bulk import from S3, on the real stack (DESIGN section 6)."""

from __future__ import annotations

import asyncio
import io
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest
from mergekit import (
    MergeOracle,
    ack_headers,
    add_records,
    dlq_records,
    header,
    merge_objects,
    names_on,
    protocol_auth,
    wait_ack,
    wait_no_merge_objects,
)
from workerkit import (
    Env,
    all_indexes,
    assert_index_matches,
    create_topics,
    make_env,
    produce,
    read_all,
    running,
    wait_caught_up,
)

from lhv_index import Clock, Index, IndexParams, Upsert, write_snapshot
from lhv_index.errors import DimMismatch, IndexNotFound, InvalidRequest
from worker.client import LhvClient
from worker.ops.tools import replay_verify
from worker.service import Worker
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

DIM = 8


class Stack:
    def __init__(self, env: Env, worker: Worker, client: LhvClient, reply_topic: str) -> None:
        self.env = env
        self.worker = worker
        self.client = client
        self.reply_topic = reply_topic


@pytest.fixture(scope="module")
async def lhv(bootstrap_servers: str, s3_config: S3Config) -> AsyncIterator[Stack]:
    env = await make_env(bootstrap_servers, s3_config, partitions=3)
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    async with (
        running(env.config()) as worker,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=120) as client,
    ):
        yield Stack(env, worker, client, reply_topic)


async def _create(c: LhvClient, name: str, *, dim: int = DIM, space: str = "l2") -> None:
    await c.create(name, dim=dim, space=space, M=8, ef_construction=32)


async def _check_against_oracle(s: Stack, *names: str) -> None:
    await wait_caught_up([s.worker], s.env.bootstrap, s.env.topics.commands)
    records = await read_all(s.env.bootstrap, s.env.topics.commands)
    oracle = MergeOracle(s.env.partitions, await protocol_auth(s.env)).run(records)
    indexes = all_indexes([s.worker])
    for name in names:
        assert_index_matches(name, indexes[name], oracle[name])


def _vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


async def test_cross_partition_merge_moves_exactly_the_exported_items(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    src, dest = names_on(env.partitions, same=False, prefix="big")
    await _create(c, src)
    await _create(c, dest)
    n = 50_000
    ids = [f"s-{i}" for i in range(n)]
    vecs = _vectors(n, 1)
    meta = [{"n": i} if i % 3 == 0 else None for i in range(n)]
    dest_vecs = _vectors(2_000, 2)
    dest_ids = [f"s-{i}" for i in range(1_000)] + [f"d-{i}" for i in range(1_000)]
    await produce(env.bootstrap, env.topics.commands, add_records(src, ids, vecs, meta))
    await produce(env.bootstrap, env.topics.commands, add_records(dest, dest_ids, dest_vecs))
    # tombstones in dest older than the merge: the merged items win over them
    await produce(
        env.bootstrap,
        env.topics.commands,
        [(dest, {"op": "delete", "ids": [f"s-{i}" for i in range(1_000, 1_100)]})],
    )
    # The merge, then writes to src after it in the same partition's log.
    await produce(
        env.bootstrap,
        env.topics.commands,
        [(src, {"op": "merge", "dest": dest, "clear_source": True})],
        headers=ack_headers(lhv.reply_topic, b"big-merge"),
    )
    after_ids = [f"n-{i}" for i in range(100)] + [f"s-{i}" for i in range(2_000, 2_010)]
    await produce(env.bootstrap, env.topics.commands, add_records(src, after_ids, _vectors(110, 3)))

    ack = await wait_ack(env.bootstrap, lhv.reply_topic, b"big-merge")
    assert ack["status"] == "ok", ack
    assert (ack["applied"], ack["skipped"]) == (n - 1_000, 1_000)
    await _check_against_oracle(lhv, src, dest)
    indexes = all_indexes([lhv.worker])
    assert len(indexes[dest]) == n + 1_000
    assert set(indexes[src].logical_state()["live"]) == set(after_ids)
    # ids already live in dest kept dest's values
    (kept,) = indexes[dest].get(["s-5"])
    assert np.array_equal(kept.vector, dest_vecs[5])
    hits = await c.search(dest, vecs[30_000], k=1)
    assert hits[0].id == "s-30000"
    await wait_no_merge_objects(env)


async def test_merge_within_one_partition_is_applied_in_one_step(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    src, dest = names_on(env.partitions, same=True, prefix="local")
    await _create(c, src)
    await _create(c, dest)
    ids = [f"x-{i}" for i in range(500)]
    await c.add(src, ids, _vectors(500, 4), ack=True)
    await c.add(dest, ids[:50], _vectors(50, 5), ack=True)
    result = await c.merge(src, dest, clear_source=True)
    assert result.ack is not None
    assert (result.ack["applied"], result.ack["skipped"]) == (450, 50)
    await _check_against_oracle(lhv, src, dest)
    indexes = all_indexes([lhv.worker])
    assert len(indexes[src]) == 0 and len(indexes[dest]) == 500
    assert await merge_objects(env) == []


async def test_merge_errors_change_nothing(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    src, far = names_on(env.partitions, same=False, prefix="err")
    _, near = names_on(env.partitions, same=True, prefix="err")
    await _create(c, src)
    ids = [f"e-{i}" for i in range(100)]
    await c.add(src, ids, _vectors(100, 6), ack=True)
    before = all_indexes([lhv.worker])[src].logical_state()

    with pytest.raises(InvalidRequest):
        await c.merge(src, src)
    with pytest.raises(IndexNotFound):
        await c.merge("err-nothing", far)
    for dest in (far, near):  # unknown destination, across partitions and within one
        with pytest.raises(IndexNotFound):
            await c.merge(src, dest, clear_source=True)
    for dest in (far, near):
        await _create(c, dest, dim=DIM + 1)
        with pytest.raises(DimMismatch):
            await c.merge(src, dest, clear_source=True)
        await c.drop(dest)
        await _create(c, dest, space="cosine")
        with pytest.raises(InvalidRequest, match="space"):
            await c.merge(src, dest, clear_source=True)

    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
    indexes = all_indexes([lhv.worker])
    assert indexes[src].logical_state() == before
    assert len(indexes[far]) == 0 and len(indexes[near]) == 0
    await wait_no_merge_objects(env)


async def test_protocol_records_naming_other_objects_are_rejected(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    src, dest = names_on(env.partitions, same=False, prefix="forged")
    await _create(c, src)
    await c.add(src, ["f-1"], _vectors(1, 13), ack=True)
    manifest = f"partitions/{env.topics.commands}/00000/manifest.json"
    forged = [
        (src, {"op": "merge_done", "dest": dest, "merge_id": "m0-1", "export": manifest}),
        (
            dest,
            {
                "op": "merge_in",
                "source_index": src,
                "merge_id": "m0-1",
                "export": manifest,
                "origin_partition": 0,
                "origin_offset": 1,
            },
        ),
    ]
    for i, record in enumerate(forged):
        cid = f"forged-{i}".encode()
        await produce(
            env.bootstrap, env.topics.commands, [record], headers=ack_headers(lhv.reply_topic, cid)
        )
        ack = await wait_ack(env.bootstrap, lhv.reply_topic, cid)
        assert ack["status"] == "error" and ack["error"]["code"] == "invalid_request", ack
    assert len(all_indexes([lhv.worker])[src]) == 1


async def test_resending_a_merge_changes_nothing(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    for clear in (False, True):
        src, dest = names_on(env.partitions, same=False, prefix=f"again{int(clear)}")
        await _create(c, src)
        await _create(c, dest)
        await c.add(src, [f"r-{i}" for i in range(300)], _vectors(300, 7), ack=True)
        await c.add(dest, [f"r-{i}" for i in range(0, 300, 3)], _vectors(100, 8), ack=True)
        first = await c.merge(src, dest, clear_source=clear)
        assert first.ack is not None and first.ack["applied"] == 200
        await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
        indexes = all_indexes([lhv.worker])
        states = {n: indexes[n].logical_state() for n in (src, dest)}
        again = await c.merge(src, dest, clear_source=clear)
        assert again.ack is not None
        assert (again.ack["applied"], again.ack["skipped"]) == (0, 0 if clear else 300)
        await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
        indexes = all_indexes([lhv.worker])
        assert {n: indexes[n].logical_state() for n in (src, dest)} == states
        await _check_against_oracle(lhv, src, dest)
    await wait_no_merge_objects(env)


# -- import ------------------------------------------------------------------------------------


async def _upload(env: Env, name: str, data: bytes) -> str:
    """Put `data` where imports may read by default (`imports/` of the workers' bucket
    and prefix); returns its s3:// URI."""
    key = f"{env.s3.key_prefix}imports/{name}"
    async with S3BlobStore(replace(env.s3, prefix="")) as blobs:
        await blobs.put(key, data)
    return f"s3://{env.s3.bucket}/{key}"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


async def _import(c: LhvClient, index: str, **body: Any) -> dict[str, object]:
    result = await c.import_(index, ack=True, timeout_s=120, **body)
    assert result.ack is not None
    return result.ack


async def test_import_of_npy_with_ids_is_applied_and_searchable(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    name = "imported"
    await c.create(name, dim=32, space="cosine", M=8, ef_construction=64)
    n = 20_000
    vecs = _vectors(n, 9, dim=32)
    ids = np.array([f"doc-{i}" for i in range(n)])
    source = await _upload(env, "vecs.npy", _npy(vecs))
    ids_source = await _upload(env, "ids.npy", _npy(ids))
    ack = await _import(c, name, source=source, ids_source=ids_source, chunk_items=5_000)
    assert (ack["status"], ack["applied"], ack["skipped"]) == ("ok", n, 0)
    stats = await c.stats(name)
    assert stats["count"] == n
    hits = await c.search(name, vecs[1234], k=3)
    assert hits[0].id == "doc-1234"
    (item,) = await c.get(name, ["doc-77"], include_vectors=True)
    assert np.allclose(item["vector"], vecs[77], atol=1e-6)
    state = all_indexes([lhv.worker])[name]
    assert state.clock_of("doc-5") == Clock(0, ack["offset"], 5)


async def test_import_of_npz_and_snapshot_with_metadata(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    name = "imported-npz"
    await c.create(name, dim=4, space="l2", engine="exact")
    vecs = _vectors(10, 10, dim=4)
    buf = io.BytesIO()
    np.savez(buf, vectors=vecs, ids=np.array([f"z{i}" for i in range(10)]))
    meta = b"\n".join(orjson.dumps({"i": i} if i % 2 else None) for i in range(10)) + b"\n"
    ack = await _import(
        c,
        name,
        source=await _upload(env, "v.npz", buf.getvalue()),
        metadata_source=await _upload(env, "m.jsonl", meta),
        version=3,
    )
    assert ack["applied"] == 10
    items = {it["id"]: it for it in await c.get(name, [f"z{i}" for i in range(10)])}
    assert items["z3"]["metadata"] == {"i": 3} and not items["z2"].get("metadata")
    # An LHV1 snapshot brings its ids, metadata and client versions.
    snap = Index("other", IndexParams(dim=4, space="l2", engine="exact"))
    snap.apply([Upsert(f"z{i}", vecs[i] * 2, {"snap": i}, Clock(7, 1, i)) for i in range(5)])
    out = io.BytesIO()
    write_snapshot(snap, out, source={})
    ack = await _import(c, name, source=await _upload(env, "s.lhv", out.getvalue()))
    assert ack["applied"] == 5
    state = all_indexes([lhv.worker])[name]
    assert state.clock_of("z1") == Clock(7, ack["offset"], 1)
    (z1,) = state.get(["z1"])
    assert z1.metadata == {"snap": 1} and np.allclose(z1.vector, vecs[1] * 2)


async def test_invalid_imports_change_nothing(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    name = "imported-bad"
    await c.create(name, dim=4, space="l2", engine="exact")
    good = await _upload(env, "good.npy", _npy(_vectors(10, 11, dim=4)))
    poisoned = _vectors(10, 12, dim=4)
    poisoned[7, 2] = np.nan
    with pytest.raises(InvalidRequest) as nan:
        await _import(c, name, source=await _upload(env, "nan.npy", _npy(poisoned)), chunk_items=3)
    assert nan.value.item == 7
    with pytest.raises(DimMismatch):
        await _import(c, name, source=await _upload(env, "d5.npy", _npy(_vectors(3, 1, dim=5))))
    with pytest.raises(InvalidRequest, match="does not exist"):
        await _import(c, name, source=f"s3://{env.s3.bucket}/{env.s3.key_prefix}imports/none.npy")
    with pytest.raises(InvalidRequest, match="rows and its ids differ") as short:
        await _import(
            c, name, source=good, ids_source=await _upload(env, "i.npy", _npy(np.arange(4)))
        )
    assert "4" not in short.value.message  # nothing read from the objects is echoed
    with pytest.raises(IndexNotFound):
        await _import(c, "imported-none", source=good)
    assert (await c.stats(name))["count"] == 0
    ack = await _import(c, name, source=good)
    assert ack["applied"] == 10
    assert home_partition(name.encode(), env.partitions) in lhv.worker.partitions


# -- forged protocol records, and what a failed merge dead-letters -----------------------------


def _dlq_of(records: list[Any], value: bytes) -> Any:
    found = [r for r in records if r.value == value]
    assert len(found) == 1, f"{len(found)} DLQ records hold {value!r}"
    return found[0]


async def test_forged_protocol_records_change_nothing_and_the_real_merge_completes(
    lhv: Stack,
) -> None:
    c, env = lhv.client, lhv.env
    topic = env.topics.commands
    forged_values: list[bytes] = []
    for real_clear, forged_clear in ((False, True), (True, False)):
        src, dest = names_on(env.partitions, same=False, prefix=f"forge{int(real_clear)}")
        await _create(c, src)
        await _create(c, dest)
        ids = [f"g-{i}" for i in range(20)]
        await c.add(src, ids, _vectors(20, 30), ack=True)
        await c.add(dest, ["other"], _vectors(1, 31), ack=True)
        cid = f"real-{int(real_clear)}".encode()
        ((p, offset),) = await produce(
            env.bootstrap,
            topic,
            [(src, {"op": "merge", "dest": dest, "clear_source": real_clear})],
            headers=ack_headers(lhv.reply_topic, cid),
        )
        # Right behind the merge record, as an attacker racing it would: records naming
        # the real merge id and export, without the workers' MAC.
        merge_id, export = f"m{p}-{offset}", f"merges/{topic}/exports/{p:05d}/{offset:020d}.lhv"
        forged = [
            (
                src,
                {
                    "op": "merge_done",
                    "dest": dest,
                    "export": export,
                    "merge_id": merge_id,
                    "applied": 20,
                    "clear_source": forged_clear,
                },
            ),
            (
                dest,
                {
                    "op": "merge_in",
                    "source_index": src,
                    "export": export,
                    "merge_id": merge_id,
                    "origin_partition": p,
                    "origin_offset": offset,
                    "clear_source": forged_clear,
                },
            ),
        ]
        for i, record in enumerate(forged):
            fcid = f"forged-{int(real_clear)}-{i}".encode()
            await produce(
                env.bootstrap, topic, [record], headers=ack_headers(lhv.reply_topic, fcid)
            )
            ack = await wait_ack(env.bootstrap, lhv.reply_topic, fcid)
            assert ack["status"] == "error" and ack["error"]["code"] == "invalid_request", ack
            assert "lhv_internal_mac" in ack["error"]["message"]
            forged_values.append(orjson.dumps({"index": record[0], **record[1]}))

        ack = await wait_ack(env.bootstrap, lhv.reply_topic, cid)
        assert ack["status"] == "ok" and (ack["applied"], ack["skipped"]) == (20, 0), ack
        await _check_against_oracle(lhv, src, dest)
        indexes = all_indexes([lhv.worker])
        assert set(indexes[dest].logical_state()["live"]) == {*ids, "other"}
        assert len(indexes[src]) == (0 if real_clear else 20)

    dlq = await dlq_records(env)
    for value in forged_values:
        rec = _dlq_of(dlq, value)
        assert header(rec, "lhv_error_code") == b"invalid_request"
    await wait_no_merge_objects(env)
    # The operator's replay verifies the records as the worker does: the checkpoints agree.
    async with S3BlobStore(env.s3) as blobs:
        replay = await replay_verify(env.config(), blobs)
    assert replay.consistent, (replay.diffs, replay.errors)


async def test_failed_cross_partition_merge_dead_letters_the_requesters_merge_record(
    lhv: Stack,
) -> None:
    c, env = lhv.client, lhv.env
    src, dest = names_on(env.partitions, same=False, prefix="deadmerge")
    await _create(c, src)
    await _create(c, dest, dim=DIM + 1)
    await c.add(src, ["a", "b"], _vectors(2, 40), ack=True)
    cid = b"dead-merge"
    headers = [*ack_headers(lhv.reply_topic, cid), ("trace", b"t-123")]
    command = {"op": "merge", "dest": dest, "clear_source": True}
    ((p, offset),) = await produce(
        env.bootstrap, env.topics.commands, [(src, command)], headers=headers
    )

    ack = await wait_ack(env.bootstrap, lhv.reply_topic, cid)
    assert ack["status"] == "error" and ack["error"]["code"] == "dim_mismatch", ack
    assert (ack["op"], ack["offset"]) == ("merge", offset)
    dlq = await dlq_records(env)
    rec = _dlq_of(dlq, orjson.dumps({"index": src, **command}))
    assert rec.key == src.encode()
    assert header(rec, "trace") == b"t-123"
    assert header(rec, "kafka_correlationId") == cid
    assert header(rec, "lhv_error_code") == b"dim_mismatch"
    assert header(rec, "lhv_source_partition") == str(p).encode()
    assert header(rec, "lhv_source_offset") == str(offset).encode()
    merge_id = f"m{p}-{offset}".encode()
    assert not [r for r in dlq if b'"merge_done"' in r.value and merge_id in r.value]
    await _check_against_oracle(lhv, src, dest)
    assert len(all_indexes([lhv.worker])[src]) == 2
    await wait_no_merge_objects(env)


# -- imports: allowed sources and bounds -------------------------------------------------------


async def _put_raw(env: Env, key: str, data: bytes) -> str:
    async with S3BlobStore(replace(env.s3, prefix="")) as blobs:
        await blobs.put(key, data)
    return f"s3://{env.s3.bucket}/{key}"


async def _a_snapshot_key(env: Env, *, timeout_s: float = 60.0) -> str:
    """The key of one of the workers' snapshots (checkpoints run every 2 s here)."""
    deadline = time.monotonic() + timeout_s
    async with S3BlobStore(env.s3) as blobs:
        while True:
            keys = await blobs.list(f"partitions/{env.topics.commands}/")
            found = [k for k in keys if k.endswith(".lhv")]
            if found:
                return found[0]
            assert time.monotonic() < deadline, "no checkpoint was written"
            await asyncio.sleep(0.5)


async def test_imports_outside_the_allowed_sources_are_refused_and_change_nothing(
    lhv: Stack,
) -> None:
    c, env = lhv.client, lhv.env
    name = "imported-refused"
    await c.create(name, dim=4, space="l2", engine="exact")
    await c.add(name, ["keep"], _vectors(1, 50, dim=4), ack=True)
    bucket, prefix = env.s3.bucket, env.s3.key_prefix
    p = home_partition(name.encode(), env.partitions)
    manifest = f"s3://{bucket}/{prefix}partitions/{env.topics.commands}/{p:05d}/manifest.json"
    snapshot = await _a_snapshot_key(env)
    elsewhere = await _put_raw(env, f"{prefix}elsewhere/v.npy", _npy(_vectors(3, 51, dim=4)))
    good = await _upload(env, "ok.npy", _npy(_vectors(3, 52, dim=4)))
    before = all_indexes([lhv.worker])[name].logical_state()

    outside = [
        {"source": f"s3://other-bucket/{prefix}imports/v.npy"},
        {"source": elsewhere},
    ]
    own = [
        {"source": manifest},
        {"source": good, "ids_source": f"s3://{bucket}/{prefix}keys/internal-mac.key"},
        {"source": good, "metadata_source": f"s3://{bucket}/{prefix}merges/x.jsonl"},
        {"source": f"s3://{bucket}/{prefix}{snapshot}"},
    ]
    tricks = [
        {"source": f"s3://{bucket}/{prefix}imports/../partitions/x.npy"},
        {"source": f"s3://{bucket}/{prefix}imports//ok.npy"},
        {"source": f"s3://{bucket}/{prefix}imports/%2e%2e/elsewhere/v.npy"},
        {"source": f"s3://{bucket}/{prefix}imports/./ok.npy"},
        {"source": good, "ids_source": f"s3://{bucket}/{prefix}imports/..%2fkeys/k.npy"},
    ]
    for body in outside:
        with pytest.raises(InvalidRequest, match="LHV_IMPORT_SOURCES"):
            await _import(c, name, **body)
    for body in own:
        with pytest.raises(InvalidRequest, match="workers' own"):
            await _import(c, name, **body)
    for body in tricks:
        with pytest.raises(InvalidRequest, match="plain s3://bucket/key"):
            await _import(c, name, **body)
    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
    assert all_indexes([lhv.worker])[name].logical_state() == before


def _npz_bomb(inflated_mib: int) -> bytes:
    """A .npz whose `vectors` member inflates to `inflated_mib` MiB of zeros (written in
    chunks: the test never holds it inflated)."""
    rows = inflated_mib * 1024 * 1024 // (128 * 4)
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("vectors.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(
            member, {"descr": "<f4", "fortran_order": False, "shape": (rows, 128)}
        )
        chunk = bytes(1024 * 1024)
        for _ in range(inflated_mib):
            member.write(chunk)
    return buf.getvalue()


def _npy_header_only(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy header declaring `shape`, followed by 64 bytes instead of the array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + bytes(64)


async def test_import_bombs_are_refused_before_inflating(lhv: Stack) -> None:
    c, env = lhv.client, lhv.env
    name = "imported-bombs"
    await c.create(name, dim=128, space="l2", engine="exact")
    bomb = _npz_bomb(256)
    assert len(bomb) < 2 * 1024 * 1024
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_COMPRESSION_RATIO"):
        await _import(c, name, source=await _upload(env, "bomb.npz", bomb))
    huge = _npy_header_only((10**7, 10**6))
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_BYTES"):
        await _import(c, name, source=await _upload(env, "huge.npy", huge))
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_BYTES"):
        await _import(
            c,
            name,
            source=await _upload(env, "v.npy", _npy(_vectors(1, 60, dim=128))),
            ids_source=await _upload(env, "huge-ids.npy", _npy_header_only((10**9,), "<U64")),
        )
    short = _npy_header_only((1000, 128))  # declares more than it holds
    with pytest.raises(InvalidRequest, match=r"not a readable \.npy"):
        await _import(c, name, source=await _upload(env, "short.npy", short))
    assert (await c.stats(name))["count"] == 0
