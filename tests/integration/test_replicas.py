"""Read replicas on the real stack: the same answers as the owner, read-your-writes
through a replica, every query answered while the owner is killed (a hedging client),
and a replica whose snapshots are collected while it restores."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from workerkit import Env, WorkerProcess, make_env, running

from worker.client import LhvClient
from worker.service import Worker
from worker.service.config import CheckpointPolicy
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import DeltaPolicy, Manifest
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

DIM = 8


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=2)


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _at_replicas(env: Env) -> Any:
    """The topics of a requester pointed at the replicas (as a Spring requester would)."""
    return replace(env.topics, search=env.topics.replica_search)


async def _eventually(check: Any, what: str, *, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.1)


async def test_a_replica_answers_the_owners_hits_at_the_same_offset_and_reads_your_writes(
    env: Env,
) -> None:
    name = "docs"
    data = _vectors(300, seed=1)
    async with (
        running(env.config()) as owner,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as to_owner,
        LhvClient(env.bootstrap, topics=_at_replicas(env), timeout_s=60) as to_replica,
    ):
        await to_owner.create(name, dim=DIM, space="l2", M=16, ef_construction=100)
        wrote = await to_owner.add(name, [f"v{i}" for i in range(len(data))], data, ack=True)
        p = home_partition(name.encode(), env.partitions)
        assert await owner.ownership.checkpoint(owner.partitions[p], reason="test")
        async with running(env.config(role="replica")) as replica:
            queries = _vectors(20, seed=2)
            for q in queries:
                mine = await to_owner.search(name, q, k=10, ef=64, after=wrote)
                theirs = await to_replica.search(name, q, k=10, ef=64, after=wrote)
                assert [h.id for h in theirs] == [h.id for h in mine]
                assert [h.distance for h in theirs] == pytest.approx([h.distance for h in mine])
            stats = await to_replica.stats(name, after=wrote)
            assert stats["role"] == "replica" and stats["applied_offset"] >= wrote.offset
            assert stats["worker"] == replica.config.worker_id
            for i in range(10):  # read-your-writes through the replica, no sleeps
                fresh = _vectors(1, seed=100 + i)
                w = await to_owner.add(name, [f"new{i}"], fresh)
                hits = await to_replica.search(name, fresh[0], k=1, after=w)
                assert [h.id for h in hits] == [f"new{i}"]


async def test_every_query_is_answered_once_while_the_owner_is_killed(
    env: Env, tmp_path: Path
) -> None:
    name = "docs"
    owner = WorkerProcess(env.child_env(), tmp_path / "owner.log")
    replica = WorkerProcess(env.child_env(LHV_ROLE="replica"), tmp_path / "replica.log")
    try:
        async with LhvClient(
            env.bootstrap, topics=env.topics, timeout_s=60, replicas=True, hedge_after_ms=200
        ) as client:
            await client.create(name, dim=DIM, space="l2", timeout_s=120)
            wrote = await client.add(name, [f"v{i}" for i in range(200)], _vectors(200, 3))

            async def both_copies_answer() -> bool:
                hedged = client.hedged
                with contextlib.suppress(Exception):
                    for _ in range(2):  # one query to each copy, in turn
                        await client.stats(name, after=wrote, timeout_s=5)
                    return client.hedged == hedged  # neither needed the other
                return False

            await _eventually(both_copies_answer, "the owner and the replica answer")
            answered: list[int] = []
            failed: list[BaseException] = []
            stop = asyncio.Event()
            queries = _vectors(64, seed=4)

            async def requester(r: int) -> None:
                i = 0
                while not stop.is_set():
                    try:
                        hits = await client.search(name, queries[(r + i) % 64], k=5)
                        assert len(hits) == 5
                        answered.append(r)
                    except Exception as exc:
                        failed.append(exc)
                    i += 1

            tasks = [asyncio.create_task(requester(r)) for r in range(32)]
            try:

                async def answers(n: int) -> bool:
                    return len(answered) + len(failed) >= n or bool(failed)

                await _eventually(lambda: answers(300), "load before the kill")
                owner.kill9()
                before = len(answered)
                await _eventually(lambda: answers(before + 600), "load after the kill")
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert failed == [], f"{len(failed)} queries got no answer: {failed[:3]}"
            assert client.hedged > 0, "queries to the killed owner went to the replica"
            assert client.pending == 0
    finally:
        owner.kill9()
        code = replica.terminate()
        assert code == 0, replica.log_text()[-3000:]


@contextlib.asynccontextmanager
async def _started(worker: Worker) -> AsyncIterator[Worker]:
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await worker.stop()


async def test_a_replica_whose_snapshots_are_collected_while_it_restores_reads_the_next_manifest(
    env: Env,
) -> None:
    name = "docs"
    manual = CheckpointPolicy(every_records=10**6, every_s=3600.0, deltas=DeltaPolicy(max_deltas=0))
    blobs = S3BlobStore(env.s3)
    await blobs.start()
    async with (
        running(env.config(checkpoint=manual)) as owner,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as client,
    ):
        await client.create(name, dim=DIM, space="l2")
        wrote = await client.add(name, [f"v{i}" for i in range(100)], _vectors(100, 5), ack=True)
        p = home_partition(name.encode(), env.partitions)
        part = owner.partitions[p]
        assert await owner.ownership.checkpoint(part, reason="test")
        first = set(part.manifest.indexes[name].keys) if part.manifest else set()
        assert first

        paused = asyncio.Event()
        go = asyncio.Event()
        seen: list[Manifest | None] = []

        async def hold_first_restore(q: int, manifest: Manifest | None) -> None:
            if q != p:
                return
            seen.append(manifest)
            if len(seen) == 1:
                paused.set()
                await go.wait()

        replica = Worker(env.config(role="replica"))
        replica.follower.before_load = hold_first_restore  # type: ignore[union-attr]
        async with _started(replica):
            await asyncio.wait_for(paused.wait(), 120)
            for round_ in range(2):  # the owner checkpoints twice: new bases, old collected
                wrote = await client.add(
                    name, [f"w{round_}-{i}" for i in range(50)], _vectors(50, 6 + round_), ack=True
                )
                assert await owner.ownership.checkpoint(part, reason="test")

            async def collected() -> bool:
                return not first & set(await blobs.list(""))

            await _eventually(collected, "the first manifest's snapshots collected")
            go.set()
            follower = replica.follower
            assert follower is not None

            async def serving() -> bool:
                rp = replica.partitions.get(p)
                return rp is not None and rp.serves(wrote.offset)

            await _eventually(serving, "the replica restored from the next manifest")
            assert follower.snapshots_gone >= 1
            assert len(seen) >= 2 and seen[-1] is not None
            assert seen[-1].offset > (seen[0].offset if seen[0] else -1)
            mine = replica.partitions[p].indexes[name].logical_state()
            assert mine == owner.partitions[p].indexes[name].logical_state()
    await blobs.stop()
