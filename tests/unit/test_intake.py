"""`Intake.poll` across a rebalance: records fetched for the old assignment are never
handed on (they would be applied ahead of the records before them)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from worker.kafka.config import KafkaConfig
from worker.service.intake import Intake
from worker.telemetry.metrics import Metrics
from worker.wire.limits import MessageLimits
from worker.wire.topics import TopicsConfig

CMD0 = TopicPartition("lhv.commands", 0)
CMD1 = TopicPartition("lhv.commands", 1)


def rec(tp: TopicPartition, offset: int) -> Any:
    return SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset, headers=())


class Consumer:
    """Answers `getmany` from a script: one entry per call, each a function that may
    run a rebalance (as aiokafka runs the listener inside a call) and returns records."""

    def __init__(self, script: list[Callable[[], dict[TopicPartition, list[Any]]]]) -> None:
        self.script = script
        self.calls = 0

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records: int) -> Any:
        step = self.script[self.calls] if self.calls < len(self.script) else dict
        self.calls += 1
        return step()

    def paused(self) -> set[TopicPartition]:
        return set()

    def assignment(self) -> set[TopicPartition]:
        return {CMD0, CMD1}


def intake(consumer: Consumer) -> Intake:
    return Intake(
        consumer,  # type: ignore[arg-type]
        kafka=KafkaConfig(),
        topics=TopicsConfig(),
        limits=MessageLimits(),
        metrics=Metrics(),
        fetch_max_bytes=1 << 20,
        max_inflated_bytes=1 << 26,
    )


async def test_records_fetched_before_a_rebalance_are_not_handed_on() -> None:
    holder: dict[str, Intake] = {}

    def rebalance_then_new_records() -> dict[TopicPartition, list[Any]]:
        holder["intake"].note_rebalance()  # revoked ...
        holder["intake"].note_rebalance()  # ... and assigned again, during this call
        return {CMD1: [rec(CMD1, 7)]}

    consumer = Consumer(
        [
            lambda: {CMD0: [rec(CMD0, 41)]},  # the waiting call: old assignment
            lambda: {CMD0: [rec(CMD0, 42)]},  # draining CMD0: old assignment
            rebalance_then_new_records,  # draining CMD1: a rebalance ran in this call
        ]
    )
    holder["intake"] = it = intake(consumer)
    got = await it.poll(timeout_ms=0, max_records=100)
    assert {tp: [r.offset for r in recs] for tp, recs in got.items()} == {CMD1: [7]}


async def test_without_a_rebalance_every_call_is_handed_on_in_order() -> None:
    consumer = Consumer(
        [
            lambda: {CMD0: [rec(CMD0, 41)]},
            lambda: {CMD0: [rec(CMD0, 42), rec(CMD0, 43)]},
            lambda: {CMD1: [rec(CMD1, 7)]},
        ]
    )
    got = await intake(consumer).poll(timeout_ms=0, max_records=100)
    assert {tp: [r.offset for r in recs] for tp, recs in got.items()} == {
        CMD0: [41, 42, 43],
        CMD1: [7],
    }
