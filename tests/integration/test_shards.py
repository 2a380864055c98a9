"""Sharded indexes and aliases on the real stack: a plain Kafka producer keyed by the
index name writes a sharded index exactly as it would write one index, members refuse
ids of other shards, bad `shards` values and alias mistakes are refused, and the
checkpoints replay."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import orjson
import pytest
from mergekit import ack_headers, dlq_records, header, wait_ack, wait_no_merge_objects
from workerkit import (
    Env,
    OracleIndex,
    create_topics,
    make_env,
    produce,
    read_all,
    running,
    vec_b64,
    wait_caught_up,
)

from lhv_index import Index
from lhv_index.errors import InvalidRequest
from worker.client import LhvClient
from worker.ops.tools import ReplayReport, replay_verify
from worker.service import Worker
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.wire.shards import shard_key, shard_of

pytestmark = pytest.mark.asyncio(loop_scope="session")

DIM = 8


class Stack:
    def __init__(self, env: Env, worker: Worker, reply_topic: str) -> None:
        self.env = env
        self.worker = worker
        self.reply_topic = reply_topic
        self._n = 0

    async def command(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        """Produce one command keyed `index` with a plain producer; its ack."""
        self._n += 1
        cid = f"c{self._n}".encode()
        await produce(
            self.env.bootstrap,
            self.env.topics.commands,
            [(index, body)],
            headers=ack_headers(self.reply_topic, cid),
        )
        return await wait_ack(self.env.bootstrap, self.reply_topic, cid)

    def indexes(self) -> dict[str, Index]:
        return {n: i for part in self.worker.partitions.values() for n, i in part.indexes.items()}


@pytest.fixture(scope="module")
async def lhv(bootstrap_servers: str, s3_config: S3Config) -> AsyncIterator[Stack]:
    env = await make_env(bootstrap_servers, s3_config, partitions=4)
    reply_topic = f"lhv.replies.{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    async with running(env.config()) as worker:
        yield Stack(env, worker, reply_topic)


def _create(shards: Any, **params: Any) -> dict[str, Any]:
    return {"op": "create", "dim": DIM, "space": "l2", "M": 8, "ef_construction": 32,
            "shards": shards, **params}  # fmt: skip


def _items(ids: list[str], seed: int, *, meta_every: int = 3) -> list[dict[str, Any]]:
    vecs = np.random.default_rng(seed).normal(size=(len(ids), DIM)).astype(np.float32)
    out = []
    for i, (id_, v) in enumerate(zip(ids, vecs, strict=True)):
        item: dict[str, Any] = {"id": id_, "vector_b64": vec_b64(v)}
        if i % meta_every == 0:
            item["metadata"] = {"i": i, "seed": seed}
        if i % 7 == 0:
            item["version"] = seed
        out.append(item)
    return out


def _members_live(s: Stack, name: str, shards: int) -> dict[str, tuple[bytes, Any, int]]:
    """id -> (vector bytes, metadata, client version) over every member; each id in the
    member of its shard."""
    indexes = s.indexes()
    out: dict[str, tuple[bytes, Any, int]] = {}
    for shard in range(shards):
        key = shard_key(name, shard, shards)
        for id_, (vec, meta, clock) in indexes[key].logical_state()["live"].items():
            assert shard_of(id_, shards) == shard, f"{id_} is in {key}"
            out[id_] = (bytes(vec), meta or None, clock[0])
    return out


async def test_plain_name_writes_equal_the_unsharded_oracle_id_for_id(lhv: Stack) -> None:
    env, name, shards = lhv.env, "sharded-docs", 3
    ack = await lhv.command(name, _create(shards))
    assert ack["status"] == "ok", ack
    assert sorted(ack["forwarded"]) == [f"{name}#{s}" for s in range(shards)]
    commands: list[tuple[str, dict[str, Any]]] = []
    ids = [f"doc-{i}" for i in range(3000)]
    for batch in range(15):
        chunk = ids[batch * 200 : (batch + 1) * 200]
        commands.append((name, {"op": "add", "items": _items(chunk, batch)}))
    commands.append((name, {"op": "delete", "ids": ids[100:400]}))
    again = ids[300:500] + ids[300:310]  # re-adds after the delete, duplicates in one record
    commands.append((name, {"op": "add", "items": _items(again, 99, meta_every=2)}))
    commands.append((name, {"op": "delete", "ids": ids[2990:], "version": 1000}))
    commands.append((name, {"op": "add", "items": _items(ids[2990:], 5)}))  # lower version
    await produce(env.bootstrap, env.topics.commands, commands)
    last = await lhv.command(name, {"op": "add", "items": _items(["last"], 1)})
    assert last["status"] == "ok" and list(last["forwarded"]) == [
        shard_key(name, shard_of("last", shards), shards)
    ]
    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)

    oracle = OracleIndex({})
    for rec in await read_all(env.bootstrap, env.topics.commands):
        body = orjson.loads(rec.value)
        if rec.key == name.encode() and body["op"] == "add":
            oracle.add(body, rec.offset)
        elif rec.key == name.encode() and body["op"] == "delete":
            oracle.delete(body, rec.offset)
    expected = {
        id_: (vec.astype(np.float32).tobytes(), meta or None, clock[0])
        for id_, (vec, meta, clock) in oracle.live.items()
    }
    got = _members_live(lhv, name, shards)
    assert sorted(got) == sorted(expected)
    assert got == expected
    assert name not in lhv.indexes(), "the plain name is no index"
    await _replay_consistent(lhv)


async def _replay_consistent(s: Stack) -> ReplayReport:
    """Once every partition's checkpoint covers what it applied, `lhv replay --verify`
    agrees with the checkpoints (catalog, members and forwarding marks included)."""
    deadline = time.monotonic() + 60
    parts = s.worker.partitions.values()
    while any(p.checkpoint_offset < p.applied_offset for p in parts):
        assert time.monotonic() < deadline, "no checkpoint covers the writes"
        await asyncio.sleep(0.2)
    async with S3BlobStore(s.env.s3) as blobs:
        report = await replay_verify(s.env.config(), blobs)
    assert report.consistent, (report.diffs, report.errors)
    assert report.compared
    return report


async def test_an_item_of_another_shard_written_to_a_member_goes_to_the_dlq(lhv: Stack) -> None:
    name, shards = "sharded-direct", 2
    assert (await lhv.command(name, _create(shards)))["status"] == "ok"
    ids = [f"x{i}" for i in range(50)]
    mine = [i for i in ids if shard_of(i, shards) == 0]
    theirs = next(i for i in ids if shard_of(i, shards) == 1)
    ok = await lhv.command(f"{name}#0", {"op": "add", "items": _items(mine, 1)})
    assert ok["status"] == "ok" and ok["applied"] == len(mine)
    bad_items = _items([*mine[:2], theirs], 2)
    bad = await lhv.command(f"{name}#0", {"op": "add", "items": bad_items})
    assert bad["error"]["code"] == "wrong_partition" and bad["error"]["item"] == 2, bad
    assert f"{name}#1" in bad["error"]["message"]
    dlq = [r for r in await dlq_records(lhv.env) if r.key == f"{name}#0".encode()]
    assert [header(r, "lhv_error_code") for r in dlq] == [b"wrong_partition"]
    live = lhv.indexes()[f"{name}#0"].logical_state()["live"]
    assert sorted(live) == sorted(mine)


async def test_bad_shards_values_are_refused_and_create_nothing(lhv: Stack) -> None:
    for i, shards in enumerate([0, -3, 2.5, "4", 1025]):
        name = f"bad-shards-{i}"
        ack = await lhv.command(name, _create(shards))
        assert ack["error"]["code"] == "invalid_request", (shards, ack)
        assert "shards" in ack["error"]["message"]
        assert not any(n.startswith(name) for n in lhv.indexes())
    member = await lhv.command("made-up#1", {"op": "create", "dim": DIM, "shards": 2})
    assert member["error"]["code"] == "invalid_request", member
    assert "made-up#1" not in lhv.indexes()


async def test_alias_forwarding_and_its_errors(lhv: Stack) -> None:
    name, shards = "aliased-docs", 2
    assert (await lhv.command(name, _create(shards)))["status"] == "ok"
    assert (await lhv.command("plain-docs", _create(1)))["status"] == "ok"
    assert (await lhv.command("docs-live", {"op": "alias", "target": name}))["status"] == "ok"
    write = await lhv.command("docs-live", {"op": "add", "items": _items(["a1", "a2"], 3)})
    # acked by the target's home, which split it over the members
    assert write["status"] == "ok", write
    assert set(write["forwarded"]) <= {shard_key(name, s, shards) for s in range(shards)}
    shadow = await lhv.command("plain-docs", {"op": "alias", "target": name})
    assert shadow["error"]["code"] == "index_exists"
    shadow = await lhv.command(name, {"op": "alias", "target": "plain-docs"})
    assert shadow["error"]["code"] == "index_exists"
    itself = await lhv.command("docs-self", {"op": "alias", "target": "docs-self"})
    assert itself["error"]["code"] == "invalid_request"
    assert (await lhv.command("docs-hop", {"op": "alias", "target": "docs-live"}))["status"] == "ok"
    chain = await lhv.command("docs-hop", {"op": "add", "items": _items(["c1"], 4)})
    # refused by the second alias, and the writer hears it
    assert chain["status"] == "error" and "alias chain" in chain["error"]["message"], chain
    assert (await lhv.command("docs-hop", {"op": "unalias"}))["status"] == "ok"
    gone = await lhv.command("docs-hop", {"op": "unalias"})
    assert gone["error"]["code"] == "index_not_found"
    drop = await lhv.command("docs-live", {"op": "drop"})
    assert drop["error"]["code"] == "invalid_request"
    await wait_caught_up([lhv.worker], lhv.env.bootstrap, lhv.env.topics.commands)
    dlq = await dlq_records(lhv.env)
    chained = [r for r in dlq if r.key == b"docs-live" and b"c1" in (r.value or b"")]
    assert len(chained) == 1 and b"alias chain" in (header(chained[0], "lhv_error_message") or b"")
    assert sorted(_members_live(lhv, name, shards)) == ["a1", "a2"]


async def test_a_sharded_import_is_checked_whole_and_each_member_keeps_its_rows(
    lhv: Stack,
) -> None:
    env, name, shards = lhv.env, "sharded-import", 3
    assert (await lhv.command(name, _create(shards)))["status"] == "ok"
    n = 1000
    vecs = np.random.default_rng(8).normal(size=(n, DIM)).astype(np.float32)
    ids = np.array([f"row-{i}" for i in range(n)])
    source = await _upload(env, "sharded.npy", _npy(vecs))
    ids_source = await _upload(env, "sharded-ids.npy", _npy(ids))
    ack = await lhv.command(name, {"op": "import", "source": source, "ids_source": ids_source})
    assert ack["status"] == "ok" and len(ack["forwarded"]) == shards, ack
    poisoned = vecs.copy()
    poisoned[500, 3] = np.nan
    bad_source = await _upload(env, "poisoned.npy", _npy(poisoned))
    bad = await lhv.command(name, {"op": "import", "source": bad_source})
    assert bad["error"]["code"] == "invalid_request" and bad["error"]["item"] == 500, bad
    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
    live = _members_live(lhv, name, shards)
    assert sorted(live) == sorted(ids.tolist())
    assert live["row-7"][0] == vecs[7].tobytes()


async def _upload(env: Env, name: str, data: bytes) -> str:
    key = f"{env.s3.key_prefix}imports/{name}"
    async with S3BlobStore(replace(env.s3, prefix="")) as blobs:
        await blobs.put(key, data)
    return f"s3://{env.s3.bucket}/{key}"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


async def test_bad_input_gets_its_error_code_and_a_dlq_record_and_loses_nothing(
    lhv: Stack,
) -> None:
    """Each mistake: an error ack naming it, its record in the DLQ; a good write after
    each is applied, and the sharded index ends equal to the good writes, id for id."""
    env, name, shards = lhv.env, "guarded", 3
    assert (await lhv.command(name, _create(shards)))["status"] == "ok"
    assert (await lhv.command("guarded-live", {"op": "alias", "target": name}))["status"] == "ok"
    oracle = OracleIndex({})
    good = 0

    async def good_write() -> None:
        nonlocal good
        good += 1
        ids = [f"g{good}-{i}" for i in range(20)] + [f"g{good - 1}-{i}" for i in range(5)]
        body = {"op": "add", "items": _items(ids, good)}
        ack = await lhv.command(name, body)
        assert ack["status"] == "ok", ack
        oracle.add(body, ack["offset"])

    mine = next(f"x{i}" for i in range(100) if shard_of(f"x{i}", shards) == 0)
    theirs = next(f"x{i}" for i in range(100) if shard_of(f"x{i}", shards) == 1)
    mistakes: list[tuple[str, dict[str, Any], str]] = [
        ("guarded-zero", _create(0), "invalid_request"),
        ("guarded-negative", _create(-2), "invalid_request"),
        ("guarded-huge", _create(1025), "invalid_request"),
        (name, _create(4), "index_exists"),  # the same name with another shard count
        (f"{name}#0", {"op": "add", "items": _items([mine, theirs], 7)}, "wrong_partition"),
        (name, {"op": "alias", "target": "elsewhere"}, "index_exists"),  # shadowing an index
        ("guarded-live", _create(1), "index_exists"),  # an index shadowing an alias
        ("guarded-live", {"op": "drop"}, "invalid_request"),
    ]
    for key, body, code in mistakes:
        ack = await lhv.command(key, body)
        assert ack["status"] == "error" and ack["error"]["code"] == code, (key, body, ack)
        await good_write()
    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
    dlq = await dlq_records(env)
    for key, body, code in mistakes:
        mine_dlq = [
            r
            for r in dlq
            if r.key == key.encode() and orjson.loads(r.value or b"{}").get("op") == body["op"]
        ]
        assert [header(r, "lhv_error_code") for r in mine_dlq][-1:] == [code.encode()], key
    assert not any(n.startswith("guarded-") for n in lhv.indexes())

    # an alias loop: a -> b, b -> a; a write by either reaches the other alias and is
    # refused there ("alias chain"), and that refusal is the writer's ack; a query by
    # either is refused; nothing is created
    for a, b in (("loop-a", "loop-b"), ("loop-b", "loop-a")):
        assert (await lhv.command(a, {"op": "alias", "target": b}))["status"] == "ok"
    for a in ("loop-a", "loop-b"):
        ack = await lhv.command(a, {"op": "add", "items": _items([f"{a}-1"], 3)})
        assert ack["status"] == "error", ack
        assert ack["error"]["code"] == "invalid_request", ack
        assert "alias chain" in ack["error"]["message"], ack
        await good_write()
    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
    dlq = await dlq_records(env)
    for a, b in (("loop-a", "loop-b"), ("loop-b", "loop-a")):
        chained = [r for r in dlq if r.key == b.encode() and f"{a}-1".encode() in (r.value or b"")]
        assert len(chained) == 1, a
        assert header(chained[0], "lhv_error_code") == b"invalid_request"
        assert b"alias chain" in (header(chained[0], "lhv_error_message") or b"")
    async with LhvClient(env.bootstrap, topics=env.topics, timeout_s=30) as c:
        with pytest.raises(InvalidRequest, match="alias chain"):
            await c.search("loop-a", np.ones(DIM, dtype=np.float32), k=1)
        # an alias of an alias of an index: the client, which follows one hop, does not
        # write or search past the second alias either
        await c.create("chain-flat", dim=DIM, space="l2")
        await c.alias("chain-live", "chain-flat")
        await c.alias("chain-2", "chain-live")
        one = np.ones((1, DIM), dtype=np.float32)
        with pytest.raises(InvalidRequest, match="alias chain"):
            await c.add("chain-2", ["c1"], one, ack=True)
        with pytest.raises(InvalidRequest, match="alias chain"):
            await c.search("chain-2", one[0], k=1)
        assert await c.get("chain-flat", ["c1"]) == []
    assert not any(n.startswith("loop-") for n in lhv.indexes())

    expected = {
        id_: (vec.astype(np.float32).tobytes(), meta or None, clock[0])
        for id_, (vec, meta, clock) in oracle.live.items()
    }
    assert _members_live(lhv, name, shards) == expected
    await _replay_consistent(lhv)


# -- merges into sharded indexes ----------------------------------------------------------------


def _state(items: list[dict[str, Any]]) -> dict[str, tuple[bytes, Any, int]]:
    """id -> (vector bytes, metadata, client version) of `_items` written once each."""
    return {
        it["id"]: (base64.b64decode(it["vector_b64"]), it.get("metadata"), it.get("version", 0))
        for it in items
    }


async def _until(check: Any, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.2)


async def test_a_sharded_index_merged_into_one_of_other_shards_equals_the_oracle(
    lhv: Stack,
) -> None:
    env, src, dest = lhv.env, "merge-src-3", "merge-dest-2"
    assert (await lhv.command(src, _create(3)))["status"] == "ok"
    assert (await lhv.command(dest, _create(2)))["status"] == "ok"
    src_items = _items([f"m-{i}" for i in range(2400)], 11)
    dest_items = _items([f"m-{i}" for i in range(2000, 2600)], 12)
    commands = [(src, {"op": "add", "items": src_items[i : i + 300]}) for i in range(0, 2400, 300)]
    commands += [(dest, {"op": "add", "items": dest_items[i : i + 300]}) for i in (0, 300)]
    await produce(env.bootstrap, env.topics.commands, commands)
    await wait_caught_up([lhv.worker], env.bootstrap, env.topics.commands)
    ack = await lhv.command(src, {"op": "merge", "dest": dest, "clear_source": True})
    assert ack["status"] == "ok" and len(ack["forwarded"]) == 3, ack
    expected = {**_state(src_items), **_state(dest_items)}  # the destination's items win

    def merged() -> bool:
        return not _members_live(lhv, src, 3) and _members_live(lhv, dest, 2) == expected

    await _until(merged, "the destination equals the oracle and the source is empty")
    assert _members_live(lhv, dest, 2) == expected
    await wait_no_merge_objects(env)
    report = await _replay_consistent(lhv)
    members = {shard_key(dest, s, 2) for s in range(2)} | {shard_key(src, s, 3) for s in range(3)}
    assert members <= set(report.compared), "the replay rebuilt every member of both"
    assert not members & set(report.not_replayable)


async def test_a_merge_into_a_sharded_index_is_acknowledged_once_every_shard_took_its_items(
    lhv: Stack,
) -> None:
    env, src, dest = lhv.env, "merge-plain-src", "merge-dest-3"
    assert (await lhv.command(src, _create(1)))["status"] == "ok"
    assert (await lhv.command(dest, _create(3)))["status"] == "ok"
    items = _items([f"p-{i}" for i in range(500)], 21)
    assert (await lhv.command(src, {"op": "add", "items": items}))["status"] == "ok"
    ack = await lhv.command(src, {"op": "merge", "dest": dest})
    assert ack["status"] == "ok" and (ack["applied"], ack["skipped"]) == (500, 0), ack
    assert _members_live(lhv, dest, 3) == _state(items)
    await wait_no_merge_objects(env)
