"""A standby's warm copy: loads the owner's checkpoint, tails the log, applies every
command kind read-only (sharded creates and their forwards, aliases, merges), writes
nothing, and hands over its state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from lhv_index import Index, IndexParams, Limits
from worker.kafka.config import KafkaConfig
from worker.service.apply import apply_records
from worker.service.config import ImportPolicy
from worker.service.follower import ReadOnlyWrites
from worker.service.memory_kafka import MemoryKafka
from worker.service.merge import MergeProtocol
from worker.service.partition import Partition
from worker.service.warm import KafkaLogReader, Warm, WarmCopy, changed_since
from worker.storage.blobstore import MemoryBlobStore, S3Config
from worker.storage.snapshots import Manifest, SnapshotStore
from worker.wire.limits import MessageLimits
from worker.wire.topics import TopicsConfig

pytestmark = pytest.mark.asyncio

TOPIC = "lhv.commands"
TP = TopicPartition(TOPIC, 0)


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

    async def position(self) -> int | None:
        return self._position

    def highwater(self) -> int | None:
        return self._broker.log_end(self._tp if hasattr(self, "_tp") else TP)

    async def read(self, *, timeout_ms: int, max_records: int) -> Sequence[Any]:
        records = self._broker.read(TP, self._position, max_records)
        if not records:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
            return []
        self._position = records[-1].offset + 1
        return records


def _add(broker: MemoryKafka, index: str, ids: list[str], *, ack: bool = False) -> int:
    vectors = np.random.default_rng(len(ids)).random((len(ids), 4)).tolist()
    body = {
        "op": "add",
        "index": index,
        "items": [{"id": i, "vector": v} for i, v in zip(ids, vectors, strict=True)],
    }
    headers = [("kafka_replyTopic", b"lhv.replies.t"), ("kafka_correlationId", b"c")] if ack else []
    return broker.produce(TOPIC, index.encode(), orjson.dumps(body), headers=headers).offset


async def _checkpoint(store: SnapshotStore, index: Index, offset: int) -> None:
    """What an owner's checkpoint leaves: a base of `index` and a manifest at `offset`."""
    entry = await store.save_index(0, index, offset=offset)
    manifest, etag = await store.read_manifest(0)
    base = manifest or Manifest(topic=TOPIC, partition=0)
    await store.write_manifest(
        Manifest(
            topic=TOPIC,
            partition=0,
            offset=offset,
            generation=base.generation,
            indexes={index.name: entry},
        ),
        etag=etag,
    )


async def _eventually(check: Any, what: str) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out: {what}")


async def _setup() -> tuple[MemoryKafka, MemoryBlobStore, SnapshotStore]:
    broker = MemoryKafka({TOPIC: 1})
    blobs = MemoryBlobStore()
    await blobs.start()
    store = SnapshotStore(blobs, topic=TOPIC, worker_id="owner")
    broker.produce(TOPIC, b"docs", orjson.dumps({"op": "create", "index": "docs", "dim": 4}))
    _add(broker, "docs", ["a", "b"])
    return broker, blobs, store


class _OnePartition:
    """The registry a copy's barrier steps read: one partition, none owned."""

    num_partitions = 1
    partitions: dict[int, Any] = {}


async def _steps(store: SnapshotStore) -> MergeProtocol:
    """The read-only barrier steps a worker gives its copies (`ReadOnlyWrites`; no step
    here reads an export, so their bucket is empty)."""
    steps = MergeProtocol(
        topics=TopicsConfig(commands=TOPIC),
        registry=_OnePartition(),  # type: ignore[arg-type]
        kafka=None,  # type: ignore[arg-type]  # a read-only copy produces nothing
        blobs=MemoryBlobStore(),
        tasks=None,  # type: ignore[arg-type]  # and runs no sweeper
        imports=ImportPolicy(),
        s3=S3Config(),
        internal_key="unit-test-internal-key-0123456789abcdef",
        checkpoint_every_records=1000,
        writes=ReadOnlyWrites(store),
    )
    await steps.start()
    return steps


async def _follower(broker: MemoryKafka, store: SnapshotStore, **kw: Any) -> WarmCopy:
    return WarmCopy(
        0,
        store=store,
        reader=_Reader(broker),
        num_partitions=1,
        limits=MessageLimits(),
        index_limits=Limits(),
        steps=await _steps(store),
        retry_s=0.02,
        manifest_poll_s=0.02,
        **kw,
    )


async def _owner_state(broker: MemoryKafka, upto: int) -> Index:
    """The owner's index after applying the log up to `upto` (a follower of its own)."""
    partition = Partition(number=0)
    apply_records(
        partition,
        broker.read(TP, 0, upto + 1),
        num_partitions=1,
        limits=MessageLimits(),
        index_limits=Limits(),
    )
    return partition.indexes["docs"]


async def test_a_follower_loads_the_checkpoint_tails_the_log_and_writes_nothing() -> None:
    broker, blobs, store = await _setup()
    await _checkpoint(store, await _owner_state(broker, 1), 1)
    _add(broker, "docs", ["c", "d", "e"])
    written = {k: (await blobs.get(k))[1] for k in await blobs.list()}
    follower = await _follower(broker, store)
    assert follower.lag is None  # nothing loaded yet
    follower.start()
    try:
        end = broker.log_end(TP) - 1
        await _eventually(lambda: follower.offset == end, "caught up")
        assert follower.lag == 0
    finally:
        warm = await follower.handover()
    assert warm is not None and warm.offset == end
    assert len(warm.indexes["docs"]) == 5
    assert warm.changed == {"docs": end}  # changed here past the checkpoint
    assert {k: (await blobs.get(k))[1] for k in await blobs.list()} == written


