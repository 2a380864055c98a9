"""Test kit for merge and import tests: an oracle that knows the merge protocol, and
helpers to build add records, read acks and list merge objects.

The oracle extends `workerkit`'s plain-dict semantics with `merge`, `merge_in` and
`merge_done` as DESIGN section 6 and `worker/service/merge.py` define them: a merge exports the
source's live items (sorted by id) as of its record; the first `merge_in` of a merge id
upserts those not live in dest with clock `(version, merge_in offset, position)`; the
first successful `merge_done` deletes the exported items whose clock is unchanged (when
the merge record asked for `clear_source`), with clock `(version, merge_done offset,
position)`. Later duplicates change nothing, and so does a protocol record that does not
carry the workers' MAC (a forged one).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from workerkit import (
    Clock,
    Env,
    OracleIndex,
    checkpoints_at_log_end,
    own_group_worker,
    read_all,
    stop_quietly,
    vec_b64,
)

from lhv_index import Index
from lhv_index.errors import LhvError
from worker.service.protocol_auth import ProtocolAuth, load_protocol_auth
from worker.storage.blobstore import S3BlobStore
from worker.wire.headers import CORRELATION_ID, REPLY_TOPIC
from worker.wire.topics import home_partition

Exported = list[tuple[str, np.ndarray, dict[str, Any] | None, Clock]]


def add_records(
    name: str,
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: Sequence[dict[str, Any] | None] | None = None,
    *,
    per_record: int = 1000,
) -> list[tuple[str, dict[str, Any]]]:
    """`add` commands for `workerkit.produce`, `per_record` items each."""
    out = []
    for start in range(0, len(ids), per_record):
        items = []
        for i in range(start, min(start + per_record, len(ids))):
            item: dict[str, Any] = {"id": ids[i], "vector_b64": vec_b64(vectors[i])}
            if metadata is not None and metadata[i] is not None:
                item["metadata"] = metadata[i]
            items.append(item)
        out.append((name, {"op": "add", "items": items}))
    return out


def names_on(partitions: int, *, same: bool, prefix: str) -> tuple[str, str]:
    """Two index names on the same partition, or on different ones."""
    first = f"{prefix}-src"
    home = home_partition(first.encode(), partitions)
    for i in range(10_000):
        other = f"{prefix}-dest{i}"
        if (home_partition(other.encode(), partitions) == home) == same:
            return first, other
    raise AssertionError("no name found")


async def wait_ack(
    bootstrap: str, topic: str, correlation_id: bytes, *, timeout_s: float = 120.0
) -> dict[str, Any]:
    """The first reply on `topic` with `correlation_id` (read from the beginning)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning(TopicPartition(topic, 0))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                for rec in recs:
                    if rec.key == correlation_id:
                        return dict(orjson.loads(rec.value))
        raise AssertionError(f"no reply {correlation_id!r} on {topic} in {timeout_s}s")
    finally:
        await stop_quietly(consumer)


def ack_headers(topic: str, correlation_id: bytes) -> list[tuple[str, bytes]]:
    return [(REPLY_TOPIC, topic.encode()), (CORRELATION_ID, correlation_id)]


async def protocol_auth(env: Env) -> ProtocolAuth:
    """The workers' verifier of protocol records (their key, read from the test's prefix)."""
    async with S3BlobStore(env.s3) as blobs:
        return await load_protocol_auth(blobs, env.topics.commands, None, create=False)


async def dlq_records(env: Env, *, timeout_s: float = 20.0) -> list[Any]:
    """Every record of the test's dead-letter topic so far."""
    return await read_all(env.bootstrap, env.topics.dlq, timeout_s=timeout_s)


def header(rec: Any, name: str) -> bytes | None:
    for key, value in rec.headers or ():
        if key == name:
            return bytes(value)
    return None


async def merge_objects(env: Env) -> list[str]:
    """Keys of the merge protocol's objects (exports, markers) under the test's prefix."""
    async with S3BlobStore(env.s3) as blobs:
        return await blobs.list("merges/")


