"""kill -9 of an owner while another worker keeps a warm standby of its partition
(`LHV_STANDBY_REPLICAS=1`): the survivor takes the partition over from its copy (no
snapshot download), loses no acknowledged write, and answers the queries sent during the
takeover."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from searchkit import Requester
from workerkit import WorkerProcess, create_topics, index_names, make_env

from worker.client import LhvClient
from worker.storage.blobstore import S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _wait_log(proc: WorkerProcess, pattern: str, *, timeout_s: float = 90.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = re.search(pattern, proc.log_text())
        if found is not None:
            return found
        assert proc.proc.poll() is None, proc.log_text()[-3000:]
        assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{proc.log_text()[-3000:]}"
        await asyncio.sleep(0.2)


def _owned(proc: WorkerProcess) -> list[int]:
    """The partitions of the worker's last assignment."""
    found = re.findall(r"partitions assigned: \[([\d, ]*)\]", proc.log_text())
    return [int(p) for p in found[-1].split(",") if p.strip()] if found else []


async def test_an_owner_killed_is_replaced_by_its_warm_standby_without_download(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    reply_topic = f"lhv.replies.test-{uuid.uuid4().hex[:10]}"
    await create_topics(env.bootstrap, [reply_topic], 1)
    names = index_names(2, env.partitions)  # one index on each partition
    child = env.child_env(LHV_STANDBY_REPLICAS="1")
    first = WorkerProcess(child, tmp_path / "first.log")
    second: WorkerProcess | None = None
    rng = np.random.default_rng(5)
    acked: dict[str, list[str]] = {name: [] for name in names}
    last: dict[str, int] = {}
    try:
        async with LhvClient(env.bootstrap, topics=env.topics, timeout_s=90) as c:

            async def write(tag: str, n: int) -> None:
                for name in names:
                    ids = [f"{tag}-{i}" for i in range(n)]
                    w = await c.add(name, ids, rng.random((n, 8), dtype=np.float32), ack=True)
                    acked[name] += ids
                    last[name] = w.offset

            for name in names:
                await c.create(name, dim=8, space="l2", engine="hnsw")
            await write("a", 300)
            second = WorkerProcess(child, tmp_path / "second.log")
            # the group: one partition each, each worker a standby of the other's
            await _wait_log(second, r"standby copy loaded|standby copy of partition \d+ started")
            await write("b", 300)  # applied by both owners, followed by both standbys
            await _wait_log(second, r"standby copy loaded")
            victim_partitions = _owned(first)
            assert len(victim_partitions) == 1, first.log_text()[-3000:]
            await write("c", 100)
            first.kill9()
            await write("d", 100)  # while the group has not noticed yet: acked after it
            far = int(time.time() * 1000) + 180_000
            cids: list[bytes] = []
            async with Requester(env, reply_topic) as req:
                for i in range(8):
                    for name in names:
                        cid = f"q{i}-{name}".encode()
                        cids.append(cid)
                        await req.send(
                            name, cid, vector=[0.5] * 8, min_offset=last[name], deadline_ms=far
                        )
                    await asyncio.sleep(0.5)
                await req.wait_for(cids, timeout_s=120)
                for cid in cids:
                    assert req.reply(cid)["status"] == "ok", (cid, req.reply(cid))
            for name in names:
                stats = await c.stats(name)
                assert stats["count"] == len(acked[name]), (name, stats)
                got = await c.get(name, acked[name], include_vectors=False)
                assert len(got) == len(acked[name])
        log = second.log_text()
        (p,) = victim_partitions
        promoted = re.search(
            rf"partition {p} promoted from standby at offset (\d+) \(manifest (-?\d+)\): "
            r"no snapshot download",
            log,
        )
        assert promoted is not None, log[-4000:]
        assert f"standby copy of partition {p} at offset" not in log  # it was used
    finally:
        first.kill9()
        if second is not None:
            code = second.terminate()
            assert code == 0, second.log_text()[-3000:]


async def test_a_group_with_a_worker_without_standbys_serves_and_that_worker_keeps_no_copies(
    bootstrap_servers: str, s3_config: S3Config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=2)
    names = index_names(2, env.partitions)
    with_standbys = WorkerProcess(env.child_env(LHV_STANDBY_REPLICAS="1"), tmp_path / "new.log")
    without = WorkerProcess(env.child_env(LHV_STANDBY_REPLICAS="0"), tmp_path / "old.log")
    try:
        await _wait_log(with_standbys, r"partitions assigned")
        await _wait_log(without, r"partitions assigned: \[\d")
        async with LhvClient(env.bootstrap, topics=env.topics, timeout_s=90) as c:
            for name in names:
                await c.create(name, dim=2, space="l2", engine="exact")
                await c.add(name, ["x"], [[1.0, 0.0]], ack=True)
                assert (await c.stats(name))["count"] == 1
        assert _owned(with_standbys) and _owned(without)  # one partition each
        assert "standby copy of" not in without.log_text()
    finally:
        for proc in (with_standbys, without):
            assert proc.terminate() == 0, proc.log_text()[-3000:]