async def test_a_reader_still_connecting_has_no_log_end_yet() -> None:
    """A standby's lag is read for metrics and status while its reader still connects
    (to a broker that may be down): it reads as unknown, never as an error."""
    tp = TopicPartition(TOPIC, 0)
    reader = KafkaLogReader(KafkaConfig(bootstrap_servers="127.0.0.1:1"), tp, max_fetch_bytes=1024)
    try:
        assert reader.highwater() is None
        assert await reader.position() is None
    finally:
        await reader.stop()


async def test_records_past_the_checkpoint_that_asked_for_acks_are_handed_over() -> None:
    broker, _, store = await _setup()
    await _checkpoint(store, await _owner_state(broker, 1), 1)
    acked = _add(broker, "docs", ["c"], ack=True)
    follower = await _follower(broker, store)
    follower.start()
    try:
        await _eventually(lambda: follower.offset == acked, "caught up")
    finally:
        warm = await follower.handover()
    assert warm is not None
    assert [o.offset for o, _ in warm.unreported] == [acked]
    assert warm.unreported[0][0].reply_to is not None


async def test_a_merge_within_the_partition_keeps_the_copy_warm_with_the_owners_state() -> None:
    broker, blobs, store = await _setup()
    await _checkpoint(store, await _owner_state(broker, 1), 1)
    broker.produce(TOPIC, b"other", orjson.dumps({"op": "create", "index": "other", "dim": 4}))
    written = {k: (await blobs.get(k))[1] for k in await blobs.list()}
    copy = await _follower(broker, store)
    copy.start()
    try:
        await _eventually(lambda: copy.offset == 2, "loaded and tailing")
        body = {"op": "merge", "index": "docs", "dest": "other", "clear_source": True}
        merge = broker.produce(TOPIC, b"docs", orjson.dumps(body)).offset
        after = _add(broker, "docs", ["z"])
        await _eventually(lambda: copy.offset == after, "applied the merge and past it")
    finally:
        warm = await copy.handover()
    assert warm is not None and merge < after
    owner = Partition(number=0)
    apply_records(
        owner,
        broker.read(TP, 0, after + 1),
        num_partitions=1,
        limits=MessageLimits(),
        index_limits=Limits(),
        barrier=await _steps(store),
    )
    assert {n: i.logical_state() for n, i in warm.indexes.items()} == {
        n: i.logical_state() for n, i in owner.indexes.items()
    }
    assert len(warm.indexes["other"]) == 2 and len(warm.indexes["docs"]) == 1
    assert warm.owner_steps_at == -1  # nothing only an owner does: promotable
    assert {k: (await blobs.get(k))[1] for k in await blobs.list()} == written


async def test_a_snapshot_gone_under_the_follower_is_loaded_again_from_the_new_manifest() -> None:
    broker, blobs, store = await _setup()
    await _checkpoint(store, await _owner_state(broker, 1), 1)
    manifest, _ = await store.read_manifest(0)
    assert manifest is not None
    await blobs.delete(manifest.indexes["docs"].base.key)  # the owner's GC won the race
    follower = await _follower(broker, store)
    follower.start()
    try:
        await asyncio.sleep(0.1)
        assert follower.offset is None
        last = _add(broker, "docs", ["q"])
        await _checkpoint(store, await _owner_state(broker, last), last)
        await _eventually(lambda: follower.offset == last, "loaded the new checkpoint")
    finally:
        warm = await follower.handover()
    assert warm is not None and len(warm.indexes["docs"]) == 3


async def test_a_seeded_follower_goes_on_from_the_state_it_was_given() -> None:
    broker, _, store = await _setup()
    seed = Warm(0, {"docs": await _owner_state(broker, 1)}, 1)
    last = _add(broker, "docs", ["s"])
    follower = await _follower(broker, store, seed=seed)
    follower.start()
    try:
        await _eventually(lambda: follower.offset == last, "caught up")
    finally:
        warm = await follower.handover()
    assert warm is not None and len(warm.indexes["docs"]) == 3


async def test_what_differs_from_a_manifest_is_what_changed_past_it_or_is_not_in_it() -> None:
    idx = {n: Index(n, IndexParams(dim=2)) for n in ("old", "new", "touched")}
    warm = Warm(0, idx, 50, changed={"old": 10, "touched": 40})
    assert changed_since(warm, 30, {"old": None, "touched": None}) == {"new", "touched"}
    assert changed_since(warm, 50, {"old": None, "touched": None, "new": None}) == set()


async def test_a_sharded_index_and_an_alias_keep_the_copy_warm_and_their_forwards_are_handed_over() -> (
    None
):
    broker, _, store = await _setup()
    await _checkpoint(store, await _owner_state(broker, 1), 1)
    copy = await _follower(broker, store)
    copy.start()
    try:
        await _eventually(lambda: copy.offset == 1, "loaded")
        body = {"op": "create", "index": "wide", "dim": 4, "shards": 2}
        broker.produce(TOPIC, b"wide", orjson.dumps(body))
        broker.produce(
            TOPIC, b"cur", orjson.dumps({"op": "alias", "index": "cur", "target": "wide"})
        )
        last = _add(broker, "wide", ["p", "q", "r"], ack=True)
        await _eventually(lambda: copy.offset == last, "applied the sharded records")
    finally:
        warm = await copy.handover()
    assert warm is not None
    assert set(warm.catalog) == {"wide", "cur"}
    assert warm.members == {}  # the members' creates are forwarded records, applied later
    forwards = [f for o, _ in warm.unreported for f in o.forwards]
    assert forwards, "what the home forwards is handed over for the new owner to produce"
    assert broker.log_end(TP) == last + 1, "the copy produced nothing"
