"""The broker dies and comes back under a running worker: it reconnects, applies what was
produced after the restart, and loses nothing."""

from __future__ import annotations

import asyncio

import pytest
from workerkit import (
    all_indexes,
    assert_state_matches,
    command_stream,
    make_env,
    oracle_from_records,
    produce,
    read_all,
    running,
    wait_caught_up,
)

from worker.storage.blobstore import S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_worker_survives_a_broker_kill_and_restart(make_local_stack) -> None:
    local = await asyncio.to_thread(make_local_stack)  # private: its broker gets killed
    env = await make_env(local.bootstrap_servers, S3Config.from_env(local.env()), partitions=2)
    stream = command_stream(2_000, partitions=env.partitions, seed=31)
    async with running(env.config()) as w:
        await produce(env.bootstrap, env.topics.commands, stream[:1000])
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
        await asyncio.to_thread(local.kill_kafka)
        await asyncio.sleep(2)  # the worker sees the broker gone
        await asyncio.to_thread(local.restart_kafka)
        await produce(env.bootstrap, env.topics.commands, stream[1000:])
        await wait_caught_up([w], env.bootstrap, env.topics.commands, timeout_s=180)
        oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
        assert_state_matches(all_indexes([w]), oracle)
