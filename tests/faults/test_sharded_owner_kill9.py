"""kill -9 of a worker that owns members of a sharded index in the middle of an ingest.

S=4 members over 4 partitions, two `lhv worker` processes (static members), a client
writing adds (with updates, duplicates and client versions) and deletes, and searchers
running throughout (two Python clients, strict and allowing partial answers, and a plain
aiokafka requester keyed by the index's name, gathered by its home). One worker that
owns members but not the home is killed with -9 part way; the survivor restores its
members. Afterwards every acknowledged write is there, id for id, as the same writes
applied to one unsharded `lhv_index.Index`; every search during the handover answered in
full or named the shards that were missing (raised, or flagged partial): never a short
answer without the flag. The killed worker is restarted (same identity, so it reuses
its gather reply topic) and the state is checked again.
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
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from workerkit import Env, WorkerProcess, create_topics, make_env

from lhv_index import Clock, Delete, EngineKind, Index, IndexParams, Space, Upsert
from lhv_index.errors import LhvError
from worker.client import LhvClient, ShardsMissing, WriteResult
from worker.client.client import stop_consumer
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC
from worker.wire.shards import shard_key, shard_of

pytestmark = pytest.mark.asyncio(loop_scope="session")

SHARDS = PARTITIONS = 4
DIM = 8
FAR = np.full(DIM, 100.0, dtype=np.float32)


def _spread_name() -> str:
    for n in range(1000):
        name = f"k9owner{n}"
        where = {murmur2(shard_key(name, s, SHARDS).encode()) % PARTITIONS for s in range(SHARDS)}
        if len(where) == SHARDS:
            return name
    raise AssertionError("no name spreads over every partition")


NAME = _spread_name()
HOME = int(murmur2(NAME.encode()) % PARTITIONS)


def _anchors() -> dict[int, str]:
    """One id per shard, never written again: far from everything else, so a search near
    them must find all four, unless a member is missing."""
    out: dict[int, str] = {}
    n = 0
    while len(out) < SHARDS:
        id_ = f"anchor-{n}"
        out.setdefault(shard_of(id_, SHARDS), id_)
        n += 1
    return out


ANCHORS = _anchors()


def _partition(shard: int) -> int:
    return int(murmur2(shard_key(NAME, shard, SHARDS).encode()) % PARTITIONS)


def _worker(env: Env, tmp_path: Path, i: int, run: int = 0) -> WorkerProcess:
    return WorkerProcess(
        env.child_env(LHV_WORKER_ID=f"w{i}", LHV_GROUP_INSTANCE_ID=f"member-{i}"),
        tmp_path / f"w{i}-{run}.log",
    )


async def _owners(c: LhvClient, want: set[str], *, timeout_s: float = 90.0) -> dict[int, str]:
    """The worker serving each member, once the serving workers are exactly `want`."""
    deadline = time.monotonic() + timeout_s
    owner: dict[int, str] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(LhvError, TimeoutError):
            for s in range(SHARDS):
                member = await c.query(shard_key(NAME, s, SHARDS), {"op": "stats"}, timeout_s=5)
                owner[s] = str(member["worker"])
            if set(owner.values()) == want and len(owner) == SHARDS:
                return owner
        await asyncio.sleep(0.5)
    raise AssertionError(f"the members are not served by {want}: {owner}")


class Ingest:
    """The writer: every write retried until acknowledged, the acknowledged ones applied
    in the same order to one unsharded index."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(21)
        self.oracle = Index("oracle", IndexParams(dim=DIM, space=Space.L2, engine=EngineKind.EXACT))
        self.ids = [f"doc-{i}" for i in range(5000)]
        self.seq = 0
        self.written = 0
        self.retries = 0
        self.offsets: dict[str, int] = {}

    def _seen(self, wrote: WriteResult) -> None:
        for key, off in wrote.offsets.items():
            self.offsets[key] = max(self.offsets.get(key, -1), off)

    async def _until_acked(self, call: Any) -> WriteResult:
        for _ in range(10):
            try:
                wrote: WriteResult = await call()
                self._seen(wrote)
                return wrote
            except (TimeoutError, LhvError):
                self.retries += 1  # not acknowledged: written again, later, whole
        raise AssertionError("a write was never acknowledged")

    async def add(self, c: LhvClient, n: int) -> None:
        ids = list(self.rng.choice(self.ids, size=n))
        ids += ids[: n // 20]
        vecs = self.rng.standard_normal((len(ids), DIM)).astype(np.float32)
        metas: list[dict[str, Any] | None] = [
            None if self.rng.random() < 0.3 else {"g": int(self.rng.integers(3))} for _ in ids
        ]
        version = int(self.rng.integers(1, 30)) if self.rng.random() < 0.25 else None
        await self._until_acked(
            lambda: c.add(
                NAME, ids, vecs, metas, version=version, batch_size=300, ack=True, timeout_s=60
            )
        )
        self.seq += 1
        self.written += len(ids)
        self.oracle.apply(
            [
                Upsert(id=i, vector=v, metadata=m, clock=Clock(version or 0, self.seq, pos))
                for pos, (i, v, m) in enumerate(zip(ids, vecs, metas, strict=True))
            ]
        )

    async def delete(self, c: LhvClient, n: int) -> None:
        ids = list(self.rng.choice(self.ids, size=n))
        await self._until_acked(lambda: c.delete(NAME, ids, ack=True, timeout_s=60))
        self.seq += 1
        self.written += len(ids)
        self.oracle.apply(
            [Delete(id=i, clock=Clock(0, self.seq, pos)) for pos, i in enumerate(ids)]
        )

    async def check(self, c: LhvClient) -> None:
        """Id for id, every member read after the last acknowledged write."""
        after = WriteResult(0, 0, 0, None, dict(self.offsets))
        live = self.oracle.logical_state()["live"]
        got: dict[str, dict[str, Any]] = {}
        for start in range(0, len(self.ids), 1000):
            for item in await c.get(NAME, self.ids[start : start + 1000], after=after):
                got[item["id"]] = item
        assert sorted(got) == sorted(live)
        for id_, (vec, meta, clock) in live.items():
            item = got[id_]
            assert np.allclose(item["vector"], np.frombuffer(vec, dtype=np.float32)), id_
            assert (item["metadata"] or None) == (meta or None), id_
            assert item["version"] == clock[0], id_
        stats = await c.stats(NAME, after=after)
        assert stats["count"] == len(live) + len(ANCHORS)


class Searches:
    """Outcomes of the searches near the anchors: full, partial (flagged) or refused
    naming the missing shards; anything else is a violation."""

    def __init__(self) -> None:
        self.full = 0
        self.partial = 0
        self.named = 0
        self.violations: list[str] = []

    def answer(self, ids: list[str], missing: list[int], how: str) -> None:
        # the present members' anchors are the nearest; other items fill the k
        expected = sorted(ANCHORS[s] for s in range(SHARDS) if s not in missing)
        found = sorted(i for i in ids if i.startswith("anchor-"))
        if found != expected or len(ids) != SHARDS:
            self.violations.append(f"{how}: {sorted(ids)} with missing {missing}")
        elif missing:
            self.partial += 1
        else:
            self.full += 1

    def refused(self, missing: list[int], how: str) -> None:
        if not missing or not set(missing) <= set(range(SHARDS)):
            self.violations.append(f"{how}: refused naming {missing}")
        else:
            self.named += 1


async def _client_searcher(
    c: LhvClient, out: Searches, stop: asyncio.Event, *, allow_partial: bool
) -> None:
    how = "client, partial allowed" if allow_partial else "client"
    while not stop.is_set():
        try:
            hits = await c.search(NAME, FAR, k=SHARDS, timeout_s=2.0, allow_partial=allow_partial)
            out.answer([h.id for h in hits], list(hits.missing_shards), how)
        except ShardsMissing as exc:
            out.refused(list(exc.missing_shards), how)
        except Exception as exc:
            out.violations.append(f"{how}: {exc!r}")
            await asyncio.sleep(0.2)


async def _plain_searcher(env: Env, out: Searches, stop: asyncio.Event) -> None:
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
        n = 0
        while not stop.is_set():
            n += 1
            cid = f"plain-{n}".encode()
            body = {
                "op": "search",
                "index": NAME,
                "vector": FAR.tolist(),
                "k": SHARDS,
                "deadline_ms": int(time.time() * 1000) + 2000,
                "allow_partial": n % 2 == 0,
            }
            headers = [(REPLY_TOPIC, reply_topic.encode()), (CORRELATION_ID, cid)]
            await producer.send_and_wait(
                env.topics.search, key=NAME.encode(), value=orjson.dumps(body), headers=headers
            )
            reply = await _reply(consumer, cid, timeout_s=60)
            if reply is None:
                out.violations.append(f"plain {cid!r}: no reply")
            elif reply["status"] == "ok":
                missing = list(reply.get("missing_shards", []))
                if missing and reply.get("partial") is not True:
                    out.violations.append(f"plain {cid!r}: missing {missing}, not flagged")
                out.answer([h["id"] for h in reply["hits"]], missing, f"plain {cid!r}")
            elif reply["error"]["code"] == "deadline_exceeded" and body["allow_partial"] is False:
                message = reply["error"]["message"]
                named = (
                    message.split("shards ", 1)[1].split("]", 1)[0] + "]" if "[" in message else ""
                )
                out.refused(orjson.loads(named) if named else [], f"plain {cid!r}")
            elif reply["error"]["code"] == "not_ready":
                out.named += 1  # refused at once, retriable: no answer to mistake for one
            else:
                out.violations.append(f"plain {cid!r}: {reply['error']}")
    finally:
        await producer.stop()
        await stop_consumer(consumer)


async def _reply(consumer: AIOKafkaConsumer, cid: bytes, *, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for recs in (await consumer.getmany(timeout_ms=500)).values():
            for rec in recs:
                if dict(rec.headers).get(CORRELATION_ID) == cid:
                    return orjson.loads(rec.value)
    return None


async def _gather_topics(env: Env) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    await admin.start()
    try:
        topics = await admin.list_topics()
    finally:
        await admin.close()
    return sorted(t for t in topics if t.startswith(f"lhv.replies.gather-{env.group}-"))


async def test_kill9_of_a_member_owner_mid_ingest_loses_no_acked_write_and_no_silent_short_search(
    bootstrap_servers: str, s3_config: Any, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    procs = [_worker(env, tmp_path, i) for i in range(2)]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with (
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as writer,
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60, reply_grace_s=0.5) as s1,
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60, reply_grace_s=0.5) as s2,
        ):
            await writer.create(NAME, dim=DIM, space="l2", engine="exact", shards=SHARDS,
                                timeout_s=90)  # fmt: skip
            owner = await _owners(writer, {"w0", "w1"})
            anchors = [ANCHORS[s] for s in range(SHARDS)]
            vecs = np.stack([FAR + 0.01 * s for s in range(SHARDS)]).astype(np.float32)
            wrote = await writer.add(NAME, anchors, vecs, ack=True)
            hits = await writer.search(NAME, FAR, k=SHARDS, after=wrote)
            assert sorted(h.id for h in hits) == sorted(anchors)

            searches = Searches()
            tasks = [
                asyncio.create_task(_client_searcher(s1, searches, stop, allow_partial=False)),
                asyncio.create_task(_client_searcher(s2, searches, stop, allow_partial=True)),
                asyncio.create_task(_plain_searcher(env, searches, stop)),
            ]
            home_worker = next(owner[s] for s in range(SHARDS) if _partition(s) == HOME)
            down = 1 if home_worker == "w0" else 0  # owns members, not the home
            gone = sorted(s for s, w in owner.items() if w == f"w{down}")
            assert gone, owner

            ingest = Ingest()
            killed = False
            while ingest.written < 16_000:
                if not killed and ingest.written >= 5_000:
                    procs[down].kill9()
                    killed = True
                if ingest.rng.random() < 0.8:
                    await ingest.add(writer, 800)
                else:
                    await ingest.delete(writer, 200)
            assert killed
            survivor = f"w{1 - down}"
            await _owners(writer, {survivor})
            await ingest.check(writer)
            stop.set()
            await asyncio.gather(*tasks)
            assert not searches.violations, searches.violations[:10]
            assert searches.full > 0, vars(searches)
            assert searches.partial + searches.named > 0, "no search saw the handover"

            # the killed worker back, with the same identity: its members return to it
            procs[down] = _worker(env, tmp_path, down, run=1)
            await _owners(writer, {"w0", "w1"})
            await ingest.check(writer)
            hits = await writer.search(NAME, FAR, k=SHARDS)
            assert sorted(h.id for h in hits) == sorted(anchors)
            # one gather reply topic per identity, reused by the restarted worker
            assert len(await _gather_topics(env)) == 2, await _gather_topics(env)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in procs:
            if p.proc.poll() is None:
                assert p.terminate(30) == 0, p.log_text()[-3000:]
