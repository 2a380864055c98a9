"""Test kit for worker tests: command streams, a plain-dict oracle, running workers.

The oracle implements DESIGN's semantics with dicts and no engine: last-write-wins by
`(version, offset, position)`, tombstones, the metadata rules, create/drop. The worker's
indexes are compared with it through `Index.logical_state()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from lhv_index import Index
from worker.client.client import stop_consumer as stop_quietly
from worker.kafka import admin as kafka_admin
from worker.kafka.config import KafkaConfig
from worker.service import Worker
from worker.service.config import CheckpointPolicy, WorkerConfig
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import SnapshotStore
from worker.wire.topics import TopicsConfig, home_partition, partitioner

ROOT = Path(__file__).resolve().parent.parent

Clock = tuple[int, int, int]


# -- topics --------------------------------------------------------------------------------


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await kafka_admin.create_topics(admin, dict.fromkeys(names, partitions))
    finally:
        await admin.close()


@dataclass(frozen=True)
class Env:
    """One test's own topics, group and S3 prefix on the shared stack."""

    bootstrap: str
    s3: S3Config
    topics: TopicsConfig
    group: str
    partitions: int

    def config(self, **overrides: Any) -> WorkerConfig:
        kw: dict[str, Any] = {
            "kafka": KafkaConfig(bootstrap_servers=self.bootstrap),
            "s3": self.s3,
            "topics": self.topics,
            "group_id": self.group,
            "checkpoint": CheckpointPolicy(
                every_records=2_000, every_s=2.0, retry_backoff_s=0.2, retry_backoff_max_s=1.0
            ),
            "session_timeout_ms": 10_000,
            "rebalance_timeout_ms": 20_000,
        }
        kw.update(overrides)
        return WorkerConfig(**kw)

    def child_env(self, **extra: str) -> dict[str, str]:
        """Environment for a `lhv worker` subprocess with this test's settings."""
        env = dict(os.environ)
        env.update(
            {
                "LHV_BOOTSTRAP_SERVERS": self.bootstrap,
                "LHV_S3_ENDPOINT_URL": self.s3.endpoint_url or "",
                "LHV_S3_BUCKET": self.s3.bucket,
                "LHV_S3_PREFIX": self.s3.prefix,
                "LHV_COMMANDS_TOPIC": self.topics.commands,
                "LHV_SEARCH_TOPIC": self.topics.search,
                "LHV_REPLICA_SEARCH_TOPIC": self.topics.replica_search,
                "LHV_DLQ_TOPIC": self.topics.dlq,
                "LHV_GROUP_ID": self.group,
                "LHV_CHECKPOINT_RECORDS": "2000",
                "LHV_CHECKPOINT_SECONDS": "2",
                "LHV_SESSION_TIMEOUT_MS": "6000",  # a killed worker's partitions move sooner
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.s3.access_key_id:
            env["LHV_S3_ACCESS_KEY_ID"] = self.s3.access_key_id
        if self.s3.secret_access_key:
            env["LHV_S3_SECRET_ACCESS_KEY"] = self.s3.secret_access_key
        env.update(extra)
        return env


async def make_env(bootstrap: str, s3: S3Config, *, partitions: int = 3) -> Env:
    tag = uuid.uuid4().hex[:8]
    topics = TopicsConfig(
        commands=f"t{tag}.commands",
        search=f"t{tag}.search",
        replica_search=f"t{tag}.search.replicas",
        dlq=f"t{tag}.dlq",
    )
    await create_topics(
        bootstrap, [topics.commands, topics.search, topics.replica_search], partitions
    )
    await create_topics(bootstrap, [topics.dlq], 1)
    prefix = f"{s3.prefix.rstrip('/')}/t{tag}/".lstrip("/")
    from dataclasses import replace

    return Env(bootstrap, replace(s3, prefix=prefix), topics, f"g{tag}", partitions)


# -- command streams -------------------------------------------------------------------------


def vec_b64(v: np.ndarray) -> str:
    import base64

    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def index_names(n: int, partitions: int) -> list[str]:
    """n index names spread over all partitions."""
    names: list[str] = []
    i = 0
    while len(names) < n:
        name = f"idx-{i}"
        i += 1
        if (
            sum(
                1
                for x in names
                if home_partition(x.encode(), partitions)
                == home_partition(name.encode(), partitions)
            )
            <= n // partitions
        ):
            names.append(name)
    return names


def command_stream(
    n_commands: int,
    *,
    partitions: int,
    n_indexes: int = 8,
    dim: int = 8,
    seed: int = 7,
    id_pool: int = 150,
) -> list[tuple[str, dict[str, Any]]]:
    """A mixed stream of (index, command) pairs: creates, adds with and without client
    versions (some out of order), duplicates inside a record, deletes, and drops followed
    by re-creates."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    names = index_names(n_indexes, partitions)
    spaces = ["cosine", "l2", "ip"]
    out: list[tuple[str, dict[str, Any]]] = []
    params = {
        n: {"dim": dim, "space": spaces[i % 3], "M": 8, "ef_construction": 64}
        for i, n in enumerate(names)
    }
    for n in names:
        out.append((n, {"op": "create", **params[n]}))
    while len(out) < n_commands:
        n = rng.choice(names)
        r = rng.random()
        if r < 0.6:
            items = []
            for _ in range(rng.randint(1, 12)):
                item: dict[str, Any] = {"id": f"id-{rng.randrange(id_pool)}"}
                v = nrng.normal(size=dim).astype("<f4")
                if rng.random() < 0.5:
                    item["vector"] = [float(x) for x in v]
                else:
                    item["vector_b64"] = vec_b64(v)
                m = rng.random()
                if m < 0.3:
                    item["metadata"] = {"tag": rng.choice("abcd"), "n": rng.randrange(10)}
                elif m < 0.4:
                    item["metadata"] = {}
                elif m < 0.5:
                    item["metadata"] = None
                if rng.random() < 0.3:
                    item["version"] = rng.randrange(5)
                items.append(item)
            if rng.random() < 0.1 and items:  # a duplicate id inside one record
                items.append({**items[0], "metadata": {"dup": True}})
            out.append((n, {"op": "add", "items": items}))
        elif r < 0.9:
            cmd: dict[str, Any] = {
                "op": "delete",
                "ids": [f"id-{rng.randrange(id_pool)}" for _ in range(rng.randint(1, 5))],
            }
            if rng.random() < 0.3:
                cmd["version"] = rng.randrange(5)
            out.append((n, cmd))
        elif r < 0.995:
            out.append((n, {"op": "create", **params[n]}))  # identical: a no-op
        else:
            out.append((n, {"op": "drop"}))
            out.append((n, {"op": "create", **params[n]}))
    return out


async def produce(
    bootstrap: str,
    topic: str,
    commands: list[tuple[str, dict[str, Any]]],
    *,
    headers: list[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    """Produce keyed commands in order; returns (partition, offset) of each."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        partitioner=partitioner,  # members NAME#s to their partitions; others as murmur2
    )
    await producer.start()
    try:
        futs = []
        for name, cmd in commands:
            body = {"index": name, **cmd}
            futs.append(
                await producer.send(
                    topic, key=name.encode(), value=orjson.dumps(body), headers=headers or []
                )
            )
        metas = await asyncio.gather(*futs)
        return [(m.partition, m.offset) for m in metas]
    finally:
        await producer.stop()


async def produce_raw(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes | None, int | None]],
    *,
    headers: list[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        out = []
        for key, value, partition in records:
            meta = await producer.send_and_wait(
                topic, key=key, value=value, partition=partition, headers=headers or []
            )
            out.append((meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, *, timeout_s: float = 20.0) -> list[Any]:
    """Every record of `topic` from the beginning up to its end now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        ends_by_p = await end_offsets(bootstrap, topic)
        tps = [TopicPartition(topic, p) for p in sorted(ends_by_p)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        seen = {tp: -1 for tp in tps}
        while any(seen[tp] < ends[tp] - 1 for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batch = await consumer.getmany(timeout_ms=500)
            for tp, recs in batch.items():
                out.extend(r for r in recs if r.offset < ends[tp])
                if recs:
                    seen[tp] = recs[-1].offset
        return out
    finally:
        await stop_quietly(consumer)


# -- the oracle ------------------------------------------------------------------------------


@dataclass
class OracleIndex:
    params: dict[str, Any]
    live: dict[str, tuple[np.ndarray, dict[str, Any] | None, Clock]] = field(default_factory=dict)
    tomb: dict[str, Clock] = field(default_factory=dict)

    def clock(self, id_: str) -> Clock | None:
        if id_ in self.live:
            return self.live[id_][2]
        return self.tomb.get(id_)

    def add(self, body: dict[str, Any], offset: int) -> None:
        """An `add` record at `offset`: last-write-wins per item, the metadata rules."""
        for pos, item in enumerate(body["items"]):
            clock = (int(item.get("version", 0)), offset, pos)
            cur = self.clock(item["id"])
            if cur is not None and clock <= cur:
                continue
            old_meta = self.live[item["id"]][1] if item["id"] in self.live else None
            meta = item.get("metadata")
            new_meta = old_meta if meta is None else (meta or None)
            self.live[item["id"]] = (_decode_vector(item), new_meta, clock)
            self.tomb.pop(item["id"], None)

    def delete(self, body: dict[str, Any], offset: int) -> None:
        """A `delete` record at `offset`: tombstones newer than what is stored."""
        for pos, id_ in enumerate(body["ids"]):
            clock = (int(body.get("version", 0)), offset, pos)
            cur = self.clock(id_)
            if cur is not None and clock <= cur:
                continue
            self.live.pop(id_, None)
            self.tomb[id_] = clock


def _decode_vector(item: dict[str, Any]) -> np.ndarray:
    import base64

    if "vector_b64" in item:
        return np.frombuffer(base64.b64decode(item["vector_b64"]), dtype="<f4").astype(np.float32)
    return np.asarray(item["vector"], dtype=np.float32)


def oracle_from_records(records: Iterable[Any]) -> dict[str, OracleIndex]:
    """Apply command records (all partitions, each in offset order) the plain way."""
    state: dict[str, OracleIndex] = {}
    for rec in records:
        try:
            body = orjson.loads(rec.value)
        except orjson.JSONDecodeError:
            continue
        name = body.get("index")
        op = body.get("op")
        idx = state.get(name)
        if op == "create":
            if idx is None:
                params = {k: v for k, v in body.items() if k not in ("op", "index", "request_id")}
                state[name] = OracleIndex(params)
        elif op == "drop":
            state.pop(name, None)
        elif op == "add" and idx is not None:
            idx.add(body, rec.offset)
        elif op == "delete" and idx is not None:
            idx.delete(body, rec.offset)
    return state


def assert_index_matches(name: str, index: Index, oracle: OracleIndex) -> None:
    st = index.logical_state()
    live = st["live"]
    assert set(live) == set(oracle.live), (
        f"{name}: live ids differ: extra {sorted(set(live) - set(oracle.live))[:5]}, "
        f"missing {sorted(set(oracle.live) - set(live))[:5]}"
    )
    for id_, (vec, meta, clock) in oracle.live.items():
        got_vec, got_meta, got_clock = live[id_]
        got = np.frombuffer(got_vec, dtype=np.float32) if isinstance(got_vec, bytes) else got_vec
        assert np.allclose(got, vec, rtol=1e-5, atol=1e-6), f"{name}/{id_}: vector differs"
        assert (got_meta or None) == (meta or None), f"{name}/{id_}: metadata {got_meta} != {meta}"
        assert tuple(got_clock) == clock, f"{name}/{id_}: clock {got_clock} != {clock}"
    tomb = {k: tuple(v) for k, v in st["tombstones"].items()}
    assert tomb == oracle.tomb, f"{name}: tombstones differ"


def assert_state_matches(indexes: dict[str, Index], oracle: dict[str, OracleIndex]) -> None:
    assert set(indexes) == set(oracle), f"indexes differ: {sorted(indexes)} != {sorted(oracle)}"
    for name, idx in indexes.items():
        assert_index_matches(name, idx, oracle[name])


# -- running workers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(config: WorkerConfig) -> AsyncIterator[Worker]:
    """A worker running in this process; stopped gracefully on exit."""
    worker = Worker(config)
    await worker.start()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await worker.stop()


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return sorted(await producer.partitions_for(topic))
    finally:
        await producer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> log end offset of `topic`, now."""
    tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await stop_quietly(consumer)


async def checkpoints_at_log_end(env: Env, *, timeout_s: float) -> dict[str, Index]:
    """Once every partition's manifest covers its log end (read again while waiting: a
    worker may still be producing, e.g. forwarding): every index the manifests name,
    restored."""
    deadline = time.monotonic() + timeout_s
    async with S3BlobStore(env.s3) as blobs:
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        while True:
            ends = await end_offsets(env.bootstrap, env.topics.commands)
            manifests = {p: (await store.read_manifest(p))[0] for p in range(env.partitions)}
            if all(m is not None and m.offset >= ends[p] - 1 for p, m in manifests.items()):
                break
            assert time.monotonic() < deadline, "checkpoints did not reach the log end"
            await asyncio.sleep(0.5)
        return {
            name: await store.load_index(name, entry)
            for m in manifests.values()
            if m is not None
            for name, entry in m.indexes.items()
        }


async def wait_caught_up(
    workers: list[Worker], bootstrap: str, topic: str, *, timeout_s: float = 120.0
) -> None:
    """Wait until the workers together serve every partition up to the log end, the
    batch that moved the applied offset there finished (the offset moves record by record,
    the index in one step per batch)."""
    ends = await end_offsets(bootstrap, topic)
    deadline = time.monotonic() + timeout_s
    while True:
        missing = []
        for p, end in ends.items():
            if not any(
                w.partitions[p].status.value == "serving"
                and w.partitions[p].applied_offset >= end - 1
                and p in w._runners
                and w._runners[p].pending == 0
                for w in workers
                if p in w.partitions
            ):
                missing.append(p)
        if not missing:
            return
        assert time.monotonic() < deadline, f"partitions {missing} not caught up"
        await asyncio.sleep(0.1)


def all_indexes(workers: list[Worker]) -> dict[str, Index]:
    out: dict[str, Index] = {}
    for w in workers:
        for part in w.partitions.values():
            out.update(part.indexes)
    return out


class WorkerProcess:
    """`lhv worker` in a child process, for kill -9 tests."""

    def __init__(self, env: dict[str, str], log_path: Path, args: Iterable[str] = ()) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker", *args],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def dies_at(self, point: str, *, timeout_s: float) -> None:
        """Wait for a worker armed with failpoint `point` (`name` or `name@n`) to kill
        itself there (-9), within `timeout_s`; fails, with its log, if it did not."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, timeout_s)
        code = self.proc.poll()
        log = self.log_text()
        self.kill9()
        assert code == -9, f"worker did not die at {point} (exit {code}):\n{log[-3000:]}"
        assert f"failpoint {point.split('@')[0]} reached" in log


# -- hand-made record batches ------------------------------------------------------------------


def own_group_worker(env: Env, log: Path, **extra: str) -> WorkerProcess:
    """A worker in a group of its own: a dead predecessor's session need not expire first
    (fencing by manifest generation keeps a late old owner out anyway)."""
    return WorkerProcess(env.child_env(LHV_GROUP_ID=f"g{uuid.uuid4().hex[:8]}", **extra), log)


@dataclass(frozen=True)
class RawRecord:
    """One record of a hand-made batch: header keys are raw bytes, so a test can send keys
    that are not UTF-8 (which no Kafka client lets a producer write)."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[bytes, bytes | None], ...] = ()
    timestamp_ms: int | None = None


def encode_batch(
    records: list[RawRecord],
    *,
    compression: str | None = None,
    producer_id: int = -1,
    transactional: bool = False,
    control: bool = False,
) -> bytes:
    """A record batch v2 (magic 2) holding `records` at offset deltas 0..n-1, compressed
    with `compression` (`gzip` or None); the broker assigns the base offset. With
    `producer_id`, `transactional` and `control`, a transaction's batch or marker as a
    broker stores it (`control_record`)."""
    import struct
    import zlib

    from aiokafka.record.default_records import DefaultRecordBase
    from aiokafka.record.util import calc_crc32c, encode_varint

    def varint(n: int, out: bytearray) -> None:
        encode_varint(n, out.append)

    def sized(data: bytes | None, out: bytearray) -> None:
        if data is None:
            varint(-1, out)
        else:
            varint(len(data), out)
            out.extend(data)

    now = int(time.time() * 1000)
    stamps = [r.timestamp_ms if r.timestamp_ms is not None else now for r in records]
    first = stamps[0]
    body = bytearray()
    for delta, (rec, stamp) in enumerate(zip(records, stamps, strict=True)):
        one = bytearray(b"\x00")  # attributes
        varint(stamp - first, one)
        varint(delta, one)
        sized(rec.key, one)
        sized(rec.value, one)
        varint(len(rec.headers), one)
        for hkey, hvalue in rec.headers:
            sized(hkey, one)
            sized(hvalue, one)
        varint(len(one), body)
        body.extend(one)
    codec = 0
    if compression == "gzip":
        gz = zlib.compressobj(6, zlib.DEFLATED, 31)
        body = bytearray(gz.compress(bytes(body)) + gz.flush())
        codec = DefaultRecordBase.CODEC_GZIP
    elif compression is not None:
        raise ValueError(f"unsupported compression {compression!r}")
    attributes = codec
    if transactional:
        attributes |= DefaultRecordBase.TRANSACTIONAL_MASK
    if control:
        attributes |= DefaultRecordBase.CONTROL_MASK
    header = DefaultRecordBase.HEADER_STRUCT
    buf = bytearray(header.size) + body
    header.pack_into(
        buf,
        0,
        0,  # base offset: set by the broker
        len(buf) - DefaultRecordBase.AFTER_LEN_OFFSET,
        -1,  # partition leader epoch
        2,  # magic
        0,  # crc, below
        attributes,
        len(records) - 1,
        first,
        max(stamps),
        producer_id,
        0 if producer_id >= 0 else -1,  # producer epoch
        0 if producer_id >= 0 else -1,  # base sequence
        len(records),
    )
    struct.pack_into(
        ">I",
        buf,
        DefaultRecordBase.CRC_OFFSET,
        calc_crc32c(buf[DefaultRecordBase.ATTRIBUTES_OFFSET :]),
    )
    return bytes(buf)


def control_record(*, commit: bool) -> RawRecord:
    """A transaction marker: key version 0 and type (0 abort, 1 commit), value version 0
    and coordinator epoch."""
    return RawRecord(b"\x00\x00\x00" + bytes([int(commit)]), b"\x00\x00\x00\x00\x00\x00")


async def produce_batch(
    bootstrap: str,
    topic: str,
    partition: int,
    records: list[RawRecord],
    *,
    compression: str | None = None,
) -> list[int]:
    """Write `records` as one batch to `topic`/`partition` with a plain ProduceRequest
    (no client-side checks); returns their offsets."""
    from aiokafka import AIOKafkaClient
    from aiokafka.errors import for_code
    from aiokafka.protocol.produce import ProduceRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client._wait_on_metadata(topic)
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = ProduceRequest(
            transactional_id=None,
            required_acks=-1,
            timeout=30_000,
            topics=[(topic, [(partition, encode_batch(records, compression=compression))])],
        )
        response = await client.send(leader, request)
        (_, parts), *_ = response.topics
        _, code, base, *_ = parts[0]
        if code:
            raise for_code(code)(f"produce to {topic}/{partition}")
        return [base + i for i in range(len(records))]
    finally:
        await client.close()


async def read_readable(bootstrap: str, topic: str) -> list[Any]:
    """Every record of `topic` up to its end now that a Kafka client can read, in offset
    order per partition: records with header keys that are not UTF-8 are left out (a
    plain consumer would fail on them). Read with the worker's lenient reader."""
    from types import SimpleNamespace

    from aiokafka import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest

    from worker.service.recordbatch import RawRecord as Raw
    from worker.service.recordbatch import read_batches

    ends = await end_offsets(bootstrap, topic)
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    out: list[Any] = []
    try:
        await client._wait_on_metadata(topic)
        for p, end in sorted(ends.items()):
            leader = client.cluster.leader_for_partition(TopicPartition(topic, p))
            offset = 0
            while offset < end:
                request = FetchRequest(0, 1, 64 << 20, 0, [(topic, [(p, offset, 64 << 20)])])
                response = await client.send(leader, request)
                data = response.topics[0][1][0][-1]
                batches = read_batches(data, max_inflated_bytes=1 << 30)
                assert batches, f"nothing read at {topic}/{p}@{offset}"
                for batch in batches:
                    for rec in batch.records:
                        if (
                            isinstance(rec, Raw)
                            and rec.header_keys_are_utf8
                            and rec.offset >= offset
                        ):
                            headers = [(k.decode(), v) for k, v in rec.headers]
                            out.append(
                                SimpleNamespace(
                                    topic=topic,
                                    partition=p,
                                    offset=rec.offset,
                                    timestamp=rec.timestamp,
                                    key=rec.key,
                                    value=rec.value,
                                    headers=headers,
                                )
                            )
                    offset = max(offset, batch.next_offset)
    finally:
        await client.close()
    return out
