"""`lhv worker --processes 2` on the real stack: two members of the group that share the
partitions, a process killed with SIGKILL comes back, SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError
from workerkit import Env, WorkerProcess, make_env

from worker.storage.blobstore import S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARTITIONS = 4
STARTED = re.compile(r"worker process (\d+) of 2 started: pid (\d+)")


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)


async def _members(env: Env) -> tuple[str, dict[str, set[int]]]:
    """The group's state and, per member id, the commands partitions it owns."""
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([env.group])
    finally:
        await admin.close()
    group = response.to_object()["groups"][0]
    owned: dict[str, set[int]] = {}
    for member in group["members"]:
        raw = member["member_assignment"]
        parts: set[int] = set()
        if raw:
            assignment = ConsumerProtocolMemberAssignment.decode(raw)
            parts = {
                tp.partition for tp in assignment.partitions() if tp.topic == env.topics.commands
            }
        owned[member["member_id"]] = parts
    return group["state"], owned


async def _two_members_share_the_partitions(
    env: Env, *, other_than: frozenset[str] | set[str] = frozenset(), timeout_s: float = 120.0
) -> set[str]:
    """Wait until the group is stable with two members (not just `other_than`), each
    owning commands partitions and together all of them; their member ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state, owned = await _members(env)
        except KafkaError as exc:  # the group's coordinator is still being set up
            state, owned = type(exc).__name__, {}
        parts = list(owned.values())
        if (
            state == "Stable"
            and len(owned) == 2
            and set(owned) != other_than
            and all(parts)
            and set().union(*parts) == set(range(PARTITIONS))
        ):
            return set(owned)
        assert time.monotonic() < deadline, f"group {state}: {owned}"
        await asyncio.sleep(0.5)


def _children(proc: WorkerProcess) -> dict[int, list[int]]:
    """Slot -> the pids started in it, in order, from the parent's log."""
    out: dict[int, list[int]] = {}
    for slot, pid in STARTED.findall(proc.log_text()):
        out.setdefault(int(slot), []).append(int(pid))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _until(what: str, check: object, proc: WorkerProcess, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert proc.proc.poll() is None, f"parent ended: {proc.log_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{proc.log_text()[-4000:]}"
        await asyncio.sleep(0.2)


async def test_two_processes_join_as_two_members_survive_a_kill_and_stop_on_sigterm(
    env: Env, tmp_path: Path
) -> None:
    child_env = env.child_env(
        LHV_GROUP_INSTANCE_ID=f"{env.group}-pod", LHV_RESTART_BACKOFF_MS="200"
    )
    parent = WorkerProcess(child_env, tmp_path / "workers.log", ["--processes", "2"])
    try:
        await _until("two processes started", lambda: len(_children(parent)) == 2, parent)
        first_members = await _two_members_share_the_partitions(env)

        [killed] = _children(parent)[0]
        [other] = _children(parent)[1]
        os.kill(killed, signal.SIGKILL)
        await _until("slot 0 restarted", lambda: len(_children(parent)[0]) == 2, parent)
        restarted = _children(parent)[0][1]
        assert f"worker process 0 (pid {killed}) ended (killed by SIGKILL)" in parent.log_text()
        assert restarted != killed and _alive(restarted) and _alive(other)
        # the restarted process rejoins under its own static instance id: two members again
        members = await _two_members_share_the_partitions(env, other_than=first_members)
        assert len(members & first_members) == 1, "the untouched process kept its membership"
        pod = f"{env.group}-pod"
        assert sorted(m[: len(pod) + 2] for m in members) == [f"{pod}-0", f"{pod}-1"]

        assert parent.terminate(timeout_s=120) == 0, parent.log_text()[-4000:]
        assert not [p for p in (restarted, other) if _alive(p)], "a worker outlived its parent"
        assert "all 2 worker processes stopped" in parent.log_text()
    finally:
        if parent.proc.poll() is None:
            parent.proc.kill()
        for pids in _children(parent).values():
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
