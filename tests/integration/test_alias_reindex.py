"""Reindexing behind an alias under continuous search load, on the real stack.

`docs` -> `docs_v1` (one index); searchers run all along: a Python client holding its
resolution of `docs` for long (so it meets the dropped `docs_v1` and must resolve again),
one resolving often, and a plain aiokafka requester with Spring headers keyed `docs`
(relayed by the alias's home). `docs_v2` (sharded) is built with the same data, the
alias moved with one `alias` command, then `docs_v1` dropped once that was acknowledged.
Every search of all of it answers, in full, from v1 or v2: never an error, never empty.
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

from worker.client import LhvClient
from worker.client.client import stop_consumer
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARTITIONS = 4
DIM = 8
K = 10
N = 2000


def _names() -> tuple[str, str, str]:
    """An alias and two versions whose homes are three different partitions."""
    alias = "docs"
    used = {home_partition(alias.encode(), PARTITIONS)}
    out = []
    for version in ("v1", "v2"):
        for n in range(1000):
            name = f"docs_{version}_{n}"
            home = home_partition(name.encode(), PARTITIONS)
            if home not in used:
                used.add(home)
                out.append(name)
                break
    return alias, out[0], out[1]


ALIAS, V1, V2 = _names()


class Outcomes:
    def __init__(self) -> None:
        self.answers = 0
        self.after_drop = 0
        self.dropped = False
        self.violations: list[str] = []

    def check(self, how: str, ids: list[str], wanted: str) -> None:
        if len(ids) != K or ids[0] != wanted:
            self.violations.append(f"{how}: {wanted} answered {ids}")
        self.answers += 1
        self.after_drop += self.dropped


async def _client_searcher(
    c: LhvClient, how: str, data: np.ndarray, out: Outcomes, stop: asyncio.Event
) -> None:
    rng = np.random.default_rng(len(how))
    while not stop.is_set():
        i = int(rng.integers(N))
        try:
            hits = await c.search(ALIAS, data[i], k=K, timeout_s=20)
            out.check(how, [h.id for h in hits], f"d{i}")
        except Exception as exc:
            out.violations.append(f"{how}: {exc!r}")
            await asyncio.sleep(0.2)


async def _plain_searcher(env: Env, data: np.ndarray, out: Outcomes, stop: asyncio.Event) -> None:
    reply_topic = f"lhv.replies.plain-{env.group}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
    consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    rng = np.random.default_rng(3)
    try:
        tp = TopicPartition(reply_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        n = 0
        while not stop.is_set():
            n += 1
            i = int(rng.integers(N))
            cid = f"plain-{n}".encode()
            body = {"op": "search", "index": ALIAS, "vector": data[i].tolist(), "k": K}
            headers = [(REPLY_TOPIC, reply_topic.encode()), (CORRELATION_ID, cid)]
            await producer.send_and_wait(
                env.topics.search, key=ALIAS.encode(), value=orjson.dumps(body), headers=headers
            )
            reply = await _reply(consumer, cid, timeout_s=60)
            if reply is None:
                out.violations.append(f"plain {cid!r}: no reply")
            elif reply["status"] != "ok":
                out.violations.append(f"plain {cid!r}: {reply['error']}")
            else:
                out.check(f"plain {cid!r}", [h["id"] for h in reply["hits"]], f"d{i}")
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


async def _until(what: str, done: Any, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_a_reindex_behind_an_alias_never_fails_or_empties_a_search(
    bootstrap_servers: str, s3_config: Any, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    procs = [
        WorkerProcess(env.child_env(LHV_WORKER_ID=f"w{i}"), tmp_path / f"w{i}.log")
        for i in range(2)
    ]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with (
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as admin,
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60, name_ttl_s=3600) as held,
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60, name_ttl_s=0.2) as fresh,
        ):
            data = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
            ids = [f"d{i}" for i in range(N)]
            await admin.create(V1, dim=DIM, space="l2", engine="exact", timeout_s=90)
            wrote = await admin.add(V1, ids, data, ack=True, batch_size=500)
            assert len(await admin.search(V1, data[0], k=K, after=wrote)) == K
            await admin.alias(ALIAS, V1)
            assert (await admin.describe(ALIAS))["target"] == V1

            out = Outcomes()
            tasks = [
                asyncio.create_task(_client_searcher(held, "held", data, out, stop)),
                asyncio.create_task(_client_searcher(fresh, "fresh", data, out, stop)),
                asyncio.create_task(_plain_searcher(env, data, out, stop)),
            ]
            await _until("no search answered", lambda: out.answers >= 30)

            await admin.create(V2, dim=DIM, space="l2", engine="exact", shards=3, timeout_s=90)
            wrote = await admin.add(V2, ids, data, ack=True, batch_size=500)
            assert len(await admin.search(V2, data[0], k=K, after=wrote)) == K
            await admin.alias(ALIAS, V2)  # one command: the switch
            await admin.drop(V1)  # only once the switch was acknowledged
            out.dropped = True
            assert (await admin.describe(ALIAS))["target"] == V2
            await _until("no search answered after the drop", lambda: out.after_drop >= 60)
            stop.set()
            await asyncio.gather(*tasks)
            assert not out.violations, out.violations[:10]
            # the client that held `docs` -> v1 met the dropped v1 and resolved again
            assert held._names[ALIAS].index == V2
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in procs:
            if p.proc.poll() is None:
                with contextlib.suppress(Exception):
                    p.terminate(30)
