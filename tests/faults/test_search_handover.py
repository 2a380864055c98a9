"""kill -9 of the worker that owns the search partitions, before it ever committed a search
offset: every query sent while the partitions had no owner, and while a second worker
took them over, is answered by that worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from searchkit import Requester, committed_offsets
from workerkit import WorkerProcess, create_topics, index_names, make_env

from worker.client import LhvClient
from worker.storage.blobstore import S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_queries_sent_while_a_killed_owner_hands_over_are_all_answered(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    reply_topic = f"lhv.replies.test-{uuid.uuid4().hex[:10]}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    names = index_names(2, env.partitions)  # one index on each partition
    first = WorkerProcess(env.child_env(), tmp_path / "first.log")
    second: WorkerProcess | None = None
    try:
        written = {}
        async with LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c:
            for name in names:
                await c.create(name, dim=2, space="l2", engine="exact")
                # acked: the first worker applied it (acks come over the commands topic,
                # so it reads no query and commits no search offset)
                w = await c.add(name, [f"x-{name}"], [[1.0, 0.0]], ack=True)
                written[name] = w.offset
        first.kill9()
        assert not any(tp.topic == env.topics.search for tp in await committed_offsets(env)), (
            "the killed owner had committed a search offset: not the case under test"
        )
        far = int(time.time() * 1000) + 180_000
        cids: list[bytes] = []
        async with Requester(env, reply_topic) as req:

            async def ask(tag: str) -> None:
                for name in names:
                    cid = f"{tag}-{name}".encode()
                    cids.append(cid)
                    await req.send(
                        name, cid, vector=[1, 0], min_offset=written[name], deadline_ms=far
                    )

            for i in range(3):  # no owner: the dead one's session has not expired
                await ask(f"orphan-{i}")
            second = WorkerProcess(env.child_env(), tmp_path / "second.log")
            for i in range(10):  # while the second worker joins and restores
                await ask(f"handover-{i}")
                await asyncio.sleep(0.5)
            await req.wait_for(cids, timeout_s=120)
            for cid in cids:
                reply = req.reply(cid)
                assert reply["status"] == "ok", (cid, reply)
                assert reply["hits"][0]["id"].startswith("x-")
        search_tps = [TopicPartition(env.topics.search, p) for p in range(env.partitions)]
        deadline = time.monotonic() + 30
        while True:
            committed = await committed_offsets(env)
            if all(tp in committed for tp in search_tps):
                break
            assert time.monotonic() < deadline, f"search offsets not committed: {committed}"
            await asyncio.sleep(0.2)
    finally:
        if second is not None:
            code = second.terminate()
            assert code == 0, second.log_text()[-3000:]
