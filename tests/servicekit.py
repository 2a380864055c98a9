"""Test kit for fast unit tests of the service: real `Worker`s over `MemoryKafka` and a
shared `MemoryBlobStore`, no broker and no S3."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from worker.service import Worker
from worker.service.config import CheckpointPolicy, QueryPolicy, WorkerConfig
from worker.service.memory_kafka import MemoryClient, MemoryKafka
from worker.storage.blobstore import MemoryBlobStore, S3Config
from worker.wire.topics import TopicsConfig

TOPICS = TopicsConfig()
REPLIES = "lhv.replies.unit"


def config(name: str, **overrides: Any) -> WorkerConfig:
    kw: dict[str, Any] = {
        "s3": S3Config(),
        "worker_id": name,
        "internal_key": "unit-test-internal-key-0123456789abcdef",
        "checkpoint": CheckpointPolicy(every_records=10**6, every_s=3600.0, max_replay_s=0),
        "queries": QueryPolicy(commit_interval_ms=50),
        "stall_timeout_s": 3600.0,
    }
    kw.update(overrides)
    return WorkerConfig(**kw)


class Cluster:
    """One broker and one bucket; workers join with `worker()`."""

    def __init__(self, partitions: int = 2) -> None:
        self.partitions = partitions
        self.broker = MemoryKafka(
            {
                TOPICS.commands: partitions,
                TOPICS.search: partitions,
                TOPICS.replica_search: partitions,
                TOPICS.dlq: 1,
            }
        )
        self.broker.create_topic(REPLIES, 1)
        self.blobs = MemoryBlobStore()

    @contextlib.asynccontextmanager
    async def worker(
        self, name: str, *, blobs: Any = None, **overrides: Any
    ) -> AsyncIterator[tuple[Worker, MemoryClient, asyncio.Task[None]]]:
        """A started, running worker (`role="replica"`: a read replica, in its group);
        `blobs` wraps the shared bucket (default: the bucket itself)."""
        settings = config(name, **overrides)
        client = self.broker.client(settings.for_role().group_id)
        w = Worker(settings, kafka=client, blobs=blobs or _Shared(self.blobs))
        await w.start()
        task = asyncio.create_task(w.run())
        try:
            yield w, client, task
        finally:
            w.request_stop()
            with contextlib.suppress(Exception):
                await task
            await w.stop()

    def command(self, index: str, body: dict[str, Any], *, reply: bytes | None = None) -> int:
        headers = []
        if reply is not None:
            headers = [("kafka_replyTopic", REPLIES.encode()), ("kafka_correlationId", reply)]
        rec = self.broker.produce(
            TOPICS.commands, index.encode(), orjson.dumps({"index": index, **body}), headers=headers
        )
        return rec.offset

    def query(
        self, index: str, body: dict[str, Any], cid: bytes, *, topic: str = TOPICS.search
    ) -> int:
        """Produce a query (`topic`: the owners' search topic, or the replicas')."""
        headers = [("kafka_replyTopic", REPLIES.encode()), ("kafka_correlationId", cid)]
        rec = self.broker.produce(
            topic, index.encode(), orjson.dumps({"index": index, **body}), headers=headers
        )
        return rec.offset

    def replies(self) -> dict[bytes, dict[str, Any]]:
        out = {}
        for rec in self.broker.records(REPLIES):
            cid = dict(rec.headers).get("kafka_correlationId")
            if cid is not None and rec.value:
                out[cid] = orjson.loads(rec.value)
        return out

    def end(self, p: int) -> int:
        from aiokafka import TopicPartition

        return self.broker.log_end(TopicPartition(TOPICS.commands, p))


class _Shared:
    """One `MemoryBlobStore` that each worker may start and stop: the bucket outlives
    the workers, as S3 does."""

    def __init__(self, inner: MemoryBlobStore) -> None:
        self._inner = inner

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # get, head, put, put_if_match, delete, list
        return getattr(self._inner, name)


async def eventually(check: Callable[[], bool], what: str, *, timeout_s: float = 20.0) -> None:
    """Wait until `check()` holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.01)


def caught_up(cluster: Cluster, worker: Worker) -> Callable[[], bool]:
    """Every partition of `worker` serves and applied its log to the end (the batch that
    moved the applied offset is finished: the offset moves record by record, the
    index in one step per batch)."""

    def check() -> bool:
        runners = worker._runners
        return bool(worker.partitions) and all(
            part.status.value == "serving"
            and part.applied_offset >= cluster.end(p) - 1
            and p in runners
            and runners[p].pending == 0
            for p, part in worker.partitions.items()
        )

    return check
