"""Test kit for search delivery tests: queries produced by hand with any timestamp,
replies read with a plain consumer, the group's committed offsets, indexes with one item.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from workerkit import Env, produce

from worker.client.client import stop_consumer as stop_quietly
from worker.wire.headers import CORRELATION_ID, REPLY_PARTITION, REPLY_TOPIC


class Requester:
    """Queries produced by hand (any timestamp) and replies read with a plain consumer."""

    def __init__(self, env: Env, reply_topic: str) -> None:
        self.env = env
        self.reply_topic = reply_topic
        self.producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap, acks="all")
        self.consumer = AIOKafkaConsumer(bootstrap_servers=env.bootstrap, enable_auto_commit=False)
        self.replies: dict[bytes, list[dict[str, Any]]] = {}

    async def __aenter__(self) -> Requester:
        await self.producer.start()
        await self.consumer.start()
        tp = TopicPartition(self.reply_topic, 0)
        self.consumer.assign([tp])
        await self.consumer.seek_to_beginning(tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()
        await stop_quietly(self.consumer)

    async def send(
        self, index: str, cid: bytes, *, timestamp_ms: int | None = None, **body: Any
    ) -> None:
        headers = [
            (REPLY_TOPIC, self.reply_topic.encode()),
            (CORRELATION_ID, cid),
            (REPLY_PARTITION, struct.pack(">i", 0)),
        ]
        value = orjson.dumps({"index": index, "k": 1, **body})
        await self.producer.send_and_wait(
            self.env.topics.search,
            key=index.encode(),
            value=value,
            headers=headers,
            timestamp_ms=timestamp_ms,
        )

    async def wait_for(self, cids: list[bytes], *, timeout_s: float = 60.0) -> None:
        """Until each of `cids` has a reply (bounded)."""
        deadline = time.monotonic() + timeout_s
        while not all(c in self.replies for c in cids):
            missing = [c for c in cids if c not in self.replies]
            assert time.monotonic() < deadline, f"no reply for {missing[:5]} ({len(missing)})"
            await self.read(timeout_ms=200)

    async def read(self, *, timeout_ms: int) -> None:
        batch = await self.consumer.getmany(timeout_ms=timeout_ms)
        for recs in batch.values():
            for rec in recs:
                cid = dict(rec.headers)[CORRELATION_ID]
                self.replies.setdefault(cid, []).append(orjson.loads(rec.value))

    def reply(self, cid: bytes) -> dict[str, Any]:
        return self.replies[cid][0]


async def committed_offsets(env: Env) -> dict[TopicPartition, int]:
    """The group's committed offsets, read with the admin API (no group member)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=env.bootstrap)
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(env.group)
        return {tp: meta.offset for tp, meta in got.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def create_and_fill(env: Env, names: list[str]) -> dict[str, int]:
    """Create each index with one item `x-<name>`; the offset of each add, by name."""
    commands: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        commands.append((name, {"op": "create", "dim": 2, "space": "l2", "engine": "exact"}))
        commands.append((name, {"op": "add", "items": [{"id": f"x-{name}", "vector": [1, 0]}]}))
    placed = await produce(env.bootstrap, env.topics.commands, commands)
    return {name: placed[2 * i + 1][1] for i, name in enumerate(names)}
