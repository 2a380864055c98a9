"""Where a `read_committed` consumer stands in a partition, read without waiting: shared
by the worker's consumer (`service.transport`) and the warm standbys' readers
(`service.warm`).

With transactions in the log, the end a `read_committed` consumer can read is the last
stable offset, not the highwater: the records after the first record of a transaction
still open are held back until it ends. And its position moves past offsets that hold no
record to hand out (transaction markers, aborted transactions' records), which is how a
reader learns that it has passed them.

Each reads nothing of a partition the consumer does not hold (yet): a standby's reader is
read for its lag while it still connects, and the worker's consumer while it rebalances;
aiokafka asserts on those, and here they read as "nothing fetched".
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

__all__ = ["held_back", "known_position", "readable_end"]


def readable_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The end of what `consumer` can read of `tp` as of its last fetch (None: nothing
    fetched): the last stable offset, or the highwater from a broker without one."""
    if tp not in consumer.assignment():
        return None
    end: int | None = consumer.last_stable_offset(tp)
    if end is None or end < 0:
        end = consumer.highwater(tp)
    return None if end is None else int(end)


def held_back(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """Records of `tp` past the last stable offset as of the last fetch: behind a
    transaction still open (0 without one, or before a fetch)."""
    if tp not in consumer.assignment():
        return 0
    hw, lso = consumer.highwater(tp), consumer.last_stable_offset(tp)
    if hw is None or lso is None or lso < 0:
        return 0
    return max(0, int(hw) - int(lso))


async def known_position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The offset `consumer` reads `tp` from next, when it is known now; None when it is
    not, or `tp` is not assigned. Never waits: aiokafka answers a known position without
    suspending, and an unknown one it would wait for is cut short at once."""
    try:
        async with asyncio.timeout(0):
            return int(await consumer.position(tp))
    except (TimeoutError, KafkaError):  # IllegalStateError: not assigned
        return None
