"""No query is lost and none pins the worker, on the real stack: where the search topic
starts when a worker joins, search offsets committed on their own cadence, the maximum
query age, and the bound on waiting queries.

Each test has its own topics and group, and runs its own worker in this process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import TopicPartition
from searchkit import Requester, committed_offsets, create_and_fill
from workerkit import Env, create_topics, index_names, make_env, running

from worker.service import Worker
from worker.service.config import CheckpointPolicy, QueryPolicy
from worker.service.partition import PartitionStatus
from worker.storage.blobstore import S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def fresh_env(bootstrap: str, s3: S3Config, partitions: int = 2) -> tuple[Env, str]:
    env = await make_env(bootstrap, s3, partitions=partitions)
    reply_topic = f"lhv.replies.test-{uuid.uuid4().hex[:10]}"
    await create_topics(bootstrap, [reply_topic], 1)
    return env, reply_topic


async def serving(worker: Worker, partitions: int, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (
        len(worker.partitions) == partitions
        and all(p.status is PartitionStatus.SERVING for p in worker.partitions.values())
    ):
        assert time.monotonic() < deadline, "the worker did not come to serve"
        await asyncio.sleep(0.1)


@pytest.fixture
async def setup(bootstrap_servers: str, s3_config: S3Config) -> AsyncIterator[tuple[Env, str]]:
    yield await fresh_env(bootstrap_servers, s3_config)


async def test_queries_sent_before_any_worker_joined_are_answered_once_it_joins(
    setup: tuple[Env, str],
) -> None:
    env, reply_topic = setup
    names = index_names(2, env.partitions)
    written = await create_and_fill(env, names)
    far = int(time.time() * 1000) + 120_000
    async with Requester(env, reply_topic) as req:
        cids = []
        for name in names:
            for i in range(5):
                cid = f"{name}-{i}".encode()
                cids.append(cid)
                await req.send(name, cid, vector=[1, 0], min_offset=written[name], deadline_ms=far)
        async with running(env.config()):
            await req.wait_for(cids)
        for cid in cids:
            reply = req.reply(cid)
            assert reply["status"] == "ok", reply
            assert reply["hits"][0]["id"].startswith("x-")
            assert len(req.replies[cid]) == 1


async def test_a_query_older_than_the_maximum_age_gets_deadline_exceeded(
    setup: tuple[Env, str],
) -> None:
    env, reply_topic = setup
    name = index_names(1, env.partitions)[0]
    written = await create_and_fill(env, [name])
    config = env.config(queries=QueryPolicy(max_age_ms=30_000))
    async with running(config) as worker, Requester(env, reply_topic) as req:
        await serving(worker, env.partitions)
        old = int(time.time() * 1000) - 45_000
        await req.send(name, b"old", vector=[1, 0], timestamp_ms=old)
        await req.send(name, b"new", vector=[1, 0], min_offset=written[name])
        await req.wait_for([b"old", b"new"])
    assert req.reply(b"old")["error"]["code"] == "deadline_exceeded"
    assert "maximum query age" in req.reply(b"old")["error"]["message"]
    assert req.reply(b"new")["status"] == "ok"


async def test_search_offsets_are_committed_on_their_own_without_any_checkpoint(
    setup: tuple[Env, str],
) -> None:
    env, reply_topic = setup
    name = index_names(1, env.partitions)[0]
    written = await create_and_fill(env, [name])
    config = env.config(
        checkpoint=CheckpointPolicy(every_records=10**6, every_s=3_600),
        queries=QueryPolicy(commit_interval_ms=200),
    )
    async with running(config) as worker, Requester(env, reply_topic) as req:
        await serving(worker, env.partitions)
        p = worker.partitions
        for i in range(3):
            await req.send(name, b"q%d" % i, vector=[1, 0], min_offset=written[name])
        await req.wait_for([b"q0", b"q1", b"q2"])
        home = next(n for n, part in p.items() if name in part.indexes)
        search_tp = TopicPartition(env.topics.search, home)
        consumer_end = await worker.consumer.end_offsets([search_tp])
        deadline = time.monotonic() + 30
        while (await committed_offsets(env)).get(search_tp) != consumer_end[search_tp]:
            assert time.monotonic() < deadline, await committed_offsets(env)
            await asyncio.sleep(0.2)
        committed = await committed_offsets(env)
        assert all(tp.topic != env.topics.commands for tp in committed), (
            "a checkpoint committed the commands offset: the test needs none to happen"
        )
        assert all(part.checkpoint_offset < written[name] for part in p.values())


async def test_a_worker_taking_over_resumes_from_the_committed_offset_and_answers_nothing_twice(
    setup: tuple[Env, str],
) -> None:
    env, reply_topic = setup
    name = index_names(1, env.partitions)[0]
    written = await create_and_fill(env, [name])
    config = env.config(queries=QueryPolicy(commit_interval_ms=200))
    async with Requester(env, reply_topic) as req:
        first = [b"first-%d" % i for i in range(20)]
        async with running(config) as worker:
            await serving(worker, env.partitions)
            for cid in first:
                await req.send(name, cid, vector=[1, 0], min_offset=written[name])
            await req.wait_for(first)
        async with running(config) as worker:
            await serving(worker, env.partitions)
            await req.send(name, b"second", vector=[1, 0], min_offset=written[name])
            await req.wait_for([b"second"])
            await req.read(timeout_ms=1_000)  # anything answered twice would be here by now
        assert all(len(req.replies[cid]) == 1 for cid in [*first, b"second"]), {
            c: len(r) for c, r in req.replies.items() if len(r) > 1
        }


async def test_waiting_queries_over_the_bound_get_not_ready_at_once_and_the_worker_serves_on(
    setup: tuple[Env, str],
) -> None:
    env, reply_topic = setup
    name = index_names(1, env.partitions)[0]
    written = await create_and_fill(env, [name])
    config = env.config(queries=QueryPolicy(max_parked=4, max_wait_ms=8_000))
    far = int(time.time() * 1000) + 600_000  # the cap, not the deadline, ends the wait
    async with running(config) as worker, Requester(env, reply_topic) as req:
        await serving(worker, env.partitions)
        parked = [b"parked-%d" % i for i in range(4)]
        for cid in parked:
            await req.send(name, cid, vector=[1, 0], min_offset=10**12, deadline_ms=far)
        deadline = time.monotonic() + 30
        while sum(p.parked for p in worker.search._flights.values()) < 4:
            assert time.monotonic() < deadline, "the queries did not park"
            await asyncio.sleep(0.05)
        over = [b"over-%d" % i for i in range(10)]
        for cid in over:
            await req.send(name, cid, vector=[1, 0], min_offset=10**12, deadline_ms=far)
        await req.send(name, b"ready", vector=[1, 0], min_offset=written[name])
        await req.wait_for([*over, b"ready"])
        assert not any(cid in req.replies for cid in parked), "refused before the parked ones"
        for cid in over:
            error = req.reply(cid)["error"]
            assert error["code"] == "not_ready" and "too many waiting" in error["message"]
        assert req.reply(b"ready")["status"] == "ok"
        await req.wait_for(parked)
        for cid in parked:
            error = req.reply(cid)["error"]
            assert error["code"] == "deadline_exceeded" and "8000 ms" in error["message"]
