"""A sharded index on the real stack: S=4 members over 4 partitions served by two
`lhv worker` processes.

- 20k mixed writes through the client (updates, deletes, client versions, duplicates
  within one call) end up, id for id, as the same writes applied to one unsharded
  `lhv_index.Index`;
- searches equal an exact top-k up to the engine's recall, and read-your-writes holds
  across members;
- a plain aiokafka requester with Spring headers keyed by the index's name gets the
  merged answer from the name's home;
- a member whose worker is down makes the answer fail naming it, or flagged partial when
  the caller allows it;
- hostile queries keyed by the name, its members or an alias each get a reply, never
  `internal`, and the workers log no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from workerkit import Env, WorkerProcess, create_topics, make_env

from lhv_index import Clock, Delete, EngineKind, Index, IndexParams, Space, Upsert
from lhv_index.errors import IndexNotFound, LhvError
from worker.client import LhvClient, ShardsMissing, WriteResult
from worker.client.client import stop_consumer
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC
from worker.wire.shards import shard_key, shard_of
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

SHARDS = 4
PARTITIONS = 4
DIM = 8
#: its members sit on 4 consecutive partitions: all of them
NAME = "sharded"


def _member_partition(shard: int) -> int:
    return home_partition(shard_key(NAME, shard, SHARDS).encode(), PARTITIONS)


@contextlib.asynccontextmanager
async def _workers(env: Env, tmp_path: Path, n: int = 2, **extra: str) -> Any:
    procs = [
        WorkerProcess(env.child_env(LHV_WORKER_ID=f"w{i}", **extra), tmp_path / f"w{i}.log")
        for i in range(n)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.terminate(30)


async def _owners_once_both_serve(c: LhvClient, *, timeout_s: float = 60.0) -> dict[int, str]:
    """The worker serving each member, once both workers serve some (the group settled).

    A sharded create is acknowledged once its home has forwarded the members' creates to
    their partitions, not once each member's owner applied its own: until then a member
    answers `index_not_found`, and is asked again."""
    deadline = time.monotonic() + timeout_s
    while True:
        owner = {}
        for s in range(SHARDS):
            with contextlib.suppress(IndexNotFound):
                member = await c.query(shard_key(NAME, s, SHARDS), {"op": "stats"})
                owner[s] = str(member["worker"])
        if len(owner) == SHARDS and set(owner.values()) == {"w0", "w1"}:
            return owner
        assert time.monotonic() < deadline, f"the workers did not share the members: {owner}"
        await asyncio.sleep(0.5)


def _merge_positions(a: WriteResult | None, b: WriteResult) -> WriteResult:
    if a is None:
        return b
    offsets = dict(a.offsets)
    for key, off in b.offsets.items():
        offsets[key] = max(offsets.get(key, -1), off)
    return WriteResult(b.partition, b.offset, a.records + b.records, b.ack, offsets)


class _Writes:
    """Mixed writes through the client, applied the same way to one unsharded index."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.oracle = Index("oracle", IndexParams(dim=DIM, space=Space.L2, engine=EngineKind.EXACT))
        self.seq = 0
        self.versions: dict[str, int] = {}
        self.position: WriteResult | None = None
        self.ids = [f"doc-{i}" for i in range(3000)]

    async def add(self, c: LhvClient, n: int, *, versioned: bool) -> None:
        ids = list(self.rng.choice(self.ids, size=n))
        ids += ids[: n // 10]  # duplicates within one call: the later one wins
        vecs = self.rng.standard_normal((len(ids), DIM)).astype(np.float32)
        metas: list[dict[str, Any] | None] = [
            None if self.rng.random() < 0.3 else {"g": int(self.rng.integers(3))} for _ in ids
        ]
        version = int(self.rng.integers(1, 50)) if versioned else None
        self.seq += 1
        wrote = await c.add(NAME, ids, vecs, metas, version=version, batch_size=200)
        self.position = _merge_positions(self.position, wrote)
        self.oracle.apply(
            [
                Upsert(id=i, vector=v, metadata=m, clock=Clock(version or 0, self.seq, pos))
                for pos, (i, v, m) in enumerate(zip(ids, vecs, metas, strict=True))
            ]
        )

    async def delete(self, c: LhvClient, n: int, *, versioned: bool) -> None:
        ids = list(self.rng.choice(self.ids, size=n))
        version = int(self.rng.integers(1, 50)) if versioned else None
        self.seq += 1
        wrote = await c.delete(NAME, ids, version=version)
        self.position = _merge_positions(self.position, wrote)
        self.oracle.apply(
            [Delete(id=i, clock=Clock(version or 0, self.seq, pos)) for pos, i in enumerate(ids)]
        )


async def test_a_sharded_index_written_through_the_client_equals_the_unsharded_oracle(
    bootstrap_servers: str, s3_config: Any, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    async with (
        _workers(env, tmp_path),
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c,
    ):
        await c.create(NAME, dim=DIM, space="l2", shards=SHARDS, ef_search=128, timeout_s=90)
        await _owners_once_both_serve(c)
        described = await c.describe(NAME)
        assert (described["kind"], described["shards"]) == ("sharded", SHARDS)
        writes = _Writes(seed=5)
        total = 0
        while total < 20_000:
            kind = writes.rng.random()
            if kind < 0.75:
                await writes.add(c, 400, versioned=kind < 0.25)
                total += 440
            else:
                await writes.delete(c, 150, versioned=kind > 0.9)
                total += 150
        after = writes.position
        assert after is not None and set(after.offsets) == {
            shard_key(NAME, s, SHARDS) for s in range(SHARDS)
        }
        # id for id: every id ever written, read back from its member
        live = writes.oracle.logical_state()["live"]
        stats = await c.stats(NAME, after=after)
        assert stats["count"] == len(live)
        assert [s["shard"] for s in stats["shards"]] == list(range(SHARDS))
        got: dict[str, dict[str, Any]] = {}
        for start in range(0, len(writes.ids), 1000):
            for item in await c.get(NAME, writes.ids[start : start + 1000], after=after):
                got[item["id"]] = item
        assert set(got) == set(live)
        for id_, (vec, meta, clock) in live.items():
            item = got[id_]
            expected = np.frombuffer(vec, dtype=np.float32) if isinstance(vec, bytes) else vec
            assert np.allclose(item["vector"], expected, atol=1e-6), id_
            assert (item["metadata"] or None) == (meta or None), id_
            assert item["version"] == clock[0], id_
        # searches: the exact top-k up to the engine's recall
        ids = sorted(live)
        matrix = np.stack([np.frombuffer(live[i][0], dtype=np.float32) for i in ids]).astype(
            np.float32
        )
        queries = writes.rng.standard_normal((30, DIM)).astype(np.float32)
        rows = await c.search_many(NAME, queries, k=10, after=after)
        found = 0
        for q, hits in zip(queries, rows, strict=True):
            exact = np.argsort(np.sum((matrix - q) ** 2, axis=1))[:10]
            found += len({ids[j] for j in exact} & {h.id for h in hits})
            assert [h.distance for h in hits] == sorted(h.distance for h in hits)
        assert found / (10 * len(queries)) >= 0.9
        # read-your-writes on every member: new items found at once
        fresh = [f"fresh-{i}" for i in range(40)]
        fresh_vecs = writes.rng.standard_normal((40, DIM)).astype(np.float32)
        wrote = await c.add(NAME, fresh, fresh_vecs)
        assert {shard_of(i, SHARDS) for i in fresh} == set(range(SHARDS))
        assert [i["id"] for i in await c.get(NAME, fresh, after=wrote)] == fresh
        rows = await c.search_many(NAME, fresh_vecs, k=10, after=wrote)
        assert all(i in {h.id for h in hits} for i, hits in zip(fresh, rows, strict=True))


async def _plain_request(env: Env, body: dict[str, Any], cid: bytes) -> dict[str, Any]:
    """A foreign requester: aiokafka, Spring headers, keyed by the index's name."""
    reply_topic = f"lhv.replies.plain-{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
    consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    try:
        tp = TopicPartition(reply_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        headers = [(REPLY_TOPIC, reply_topic.encode()), (CORRELATION_ID, cid)]
        await producer.send_and_wait(
            env.topics.search, key=body["index"].encode(), value=orjson.dumps(body), headers=headers
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for rec in recs:
                    if dict(rec.headers)[CORRELATION_ID] == cid:
                        assert rec.key == cid
                        reply: dict[str, Any] = orjson.loads(rec.value)
                        return reply
        raise AssertionError("no reply to the plain request")
    finally:
        await producer.stop()
        await stop_consumer(consumer)


async def test_a_plain_requester_gets_the_merged_answer_and_a_member_down_is_named(
    bootstrap_servers: str, s3_config: Any, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    # a killed worker's partitions stay its own for 30 s: long enough to see it missing
    async with (
        _workers(env, tmp_path, LHV_SESSION_TIMEOUT_MS="30000") as procs,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60, reply_grace_s=0.2) as c,
    ):
        await c.create(NAME, dim=DIM, space="l2", shards=SHARDS, timeout_s=90)
        await _owners_once_both_serve(c)
        rng = np.random.default_rng(9)
        ids = [f"p-{i}" for i in range(400)]
        vecs = rng.standard_normal((400, DIM)).astype(np.float32)
        wrote = await c.add(NAME, ids, vecs, [{"i": i} for i in range(400)])
        q = rng.standard_normal(DIM).astype(np.float32)
        mine = await c.search(NAME, q, k=7, after=wrote)
        body = {
            "op": "search",
            "index": NAME,
            "vector": q.tolist(),
            "k": 7,
            "min_offsets": dict(wrote.offsets),
        }
        reply = await _plain_request(env, body, b"plain-1")
        assert reply["status"] == "ok" and reply["correlation_id"] == "plain-1"
        assert [h["id"] for h in reply["hits"]] == [h.id for h in mine]
        stats = await _plain_request(env, {"op": "stats", "index": NAME}, b"plain-2")
        assert stats["count"] == 400 and len(stats["shards"]) == SHARDS
        # a vector of another dimension: refused at the home, naming the index
        wrong = {**body, "vector": [*q.tolist(), 1.0]}
        refused = await _plain_request(env, wrong, b"plain-3")
        assert refused["error"]["code"] == "dim_mismatch", refused
        assert f"{NAME!r} has {DIM}" in refused["error"]["message"]
        assert "#" not in refused["error"]["message"]
        # one of the two workers killed: the members it served do not answer
        owner = await _owners_once_both_serve(c)
        home = home_partition(NAME.encode(), PARTITIONS)
        home_worker = next(owner[s] for s in range(SHARDS) if _member_partition(s) == home)
        down = "w1" if home_worker == "w0" else "w0"  # the home (which gathers) stays up
        gone = sorted(s for s, w in owner.items() if w == down)
        assert 0 < len(gone) < SHARDS
        procs[int(down[1])].kill9()
        with pytest.raises(ShardsMissing) as err:
            await c.search(NAME, q, k=7, timeout_s=1.5)
        assert err.value.missing_shards == gone
        hits = await c.search(NAME, q, k=400, timeout_s=1.5, allow_partial=True)
        assert hits.partial and list(hits.missing_shards) == gone
        assert {h.id for h in hits} == {i for i in ids if shard_of(i, SHARDS) not in gone}
        # the same for a plain requester, gathered by the home
        body = {"op": "search", "index": NAME, "vector": q.tolist(), "k": 400}
        deadline_ms = int(time.time() * 1000) + 1500
        strict = await _plain_request(env, {**body, "deadline_ms": deadline_ms}, b"strict")
        assert strict["status"] == "error" and strict["error"]["code"] == "deadline_exceeded"
        assert str(gone) in strict["error"]["message"]
        deadline_ms = int(time.time() * 1000) + 1500
        loose = await _plain_request(
            env, {**body, "deadline_ms": deadline_ms, "allow_partial": True}, b"loose"
        )
        assert loose["status"] == "ok" and loose["partial"] is True
        assert loose["missing_shards"] == gone
        assert {h["id"] for h in loose["hits"]} == {h.id for h in hits}


async def test_an_alias_switched_to_a_sharded_index_is_followed_by_clients_and_plain_requests(
    bootstrap_servers: str, s3_config: Any, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    async with (
        _workers(env, tmp_path),
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as admin,
    ):
        await admin.create("v1", dim=DIM, space="l2", timeout_s=90)
        await admin.create(NAME, dim=DIM, space="l2", shards=SHARDS, timeout_s=90)
        q = np.ones(DIM, dtype=np.float32)
        old = await admin.add("v1", ["old"], [q])
        new = await admin.add(NAME, ["new"], [q])
        await admin.alias("live", "v1")
        assert [h.id for h in await c.search("live", q, k=1, after=old)] == ["old"]
        # switched and the old target dropped by another client: this one's cached
        # resolution meets index_not_found, resolves again and retries once
        await admin.alias("live", NAME)
        await admin.drop("v1")
        assert [h.id for h in await c.search("live", q, k=1, after=new)] == ["new"]
        body = {
            "op": "search",
            "index": "live",
            "vector": q.tolist(),
            "k": 1,
            "min_offsets": dict(new.offsets),
        }
        reply = await _plain_request(env, body, b"by-alias")
        assert reply["status"] == "ok" and reply["index"] == "live"
        assert [h["id"] for h in reply["hits"]] == ["new"]


def _hostile_queries(vector: list[float]) -> list[dict[str, Any]]:
    """Queries a careless or hostile requester sends: every field of the wrong type or
    out of range, forged internal fields, ops that are not queries."""
    v = vector
    far = int(time.time() * 1000) + 400
    return [{"op": "search", "vector": v, "k": k} for k in (0, -1, "5", 10**9, 1.5, None)] + [
        {"op": "search", "vector": v[:2], "k": 3},
        {"op": "search", "vector": None, "k": 3},
        {"op": "search", "vectors": [], "k": 3},
        {"op": "search", "vectors": [v] * 2000, "k": 3},
        {"op": "search", "vector_b64": "!!!", "k": 3},
        {"op": "search", "vector": v, "k": 3, "filter": "x"},
        {"op": "search", "vector": v, "k": 3, "filter": {"g": {"$bogus": 1}}},
        {"op": "search", "vector": v, "k": 3, "min_offsets": {f"{NAME}#0": "x"}},
        {"op": "search", "vector": v, "k": 3, "min_offsets": [1]},
        {"op": "search", "vector": v, "k": 3, "min_offset": -5},
        {"op": "search", "vector": v, "k": 3, "min_offsets": {NAME: 10**12}, "deadline_ms": far},
        {"op": "search", "vector": v, "k": 3, "allow_partial": "yes"},
        {"op": "search", "vector": v, "k": 3, "via_alias": "forged"},
        {"op": "search", "vector": v, "k": 3, "via_alias": 5},
        {"op": "search", "vector": v, "k": 3, "deadline_ms": -1},
        {"op": "search", "vector": v, "k": 3, "deadline_ms": "soon"},
        {"op": "search", "vector": v, "k": 3, "include_metadata": "true"},
        {"op": "search", "vector": v, "k": 3, "vector_encoding": "hex"},
        {"op": "search", "vector": v, "k": 3, "ef": 10**9},
        {"op": "search", "vector": v, "k": 3, "request_id": "r" * 100_000},
        {"op": "get", "ids": []},
        {"op": "get", "ids": "p-1"},
        {"op": "get", "ids": [1, 2]},
        {"op": "get", "ids": [f"p-{i}" for i in range(5000)], "include_vectors": True},
        {"op": "stats", "min_offsets": {f"{NAME}#9": 0}},
        {"op": "describe", "via_alias": "forged"},
        {"op": "merge_in", "merge_id": "m"},
        {"op": "add", "items": []},
        {"op": "nope"},
    ]


async def test_hostile_queries_of_a_sharded_name_its_members_and_an_alias_are_each_answered(
    bootstrap_servers: str, s3_config: Any, tmp_path: Path
) -> None:
    """Every query keyed by a sharded name, by its members (real and made up) or by an
    alias, whatever its fields, gets one reply: an answer or an error naming what is
    wrong, never `internal` and never silence; the workers keep serving and log no
    error."""
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    async with (
        _workers(env, tmp_path) as procs,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c,
    ):
        await c.create(NAME, dim=DIM, space="l2", shards=SHARDS, timeout_s=90)
        await _owners_once_both_serve(c)
        rng = np.random.default_rng(5)
        ids = [f"p-{i}" for i in range(200)]
        vecs = rng.standard_normal((200, DIM)).astype(np.float32)
        await c.add(NAME, ids, vecs, [{"g": i % 3} for i in range(200)], ack=True)
        await c.alias("hostile-alias", NAME)
        names = [NAME, "hostile-alias", shard_key(NAME, 0, SHARDS), shard_key(NAME, 3, SHARDS)]
        names += [f"{NAME}#{SHARDS}", f"{NAME}#-1", f"{NAME}#", "#0", "hostile-alias#0"]
        codes: dict[str, int] = {}
        for name in names:
            for body in _hostile_queries(vecs[0].tolist()):
                try:
                    await c.query(name, body, timeout_s=10)
                    code = "ok"
                except LhvError as exc:
                    code = exc.code
                    assert code != "internal", (name, str(body)[:200], str(exc))
                codes[code] = codes.get(code, 0) + 1
        assert set(codes) <= {
            "ok",
            "invalid_request",
            "dim_mismatch",
            "deadline_exceeded",
            "index_not_found",
        }, codes
        # still serving, and the refusals were warnings at most
        for name in (NAME, "hostile-alias"):
            hits = await c.search(name, vecs[7], k=3)
            assert hits[0].id == "p-7"
        for p in procs:
            assert p.proc.poll() is None
            text = p.log_text()
            assert " ERROR " not in text and "Traceback" not in text, text[-3000:]
