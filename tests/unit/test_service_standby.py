"""A worker over the in-memory log and store takes a partition over from the warm copy
it holds: no snapshot download, the state of a plain replay, the acks of what only the
copy applied, and a next checkpoint that covers what the copy applied past the manifest."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, caught_up, eventually
from workerkit import all_indexes, assert_state_matches, oracle_from_records

from lhv_index import Limits
from worker.service.memory_kafka import MemoryKafka
from worker.service.standby import Standbys
from worker.service.warm import Warm, WarmCopy
from worker.storage.snapshots import SnapshotStore
from worker.telemetry.metrics import Metrics
from worker.wire.limits import MessageLimits

TP = TopicPartition(TOPICS.commands, 0)


class _Reader:
    """`LogReader` over `MemoryKafka`."""

    def __init__(self, broker: MemoryKafka) -> None:
        self._broker = broker
        self._position = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def bounds(self) -> tuple[int, int]:
        return self._broker.log_start(TP), self._broker.log_end(TP)

    def seek(self, offset: int) -> None:
        self._position = offset

    async def read(self, *, timeout_ms: int, max_records: int) -> Sequence[Any]:
        records = self._broker.read(TP, self._position, max_records)
        if not records:
            await asyncio.sleep(0.01)
            return []
        self._position = records[-1].offset + 1
        return records


def _add(cluster: Cluster, ids: list[str], *, reply: bytes | None = None) -> int:
    vectors = np.random.default_rng(len(ids)).random((len(ids), 4)).tolist()
    items = [{"id": i, "vector": v} for i, v in zip(ids, vectors, strict=True)]
    return cluster.command("docs", {"op": "add", "items": items}, reply=reply)


def _restores(metrics: Metrics, source: str) -> float:
    return metrics.registry.get_sample_value("lhv_restores_total", {"source": source}) or 0.0


async def test_a_partition_warm_here_is_promoted_with_no_download_and_acks_what_only_the_copy_applied() -> (
    None
):
    cluster = Cluster(partitions=1)
    cluster.command("docs", {"op": "create", "dim": 4, "space": "l2"})
    _add(cluster, ["a", "b"])
    async with cluster.worker("owner") as (owner, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, owner), "the owner applies the log")
        await client.assign([])  # checkpointed at offset 1, as an owner that died later
    late = _add(cluster, ["c", "d"], reply=b"late")  # the owner never saw it
    store = SnapshotStore(cluster.blobs, topic=TOPICS.commands, worker_id="copy")

    def make(p: int, seed: Warm | None) -> WarmCopy:
        return WarmCopy(
            p,
            store=store,
            reader=_Reader(cluster.broker),
            num_partitions=1,
            limits=MessageLimits(),
            index_limits=Limits(),
            retry_s=0.02,
            manifest_poll_s=0.02,
        )

    async with cluster.worker("survivor") as (survivor, client, _):
        standbys = Standbys(make, survivor.metrics)
        survivor.ownership._standbys = standbys  # what LHV_STANDBY_REPLICAS=1 builds
        standbys.reconcile([0])
        await eventually(lambda: standbys.held() == {0: late}, "the copy applies the late add")
        await client.assign([0])
        await eventually(caught_up(cluster, survivor), "the survivor serves")
        assert _restores(survivor.metrics, "standby") == 1
        assert _restores(survivor.metrics, "snapshot") == 0
        partition = survivor.partitions[0]
        assert partition.applied_offset == late
        assert "docs" in partition.dirty  # changed past the manifest: the next checkpoint
        oracle = oracle_from_records(cluster.broker.records(TOPICS.commands, 0))
        assert_state_matches(all_indexes([survivor]), oracle)
        await eventually(lambda: b"late" in cluster.replies(), "the late add is acknowledged")
        assert cluster.replies()[b"late"]["status"] == "ok"
        assert await survivor.ownership.checkpoint(partition, reason="test")
        manifest, _ = await store.read_manifest(0)
        assert manifest is not None and manifest.offset == late
        restored = await store.load_index("docs", manifest.indexes["docs"])
        assert len(restored) == 4
        await standbys.stop()
