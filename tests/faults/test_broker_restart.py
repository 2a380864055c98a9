"""The broker dies and comes back under a running worker: it reconnects, applies what was
produced after the restart, and loses nothing. A worker stopped while the broker is down
stops cleanly (its checkpoints written), and the next one restores everything; one whose
broker dies in the middle of its group join stops when asked."""

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

from worker.service import Worker
from worker.storage.blobstore import S3Config

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_broker_kill_under_a_worker_loses_nothing_and_never_blocks_its_stop(
    make_local_stack,
) -> None:
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
        await asyncio.to_thread(local.kill_kafka)
        await asyncio.sleep(2)  # its fetches fail and wait out their retry backoff
        # leaving `running` stops it: that must return, not raise out of aiokafka's stop
    await asyncio.to_thread(local.restart_kafka)
    async with running(env.config()) as again:
        await wait_caught_up([again], env.bootstrap, env.topics.commands, timeout_s=180)
        assert_state_matches(all_indexes([again]), oracle)

    joiner = Worker(env.config(group_id=f"{env.group}-joiner"))
    await joiner.start()  # returns before its group join is done
    await asyncio.to_thread(local.kill_kafka)
    run = asyncio.create_task(joiner.run())
    await asyncio.sleep(1)
    joiner.request_stop()  # what SIGTERM does
    # aiokafka's poll waits for an unfinished rebalance without bound: run() must not
    await asyncio.wait_for(run, 60)
    await joiner.stop()
