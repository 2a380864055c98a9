"""Joining the group with LHV's assignor listed before the range assignor, on the real
broker: one JoinGroup per member and rebalance, so members settle (worker/kafka/joingroup.py).

aiokafka 0.14.0 sends a JoinGroup per listed assignor, and each one's changed protocol
list starts a new rebalance; the generation numbers below count rebalances.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from workerkit import create_topics

from worker.kafka import joingroup
from worker.kafka.assignor import Held, Role, StandbyAssignor


@asynccontextmanager
async def member(
    bootstrap: str, topic: str, group: str, held: dict[int, Held]
) -> AsyncIterator[tuple[AIOKafkaConsumer, StandbyAssignor]]:
    joingroup.install()  # as the worker does before it starts its consumer
    assignor = StandbyAssignor(replicas=1, held=lambda: held)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        partition_assignment_strategy=(
            assignor,
            RangePartitionAssignor,
        ),
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    try:
        yield consumer, assignor
    finally:
        await consumer.stop()


def generation(consumer: AIOKafkaConsumer) -> int:
    return int(consumer._coordinator.generation)  # type: ignore[union-attr]


async def settled(*consumers: AIOKafkaConsumer, partitions: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        held = [c.assignment() for c in consumers]
        if all(held) and sum(len(a) for a in held) == partitions:
            return
        assert time.monotonic() < deadline, f"the group did not settle: {held}"
        await asyncio.sleep(0.1)


async def test_members_listing_two_assignors_settle_in_one_rebalance_each(
    bootstrap_servers: str,
) -> None:
    topic, group = f"join-{uuid.uuid4().hex[:8]}", f"join-{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap_servers, [topic], partitions=2)
    first_holds = {0: Held(Role.ACTIVE, 5), 1: Held(Role.ACTIVE, 7)}
    async with member(bootstrap_servers, topic, group, first_holds) as (first, first_assignor):
        await settled(first, partitions=2)
        assert generation(first) == 1  # one member, one rebalance
        async with member(bootstrap_servers, topic, group, {}) as (second, second_assignor):
            await settled(first, second, partitions=2)
            assert generation(first) == generation(second) == 2
            await asyncio.sleep(3)  # several heartbeats: no rebalance follows
            assert generation(first) == generation(second) == 2
            assert [len(first.assignment()), len(second.assignment())] == [1, 1]
            # the group chose LHV's protocol: each member was named the other's standby
            assert first_assignor.take_standbys() and second_assignor.take_standbys()