async def wait_no_merge_objects(env: Env, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        left = await merge_objects(env)
        if not left:
            return
        assert time.monotonic() < deadline, f"merge objects not collected: {left}"
        await asyncio.sleep(0.5)


# -- kill -9 at every step ----------------------------------------------------------------------


async def die_at_each(env: Env, steps: Sequence[str], logs: Path) -> None:
    """One worker per failpoint of `steps`, in order, each armed with it: each must die
    there (kill -9 from inside), its successor replaying from the last checkpoint."""
    for i, point in enumerate(steps):
        proc = own_group_worker(env, logs / f"w{i}.log", LHV_FAILPOINTS=point)
        await proc.dies_at(point, timeout_s=180)


async def merged_checkpoints(env: Env, *, timeout_s: float) -> dict[str, Index]:
    """Once the merge objects are gone and checkpoints cover the log end: every index
    the manifests name, restored."""
    deadline = time.monotonic() + timeout_s
    while await merge_objects(env):
        assert time.monotonic() < deadline, f"merge never completed: {await merge_objects(env)}"
        await asyncio.sleep(0.5)
    return await checkpoints_at_log_end(env, timeout_s=max(1.0, deadline - time.monotonic()))


async def finish_merge(
    env: Env, logs: Path, reply_topic: str, correlation_id: bytes, *, timeout_s: float
) -> tuple[dict[str, Index], dict[str, Any]]:
    """A last worker, unarmed: the restored indexes once the merge is done and
    checkpointed, and the merge's ack; the worker must then stop cleanly."""
    proc = own_group_worker(env, logs / "last.log")
    try:
        indexes = await merged_checkpoints(env, timeout_s=timeout_s)
        ack = await wait_ack(env.bootstrap, reply_topic, correlation_id, timeout_s=30)
    finally:
        code = proc.terminate()
    assert code == 0, proc.log_text()[-3000:]
    return indexes, ack


# -- the oracle --------------------------------------------------------------------------------


def _compatible(a: OracleIndex, b: OracleIndex) -> bool:
    return a.params["dim"] == b.params["dim"] and a.params.get("space", "cosine") == b.params.get(
        "space", "cosine"
    )


def _exported(src: OracleIndex) -> Exported:
    return [(id_, v, m, c) for id_, (v, m, c) in sorted(src.live.items())]


def _merge_in(dest: OracleIndex, items: Exported, offset: int) -> int:
    applied = 0
    for pos, (id_, vec, meta, clock) in enumerate(items):
        if id_ in dest.live:
            continue
        new = (clock[0], offset, pos)
        cur = dest.tomb.get(id_)
        if cur is not None and new <= cur:
            continue
        dest.live[id_] = (vec, meta or None, new)
        dest.tomb.pop(id_, None)
        applied += 1
    return applied


def _clear(src: OracleIndex, items: Exported, offset: int) -> None:
    for pos, (id_, _, _, clock) in enumerate(items):
        if id_ in src.live and src.live[id_][2] == clock:
            del src.live[id_]
            src.tomb[id_] = (clock[0], offset, pos)


def _genuine(rec: Any, body: dict[str, Any], auth: ProtocolAuth) -> bool:
    """False for a merge_in/merge_done without the workers' MAC, or whose ids do not
    derive from a merge record."""
    op = body.get("op")
    if op in ("merge_in", "merge_done"):
        try:
            auth.verify(rec.key, rec.value, list(rec.headers or ()), op)
        except LhvError:
            return False
    if op == "merge_in":
        p, o = body["origin_partition"], body["origin_offset"]
    elif op == "merge_done":
        p, _, o = body["merge_id"].removeprefix("m").partition("-")
        if not (p.isdigit() and o.isdigit()) or int(p) != rec.partition:
            return False
        p, o = int(p), int(o)
    else:
        return True
    return bool(
        body["merge_id"] == f"m{p}-{o}"
        and body["export"].endswith(f"/exports/{p:05d}/{o:020d}.lhv")
    )


class MergeOracle:
    """Plain-dict state of every index after the given command records."""

    def __init__(self, partitions: int, auth: ProtocolAuth) -> None:
        self.partitions = partitions
        self.auth = auth
        self.state: dict[str, OracleIndex] = {}
        self.exports: dict[str, tuple[dict[str, Any], Exported]] = {}
        self.clear: dict[str, bool] = {}
        """merge id -> clear_source of its merge record"""
        self.merged: set[str] = set()
        self.failed: set[str] = set()
        self.finished: set[str] = set()

    def run(self, records: Iterable[Any]) -> dict[str, OracleIndex]:
        """Apply records of all partitions: each partition in offset order, and a protocol
        step only after the step it answers (as the workers do)."""
        queues: dict[int, deque[Any]] = {}
        for rec in sorted(records, key=lambda r: (r.partition, r.offset)):
            queues.setdefault(rec.partition, deque()).append(rec)
        while any(queues.values()):
            progressed = False
            for q in queues.values():
                while q and self._ready(q[0]):
                    self._apply(q.popleft())
                    progressed = True
            assert progressed, "merge steps wait on each other: the log is inconsistent"
        return self.state

    def _ready(self, rec: Any) -> bool:
        body = orjson.loads(rec.value)
        if not _genuine(rec, body, self.auth):
            return True
        if body.get("op") == "merge_in":
            return body["merge_id"] in self.exports
        if body.get("op") == "merge_done":
            return body["merge_id"] in self.merged | self.failed
        return True

    def _apply(self, rec: Any) -> None:
        body = orjson.loads(rec.value)
        if not _genuine(rec, body, self.auth):
            return  # the worker rejects forged records, and records naming other objects
        name = body.get("index")
        op = body.get("op")
        idx = self.state.get(name)
        if op == "create":
            if idx is None:
                params = {k: v for k, v in body.items() if k not in ("op", "index", "request_id")}
                self.state[name] = OracleIndex(params)
        elif op == "drop":
            self.state.pop(name, None)
        elif op == "add" and idx is not None:
            idx.add(body, rec.offset)
        elif op == "delete" and idx is not None:
            idx.delete(body, rec.offset)
        elif op == "merge" and idx is not None and body["dest"] != name:
            items = _exported(idx)
            dest_name = body["dest"]
            if home_partition(dest_name.encode(), self.partitions) == rec.partition:
                dest = self.state.get(dest_name)
                if dest is not None and _compatible(idx, dest):
                    _merge_in(dest, items, rec.offset)
                    if body.get("clear_source"):
                        _clear(idx, items, rec.offset)
            else:
                self.exports[f"m{rec.partition}-{rec.offset}"] = (dict(idx.params), items)
                self.clear[f"m{rec.partition}-{rec.offset}"] = bool(body.get("clear_source"))
        elif op == "merge_in":
            mid = body["merge_id"]
            if mid in self.merged or mid in self.failed:
                return
            params, items = self.exports[mid]
            dest = self.state.get(name)
            if dest is None or not _compatible(OracleIndex(params), dest):
                self.failed.add(mid)
                return
            self.merged.add(mid)
            _merge_in(dest, items, rec.offset)
        elif op == "merge_done":
            mid = body["merge_id"]
            if mid in self.finished or body.get("error") is not None:
                return
            self.finished.add(mid)
            if self.clear[mid] and idx is not None:
                _clear(idx, self.exports[mid][1], rec.offset)
