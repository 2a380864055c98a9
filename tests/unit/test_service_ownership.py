"""Ownership, checkpoints and runners over the in-memory command log and blob store: what
a new owner restores equals a plain replay, a revoke mid-batch loses nothing, a fenced
owner lets go, and background failures are never silent."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, caught_up, eventually
from workerkit import all_indexes, assert_state_matches, command_stream, oracle_from_records

from lhv_index.errors import Internal


def _produce_stream(cluster: Cluster, n: int, seed: int = 7) -> None:
    for index, body in command_stream(n, partitions=cluster.partitions, seed=seed):
        cluster.command(index, body)


def _oracle(cluster: Cluster):  # type: ignore[no-untyped-def]
    return oracle_from_records(
        rec for p in range(cluster.partitions) for rec in cluster.broker.records(TOPICS.commands, p)
    )


async def test_applied_then_checkpointed_state_restores_on_a_new_owner_equal_to_the_oracle() -> (
    None
):
    cluster = Cluster(partitions=2)
    _produce_stream(cluster, 300)
    async with cluster.worker("a") as (a, client_a, _):
        await client_a.assign([0, 1])
        await eventually(caught_up(cluster, a), "a applies the log")
        assert_state_matches(all_indexes([a]), _oracle(cluster))
        await client_a.assign([])  # revoke: checkpoint, commit
        committed = cluster.broker.committed("lhv")
        for p in range(2):
            assert committed[TopicPartition(TOPICS.commands, p)] == cluster.end(p)
    async with cluster.worker("b") as (b, client_b, _):
        await client_b.assign([0, 1])
        await eventually(caught_up(cluster, b), "b restores")
        assert all(part.checkpoint_offset == cluster.end(p) - 1 for p, part in b.partitions.items())
        assert_state_matches(all_indexes([b]), _oracle(cluster))
        restored = b.metrics.registry.get_sample_value("lhv_restore_seconds_count")
        assert restored == 2


async def test_a_revoke_mid_batch_loses_nothing() -> None:
    cluster = Cluster(partitions=2)
    _produce_stream(cluster, 200, seed=3)
    async with cluster.worker("a", max_poll_records=7) as (a, client_a, _):
        await client_a.assign([0, 1])
        await eventually(
            lambda: any(part.applied_offset >= 0 for part in a.partitions.values()),
            "a starts applying",
        )
        _produce_stream(cluster, 200, seed=4)  # more, while batches are in flight
        await client_a.assign([1])  # p0 moves away mid-stream
        async with cluster.worker("b") as (b, client_b, _):
            await client_b.assign([0])
            await eventually(caught_up(cluster, b), "b owns p0")
            await eventually(caught_up(cluster, a), "a keeps p1")
            assert set(a.partitions) == {1} and set(b.partitions) == {0}
            assert_state_matches(all_indexes([a, b]), _oracle(cluster))


async def test_an_assignment_that_completes_while_the_worker_stops_is_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiokafka finishes a join still under way when the consumer stops, so a worker told
    to stop (SIGTERM) can be assigned partitions after it released its own and stopped
    its parts. That assignment restores and positions nothing; the revocation before it
    still releases (checkpoints) what the worker holds."""
    cluster = Cluster(partitions=2)
    _produce_stream(cluster, 100)
    async with cluster.worker("a") as (a, client_a, task):
        await client_a.assign([0])
        await eventually(caught_up(cluster, a), "a applies p0")
        a.request_stop()
        await task
        with caplog.at_level("INFO", logger="worker.service.worker"):
            await client_a.assign([0, 1])  # the join that completes inside stop()
        assert a.partitions == {}, "nothing restored after the stop request"
        assert "partitions assigned while stopping" in caplog.text
        committed = cluster.broker.committed("lhv")
        assert committed[TopicPartition(TOPICS.commands, 0)] == cluster.end(0)
    async with cluster.worker("b") as (b, client_b, _):
        await client_b.assign([0, 1])
        await eventually(caught_up(cluster, b), "b restores both")
        assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_fenced_owner_drops_the_partition_and_the_new_owner_keeps_it() -> None:
    cluster = Cluster(partitions=1)
    _produce_stream(cluster, 50)
    async with cluster.worker("zombie") as (zombie, client_z, _):
        await client_z.assign([0])
        await eventually(caught_up(cluster, zombie), "the first owner applies")
        async with cluster.worker("b") as (b, client_b, _):
            await client_b.assign([0])  # the group moved p0; the zombie was not told
            await eventually(caught_up(cluster, b), "the new owner restores")
            _produce_stream(cluster, 60, seed=9)
            part = zombie.partitions[0]
            await eventually(lambda: part.applied_offset >= cluster.end(0) - 1, "zombie applies")
            assert await zombie.ownership.checkpoint(part, reason="test") is False
            assert 0 not in zombie.partitions, "the fenced owner let the partition go"
            await eventually(caught_up(cluster, b), "the new owner applies the rest")
            assert_state_matches(all_indexes([b]), _oracle(cluster))
            assert_state_matches(all_indexes([b]), _oracle(cluster))


async def test_a_crashed_runner_ends_run_with_its_error() -> None:
    cluster = Cluster(partitions=1)
    async with cluster.worker("a") as (a, client_a, run):
        await client_a.assign([0])
        await eventually(lambda: 0 in a._runners, "the runner starts")

        async def broken(*args: object, **kw: object) -> None:
            raise RuntimeError("report bug")

        a.reporter.report = broken  # type: ignore[method-assign]
        cluster.command("docs", {"op": "create", "dim": 2})
        with pytest.raises(Internal, match="runner crashed"):
            async with asyncio.timeout(20):
                await run
        assert a.metrics.registry.get_sample_value(
            "lhv_background_failures_total", {"task": "partition"}
        )


async def test_a_failed_best_effort_step_is_logged_and_counted_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(partitions=1)
    async with cluster.worker("a") as (a, client_a, run):
        await client_a.assign([0])

        async def step() -> None:
            raise OSError("gc failed")

        a.tasks.spawn(step(), name="gc-0")
        await eventually(
            lambda: (
                a.metrics.registry.get_sample_value("lhv_background_failures_total", {"task": "gc"})
                == 1
            ),
            "the failure is counted",
        )
        assert any("gc-0 failed" in r.getMessage() for r in caplog.records)
        cluster.command("docs", {"op": "create", "dim": 2})
        await eventually(caught_up(cluster, a), "the worker goes on")
        assert not run.done()
