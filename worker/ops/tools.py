"""Operator tools over checkpoints and the commands topic: `lhv snapshot` and `lhv replay`.

    lhv snapshot ls [--json]              manifests per partition, snapshots per index
                                          (base, delta 1, delta 2, ...)
    lhv snapshot inspect KEY|INDEX        one snapshot's envelope (by key, or the base the
                                          manifests name for INDEX, with its deltas' keys)
    lhv snapshot verify                   every base and delta a manifest names: size,
                                          checksums, source offset, the base's graph loads
                                          with the ids of its envelope, the chain restores
    lhv replay --verify                   rebuild every partition from the commands topic up
                                          to its manifest's offset, compare with the state
                                          its base and deltas restore to

Settings come from the `LHV_*` variables (`WorkerConfig.from_env`): the S3 bucket and
prefix, the commands topic, Kafka. The tools only read: nothing is written to S3 or Kafka,
and no consumer group is joined.

`replay --verify` applies records with the worker's own `apply_records` on fresh
`Partition`s, so it checks the checkpoints against the log, not the code against itself:
a snapshot that was rewritten, or a worker that applied a record wrongly, shows up as the
index and the ids whose state differs. Imports are replayed from their source objects as
they are now in S3, through the same allow-list and bounds as the worker (an index whose
import source is gone is reported as not replayable), and merges like the worker applies
them: a `merge_in` or `merge_done` whose MAC does not verify with the workers' internal
key (read from S3, or `LHV_INTERNAL_KEY`; never created here) is rejected as the worker
rejects it. The export object of a merge across partitions
is gone once the merge completes, so the source partition's rebuild makes it again and
hands it to the destination's in memory (`_Replay`); only when the source's log can no
longer be rebuilt is the destination index reported as not replayable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from lhv_index import Frame, Index, IndexParams, read_delta, read_frame, read_snapshot
from lhv_index.errors import Internal, InvalidRequest, LhvError, SnapshotError
from worker.kafka.errors import map_kafka_errors
from worker.service.apply import Outcome, apply_records, decode_records
from worker.service.catalog import catalog_to_wire
from worker.service.config import WorkerConfig
from worker.service.importsource import SourcePolicy, read_object
from worker.service.merge import (
    MergeResult,
    apply_import,
    check_merge_done,
    check_merge_in,
    export_params,
    export_source,
    finish_merge,
    finish_merge_shard,
    home_merge_in,
    merge_locally,
    merges_locally,
    receive_export,
    validate_import,
)
from worker.service.partition import Partition
from worker.service.protocol_auth import ProtocolAuth, load_protocol_auth
from worker.storage.blobstore import BlobNotFound, BlobStore, BlobStoreError, S3BlobStore
from worker.storage.snapshots import IndexEntry, Manifest, Segment, SnapshotStore
from worker.wire.commands import ImportCommand, MergeCommand, MergeDoneCommand, MergeInCommand

__all__ = [
    "IndexDiff",
    "PartitionListing",
    "Problem",
    "ReplayReport",
    "VerifyReport",
    "envelope_ids",
    "inspect_snapshot",
    "list_checkpoints",
    "replay_verify",
    "run_replay",
    "run_snapshot",
    "verify_snapshots",
]

log = logging.getLogger(__name__)

#: ids printed per differing index before "... and N more"
MAX_IDS_SHOWN = 20
#: records applied per `apply_records` call while replaying
REPLAY_BATCH = 5_000
#: envelope fields of the older formats that hold one entry per item (summarized)
_BULKY = ("IDs", "metadata", "clocks", "tombstones")
_SNAPSHOT_KEY = re.compile(r"(\d{5})/snapshots/([^/]+)/([^/]+\.lhv)")
_MANIFEST_KEY = re.compile(r"(\d{5})/manifest\.json")


# -- the frame ------------------------------------------------------------------------------


def envelope_ids(data: bytes, frame: Frame) -> list[str]:
    """The live ids the object declares, in its own order.

    v3: the `ids` sections; v2: the non-null `IDs`; v1: the keys of `metadata` (v1 writers
    left out ids without metadata, a documented limitation of that format).
    """
    env = frame.envelope
    if frame.format == 3:
        lens_s, blob_s = frame.section("ids.len"), frame.section("ids.utf8")
        if lens_s is None or blob_s is None:
            raise SnapshotError("snapshot lacks its ids sections")
        lens = np.frombuffer(data, dtype="<u4", count=lens_s.length // 4, offset=lens_s.start)
        blob = data[blob_s.start : blob_s.start + blob_s.length]
        ends = np.cumsum(lens, dtype=np.int64).tolist()
        if (ends[-1] if ends else 0) != len(blob):
            raise SnapshotError("ids sections do not match their lengths")
        starts = [0, *ends[:-1]] if ends else []  # an empty index has no ids
        return [blob[a:b].decode("utf-8") for a, b in zip(starts, ends, strict=True)]
    if frame.format == 2:
        return [i for i in env.get("IDs") or [] if i is not None]
    return list((env.get("metadata") or {}).keys())


def _summary(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope with per-item fields of older formats replaced by their sizes."""
    out = dict(envelope)
    for key in _BULKY:
        value = out.get(key)
        if isinstance(value, list | dict):
            out[key] = f"<{len(value)} entries>"
    return out


# -- listing --------------------------------------------------------------------------------


@dataclass(slots=True)
class PartitionListing:
    """What S3 holds for one partition: its manifest and every snapshot object."""

    partition: int
    manifest: Manifest | None = None
    objects: dict[str, list[str]] = field(default_factory=dict)
    """index -> snapshot keys under the partition, named by the manifest or not"""


class _Checkpoints:
    """Read-only access to one topic's checkpoints."""

    def __init__(self, blobs: BlobStore, topic: str) -> None:
        self.blobs = blobs
        self.topic = topic
        self.store = SnapshotStore(blobs, topic=topic, worker_id="lhv-tools")
        # the store's layout: partitions/<topic>/<p:05d>/manifest.json
        self.base = self.store.manifest_key(0).rsplit("/", 2)[0] + "/"

    async def listing(self) -> list[PartitionListing]:
        parts: dict[int, PartitionListing] = {}
        for key in sorted(await self.blobs.list(self.base)):
            rel = key[len(self.base) :]
            if m := _MANIFEST_KEY.fullmatch(rel):
                p = int(m.group(1))
                parts.setdefault(p, PartitionListing(p))
            elif m := _SNAPSHOT_KEY.fullmatch(rel):
                p = int(m.group(1))
                listing = parts.setdefault(p, PartitionListing(p))
                listing.objects.setdefault(m.group(2), []).append(key)
        for p, listing in parts.items():
            listing.manifest, _ = await self.store.read_manifest(p)
        return [parts[p] for p in sorted(parts)]

    async def named(
        self,
        partitions: Iterable[int] | None = None,
        listings: list[PartitionListing] | None = None,
    ) -> list[tuple[int, str, IndexEntry, Manifest]]:
        """(partition, index, entry, manifest) of every snapshot a manifest names (in
        `listings`, when the caller has read them already)."""
        out = []
        wanted = set(partitions) if partitions is not None else None
        for listing in listings if listings is not None else await self.listing():
            if listing.manifest is None or (wanted is not None and listing.partition not in wanted):
                continue
            for name, entry in sorted(listing.manifest.indexes.items()):
                out.append((listing.partition, name, entry, listing.manifest))
        return out


async def list_checkpoints(blobs: BlobStore, topic: str) -> list[PartitionListing]:
    """Manifests and snapshot objects of every partition of `topic` that has any."""
    return await _Checkpoints(blobs, topic).listing()


async def inspect_snapshot(blobs: BlobStore, topic: str, target: str) -> dict[str, Any]:
    """One snapshot's envelope, sections and size. `target`: a key, or an index name whose
    snapshot the manifests name.

    Raises:
        BlobNotFound: no such object, or no manifest names the index.
        SnapshotError: the object is not an LHV1 snapshot.
    """
    cps = _Checkpoints(blobs, topic)
    key = target
    named_by = None
    if not target.endswith(".lhv"):
        for p, name, entry, manifest in await cps.named():
            if name == target:
                key = entry.key
                named_by = {
                    "partition": p,
                    "generation": manifest.generation,
                    "deltas": [d.key for d in entry.deltas],
                }
                break
        else:
            for listing in await cps.listing():
                kind_of = listing.manifest.catalog.get(target) if listing.manifest else None
                if kind_of is not None and kind_of.get("kind") == "sharded":
                    raise BlobNotFound(
                        f"{target!r} is a sharded index of {kind_of['shards']} shards: inspect "
                        f"its members {target}#0 .. {target}#{int(kind_of['shards']) - 1}",
                        key=target,
                    )
                if kind_of is not None:
                    raise BlobNotFound(
                        f"{target!r} is an alias of {kind_of.get('target')!r}: inspect that",
                        key=target,
                    )
            raise BlobNotFound(f"no manifest of {topic} names an index {target!r}", key=target)
    data, etag = await blobs.get(key)
    frame = read_frame(data, verify=False)
    out = {
        "key": key,
        "etag": etag,
        "bytes": len(data),
        "envelope_bytes": frame.envelope_bytes,
        "envelope": _summary(frame.envelope),
        "sections": [
            {"name": s.name, "start": s.start, "length": s.length} for s in frame.sections
        ],
    }
    if named_by is not None:
        out["manifest"] = named_by
    return out


# -- verify ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    partition: int
    index: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"partition {self.partition} index {self.index!r} ({self.key}): {self.message}"


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    absent: list[int] = field(default_factory=list)
    """partitions asked for by number that have no manifest: nothing there was checked"""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.absent


async def verify_snapshots(
    blobs: BlobStore, topic: str, *, partitions: Iterable[int] | None = None
) -> VerifyReport:
    """Check every snapshot the manifests name: it exists with the size the manifest
    says, its sections' checksums hold, it loads (graph included) as the index the manifest
    names, with the parameters and source offset the manifest says, and the loaded index
    holds exactly the ids its envelope declares and answers a search with them.
    A partition asked for in `partitions` that has no manifest is reported `absent`."""
    report = VerifyReport()
    cps = _Checkpoints(blobs, topic)
    listings = await cps.listing()
    if partitions is not None:
        partitions = set(partitions)
        have = {cp.partition for cp in listings if cp.manifest is not None}
        report.absent = sorted(partitions - have)
    for p, name, entry, manifest in await cps.named(partitions, listings):
        before = len(report.problems)
        for segment in (entry.base, *entry.deltas):
            report.checked += 1
            try:
                data, _ = await blobs.get(segment.key)
            except BlobNotFound:
                report.problems.append(Problem(p, name, segment.key, "the object is missing"))
                continue
            check = _verify_one if segment.key == entry.key else _verify_delta
            messages = await asyncio.to_thread(check, data, name, entry, segment, manifest)
            report.problems.extend(Problem(p, name, segment.key, m) for m in messages)
        if entry.deltas and len(report.problems) == before:
            last = entry.deltas[-1].key
            try:  # the chain as a restore reads it: base, then every delta in order
                index = await cps.store.load_index(name, entry)
            except LhvError as exc:
                report.problems.append(Problem(p, name, last, f"the chain does not load: {exc}"))
                continue
            messages = await asyncio.to_thread(_check_chain, index)
            report.problems.extend(Problem(p, name, last, m) for m in messages)
    return report


def _frame_problems(data: bytes, size: int, crc32: int | None) -> tuple[Frame | None, list[str]]:
    """The frame of one object the manifest names, and what is wrong with its size, its
    crc32 (when the manifest recorded one) or its sections; no frame when none reads."""
    problems = []
    if len(data) != size:
        problems.append(f"{len(data)} bytes, the manifest says {size}")
    elif crc32 is not None and zlib.crc32(data) != crc32:
        problems.append(f"crc32 {zlib.crc32(data):#010x}, the manifest says {crc32:#010x}")
    try:
        frame = read_frame(data, verify=False)
    except SnapshotError as exc:
        return None, [*problems, str(exc)]
    return frame, problems + frame.problems(data)


def _source_problems(source: Mapping[str, Any], manifest: Manifest, offset: int) -> list[str]:
    """The source an object records against the one the manifest names for it."""
    want = {"topic": manifest.topic, "partition": manifest.partition, "offset": offset}
    got = {k: source.get(k) for k in want}
    return [] if got == want else [f"source {got} differs from the manifest's {want}"]


def _verify_one(
    data: bytes, name: str, entry: IndexEntry, segment: Segment, manifest: Manifest
) -> list[str]:
    frame, problems = _frame_problems(data, entry.bytes, None)
    if frame is None or problems:
        return problems
    try:
        index, source = read_snapshot(data, expect=IndexParams.from_dict(entry.params))
    except LhvError as exc:
        return [f"does not load: {exc}"]
    if index.name != name:
        problems.append(f"holds index {index.name!r}")
    if index.params.to_dict() != entry.params:
        problems.append(f"params {index.params.to_dict()} differ from the manifest's")
    problems += _source_problems(source, manifest, entry.offset)
    try:
        ids = envelope_ids(data, frame)
    except (SnapshotError, UnicodeDecodeError, ValueError) as exc:
        return [*problems, f"envelope ids unreadable: {exc}"]
    problems += _check_ids(index, ids, frame.envelope)
    return problems


def _verify_delta(
    data: bytes, name: str, entry: IndexEntry, segment: Segment, manifest: Manifest
) -> list[str]:
    """One delta of a chain: the size and crc32 the manifest recorded, sound sections, a
    delta of this index with the manifest's parameters and the segment's source offset."""
    frame, problems = _frame_problems(data, segment.bytes, segment.crc32)
    if frame is None or problems:
        return problems
    try:
        delta, source = read_delta(data, expect=IndexParams.from_dict(entry.params))
    except LhvError as exc:
        return [f"does not load: {exc}"]
    if delta.name != name:
        problems.append(f"holds a delta of index {delta.name!r}")
    return problems + _source_problems(source, manifest, segment.offset)


def _check_chain(index: Index) -> list[str]:
    """The index a base and its deltas restore to answers a search with its own ids."""
    ids = [item.id for item in index.live_items()]
    return _check_ids(index, ids, {})


def _check_ids(index: Index, ids: list[str], envelope: Mapping[str, Any]) -> list[str]:
    problems = []
    count = envelope.get("count")
    if envelope.get("format") == 3 and count != len(ids):
        problems.append(f"envelope count {count} but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        problems.append("envelope ids repeat")
    live = index.get(ids, include_vectors=False, include_metadata=False)
    if len(live) != len(ids) or len(index) != len(ids):
        missing = sorted(set(ids) - {it.id for it in live})
        problems.append(
            f"the loaded index holds {len(index)} live ids, the envelope {len(ids)}"
            + (f"; not loaded: {_ids_text(missing)}" if missing else "")
        )
        return problems
    if ids:  # the graph answers, with ids the envelope declares
        sample = index.get(ids[:: max(1, len(ids) // 8)][:8], include_metadata=False)
        vectors = np.stack([np.asarray(it.vector, dtype=np.float32) for it in sample])
        hits = index.search(vectors, min(3, len(ids)))
        known = set(ids)
        strays = sorted({h.id for row in hits for h in row} - known)
        if strays or any(not row for row in hits):
            problems.append(f"search returned ids not in the envelope: {_ids_text(strays)}")
    return problems


# -- replay ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexDiff:
    partition: int
    index: str
    problem: str
    ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        ids = f": {_ids_text(self.ids)}" if self.ids else ""
        return f"partition {self.partition} index {self.index!r}: {self.problem}{ids}"


@dataclass(slots=True)
class ReplayReport:
    covered: dict[int, int] = field(default_factory=dict)
    """partition -> the manifest offset replayed up to (-1: nothing to replay)"""
    records: int = 0
    compared: list[str] = field(default_factory=list)
    diffs: list[IndexDiff] = field(default_factory=list)
    not_replayable: list[str] = field(default_factory=list)
    """indexes touched by imports whose source is gone, or by merges from a partition
    that cannot be rebuilt, whose rebuild without them differs from their checkpoint (or
    is missing on one side): not compared"""
    errors: list[str] = field(default_factory=list)
    """partitions that could not be checked (log truncated, unreadable manifest, ...)"""

    @property
    def consistent(self) -> bool:
        return not self.diffs and not self.errors


async def replay_verify(
    config: WorkerConfig,
    blobs: BlobStore,
    *,
    partitions: Iterable[int] | None = None,
    timeout_s: float = 600.0,
) -> ReplayReport:
    """Rebuild each partition from the commands topic up to its manifest's offset and
    compare every index with the snapshot the manifest names (`Index.logical_state()`).

    Partitions are rebuilt one after another, so memory holds one partition's indexes
    twice at most, except where a merge across partitions links them: the destination's
    `merge_in` waits until the source's rebuild has passed the `merge` record and handed
    over its export (in memory; the worker's S3 object is gone once the merge completed),
    starting that rebuild early, or a second one past the source's checkpoint, when
    needed. `timeout_s` bounds reading one partition (not counting those waits).
    """
    auth = await load_protocol_auth(
        blobs, config.topics.commands, config.internal_key, create=False
    )
    replay = _Replay(config, _Checkpoints(blobs, config.topics.commands), timeout_s, auth)
    numbers = await _partitions_of(config, config.topics.commands)
    if not numbers:
        replay.report.errors.append(f"topic {config.topics.commands!r} does not exist")
        return replay.report
    unknown = sorted(set(partitions or ()) - set(numbers))
    if unknown:
        replay.report.errors.append(
            f"--partition {', '.join(map(str, unknown))}: topic {config.topics.commands!r} "
            f"has partitions 0 to {len(numbers) - 1}"
        )
        return replay.report
    await replay.run(numbers, set(partitions) if partitions is not None else set(numbers))
    return replay.report


async def _partitions_of(config: WorkerConfig, topic: str) -> list[int]:
    """The partitions of `topic` (empty when it does not exist), from a metadata request
    of a producer that sends nothing: the consumer has no public way to ask."""
    producer = AIOKafkaProducer(**config.kafka.client_kwargs())
    with map_kafka_errors(config.kafka):
        await producer.start()
    try:
        async with asyncio.timeout(30):
            return sorted(await producer.partitions_for(topic))
    except (TimeoutError, KafkaError):
        return []
    finally:
        await producer.stop()


class _SourceGone(InvalidRequest):
    """An import's source object is no longer in S3: its index cannot be rebuilt."""


class _NotReplayable(Internal):
    """A `merge_in` whose export could not be rebuilt (its source partition's log is
    truncated, or it was not read in time)."""


#: `_Run.received` value of an export whose source partition could not be rebuilt
_UNAVAILABLE = object()


@dataclass(slots=True, eq=False)
class _Run:
    """One rebuild of a partition, from the start of its log up to `target`."""

    partition: int
    target: int
    verify: bool
    """the rebuild compared with the checkpoint (else one made for a merge's export)"""
    reached: int = -1
    """the last offset applied"""
    done: bool = False
    received: dict[tuple[int, int], Any] = field(default_factory=dict)
    """(source partition, merge offset) -> export bytes, None (no export there) or
    `_UNAVAILABLE`, fetched before the `merge_in` that names it is applied"""
    merged_in: set[tuple[str, str]] = field(default_factory=set)
    """(merge id, destination) of each first `merge_in` this run applied (later ones are
    duplicates; members of one sharded destination may share a partition)"""


class _Replay:
    """The rebuilds of one `replay_verify`, and the exports they hand each other."""

    def __init__(
        self, config: WorkerConfig, cps: _Checkpoints, timeout_s: float, auth: ProtocolAuth
    ) -> None:
        self.config = config
        self.auth = auth
        self.sources = SourcePolicy(config.imports, config.s3)
        self.cps = cps
        self.timeout_s = timeout_s
        self.report = ReplayReport()
        self._partitions: list[int] = []
        self._manifests: dict[int, Manifest | None] = {}
        self._main: dict[int, asyncio.Task[None]] = {}
        self._helpers: list[asyncio.Task[Any]] = []
        self._runs: dict[int, list[_Run]] = {}
        self._exports: dict[tuple[int, int], bytes] = {}
        """(source partition, merge offset) -> the export of a merge across partitions,
        set from the apply thread when a rebuild passes the merge record"""
        self._progress = asyncio.Condition()

    async def run(self, numbers: list[int], wanted: set[int]) -> None:
        self._partitions = numbers
        for p in numbers:
            if p not in wanted:
                continue
            try:
                self._manifests[p], _ = await self.cps.store.read_manifest(p)
            except LhvError as exc:
                self.report.errors.append(f"partition {p}: manifest unreadable: {exc}")
        try:
            for p in sorted(self._manifests):
                await self._verify_task(p)
        finally:
            for task in (*self._main.values(), *self._helpers):
                task.cancel()
            await asyncio.gather(*self._main.values(), *self._helpers, return_exceptions=True)
        self.report.compared.sort()
        self.report.not_replayable.sort()

    def _verify_task(self, p: int) -> asyncio.Task[None]:
        if p not in self._main:
            manifest = self._manifests[p]
            run = _Run(p, manifest.offset if manifest is not None else -1, verify=True)
            self._runs.setdefault(p, []).append(run)
            self._main[p] = asyncio.create_task(self._verify(run, manifest))
        return self._main[p]

    async def _verify(self, run: _Run, manifest: Manifest | None) -> None:
        p, report = run.partition, self.report
        if manifest is None:
            report.covered[p] = -1
            await self._finish(run)
            return
        report.covered[p] = manifest.offset
        partition = Partition(number=p)
        skipped: set[str] = set()
        error = await self._rebuild(run, partition, skipped)
        if error is not None:
            report.errors.append(f"partition {p}: {error}")
            return
        await _compare(self.cps, p, manifest, partition.indexes, skipped, report)
        report.diffs.extend(_sharded_diffs(p, manifest, partition))

    async def _rebuild(self, run: _Run, partition: Partition, skipped: set[str]) -> str | None:
        """Apply the log of `run.partition` up to `run.target` to `partition`; returns
        why it could not (None: done)."""
        try:
            return await self._read(run, partition, skipped)
        finally:
            await self._finish(run)

    async def _finish(self, run: _Run) -> None:
        async with self._progress:
            run.done = True
            self._progress.notify_all()

    async def _read(self, run: _Run, partition: Partition, skipped: set[str]) -> str | None:
        p, upto = run.partition, run.target
        if upto < 0:
            return None
        tp = TopicPartition(self.cps.topic, p)
        consumer = AIOKafkaConsumer(
            **self.config.kafka.consumer_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max(self.config.limits.max_message_bytes, 1 << 20),
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            begin = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            if begin > 0:
                return (
                    f"the log starts at offset {begin}: records before it are gone, "
                    "so the checkpoint cannot be rebuilt"
                )
            if upto >= end:
                return f"the manifest covers offset {upto} but the log ends at {end - 1}"
            await consumer.seek_to_beginning(tp)
            deadline = time.monotonic() + self.timeout_s
            seen = -1
            while seen < upto:
                if time.monotonic() > deadline:
                    return f"read up to {seen} of {upto} in {self.timeout_s:.0f} s"
                data = await consumer.getmany(tp, timeout_ms=1000, max_records=REPLAY_BATCH)
                fetched = data.get(tp, [])
                # the position passes offsets that hold no record too (transaction
                # markers, aborted transactions' records)
                seen = await consumer.position(tp) - 1
                records = [r for r in fetched if r.offset <= upto]
                if records:
                    deadline += await self._apply(run, partition, records, skipped)
        finally:
            await consumer.stop()
        return None

    async def _apply(
        self, run: _Run, partition: Partition, records: list[Any], skipped: set[str]
    ) -> float:
        """Apply `records` in runs that end before each `merge_in`, whose export is
        fetched first; returns the seconds spent waiting for exports."""
        decoded = await asyncio.to_thread(
            decode_records,
            records,
            partition=partition.number,
            num_partitions=self.num_partitions,
            limits=self.config.limits,
        )
        barriers = _Barriers(self, run, asyncio.get_running_loop())
        waited = 0.0
        start = 0
        while start < len(records):
            stop = start + 1
            while stop < len(records) and not isinstance(decoded[stop].command, MergeInCommand):
                stop += 1
            first = decoded[start].command
            if isinstance(first, MergeInCommand):
                t0 = time.monotonic()
                source = (first.origin_partition, first.origin_offset)
                run.received[source] = await self._export(*source)
                waited += time.monotonic() - t0
            outcomes = await asyncio.to_thread(
                apply_records,
                partition,
                records[start:stop],
                num_partitions=self.num_partitions,
                limits=self.config.limits,
                index_limits=self.config.index_limits,
                max_indexes=self.config.max_indexes_per_partition,
                barrier=barriers,
                decoded=decoded[start:stop],
            )
            if run.verify:
                self.report.records += stop - start
            for out in outcomes:
                if isinstance(out.error, _SourceGone | _NotReplayable):
                    skipped.update(_touched(out.command, out.index))
            async with self._progress:
                run.reached = records[stop - 1].offset
                self._progress.notify_all()
            start = stop
        return waited

    async def _export(self, q: int, offset: int) -> Any:
        """The export of the merge record at (`q`, `offset`) as a rebuild of `q` makes it:
        bytes, None when that record made no export, or `_UNAVAILABLE`. Starts `q`'s
        rebuild, or one that goes further, when none will reach `offset`."""
        key = (q, offset)
        async with self._progress:
            while True:
                if key in self._exports:
                    return self._exports[key]
                if q not in self._partitions:
                    return None  # no such partition: nothing was exported there
                runs = self._runs.get(q, [])
                if any(r.reached >= offset for r in runs):
                    return None
                if not any(not r.done and r.target >= offset for r in runs):
                    if any(r.target >= offset for r in runs):
                        return _UNAVAILABLE  # a rebuild meant to reach it failed
                    self._start_for(q, offset)
                await self._progress.wait()

    def _start_for(self, q: int, offset: int) -> None:
        manifest = self._manifests.get(q)
        if q not in self._main and manifest is not None and manifest.offset >= offset:
            self._verify_task(q)  # its turn would come anyway: start it now
            return
        run = _Run(q, offset, verify=False)
        self._runs.setdefault(q, []).append(run)
        log.info("replay: rebuilding partition %d up to %d for a merge's export", q, offset)
        self._helpers.append(asyncio.create_task(self._help(run)))

    async def _help(self, run: _Run) -> None:
        try:
            error = await self._rebuild(run, Partition(number=run.partition), set())
        except Exception:
            log.exception("replay: rebuilding partition %d for an export failed", run.partition)
            return
        if error is not None:
            log.warning("replay: partition %d cannot be rebuilt: %s", run.partition, error)

    @property
    def num_partitions(self) -> int:
        return len(self._partitions)

    def register_export(self, p: int, offset: int, data: bytes) -> None:
        self._exports[(p, offset)] = data

    def export_of(self, p: int, offset: int) -> bytes | None:
        return self._exports.get((p, offset))


class _Barriers:
    """The replay's barrier steps (`BarrierSteps`, dispatched by `run_barrier` as in the
    worker): `import` records from their S3 objects (read on the tool's
    loop from the apply thread), merges within one partition as the worker applies them,
    and the three steps of a merge across partitions with the export handed over in
    memory (`_Replay`)."""

    def __init__(self, replay: _Replay, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        self._replay = replay
        self._run = run
        self._config = replay.config
        self._loop = loop

    @property
    def auth(self) -> ProtocolAuth:
        return self._replay.auth

    def import_(self, partition: Partition, cmd: ImportCommand, out: Outcome) -> None:
        apply_import(partition, cmd, out, self._fetch, self._config.imports)

    def check_import(self, cmd: ImportCommand, index: Index, offset: int) -> None:
        validate_import(cmd, index, self._fetch, self._config.imports, offset=offset)

    def merge(self, partition: Partition, cmd: MergeCommand, out: Outcome) -> None:
        if merges_locally(partition, cmd, self._replay.num_partitions):
            merge_locally(partition, cmd, out)
            return
        data, _ = export_source(partition, cmd, self._config.topics.commands, out)
        self._replay.register_export(partition.number, out.offset, data)
        out.reply_to = None

    def merge_done(self, partition: Partition, cmd: MergeDoneCommand, out: Outcome) -> None:
        # As the worker: verified, flags from the export the source's rebuild made; the
        # destination's marker is gone, so its result comes from the record, which the
        # destination produced from that marker.
        self._replay.auth.verify(out.key, out.value, out.headers, "merge_done")
        origin = check_merge_done(self._config.topics.commands, partition.number, cmd)
        out.op = "merge"
        export = self._replay.export_of(partition.number, origin)
        if export is None:
            return
        result = MergeResult(cmd.applied, cmd.skipped, cmd.error)
        if cmd.dest_shards is not None:
            # one shard of a sharded destination: clearing it again finds nothing
            finish_merge_shard(partition, cmd, out, export, result)
            return
        finish_merge(partition, cmd, out, export, result)

    def merge_in(self, partition: Partition, command: MergeInCommand, outcome: Outcome) -> None:
        self._replay.auth.verify(outcome.key, outcome.value, outcome.headers, "merge_in")
        check_merge_in(self._config.topics.commands, command)
        if (command.merge_id, command.index) in self._run.merged_in:
            outcome.skipped = 1  # the worker's marker names an earlier merge_in
            return
        source = (command.origin_partition, command.origin_offset)
        data = self._run.received.get(source, _UNAVAILABLE)
        entry = partition.catalog.get(command.index)
        if entry is not None:  # the home of a sharded destination (or an alias)
            self._run.merged_in.add((command.merge_id, command.index))
            if data is _UNAVAILABLE and (command.dim is None or command.space is None):
                raise _NotReplayable(f"merge_in: the export of {source} could not be rebuilt")
            params = None if data is None or data is _UNAVAILABLE else export_params(data)
            home_merge_in(
                partition,
                command,
                outcome,
                entry,
                auth=None,
                num_partitions=self._replay.num_partitions,
                max_record_bytes=self._config.limits.max_message_bytes,
                source_params=lambda: params,
            )
            return
        if data is _UNAVAILABLE:
            raise _NotReplayable(
                f"merge_in: the export of partition {command.origin_partition} offset "
                f"{command.origin_offset} could not be rebuilt"
            )
        if data is None:
            outcome.skipped = 1  # no export: the worker skips it too
            return
        self._run.merged_in.add((command.merge_id, command.index))
        receive_export(partition, command, outcome, data)

    def _fetch(self, uri: str, field: str) -> bytes:
        """An import's object, refused and bounded as the worker does."""
        bucket, key = self._replay.sources.check(uri, field)
        future = asyncio.run_coroutine_threadsafe(self._get(bucket, key), self._loop)
        data = future.result(self._config.s3.timeout_s * self._config.s3.max_attempts + 60)
        if data is None:
            raise _SourceGone(f"import: {field} {uri} does not exist any more")
        return data

    async def _get(self, bucket: str, key: str) -> bytes | None:
        return await read_object(
            self._config.s3, bucket, key, self._config.imports.max_object_bytes
        )


def _touched(command: Any, index: str) -> set[str]:
    names = {index} if index else set()
    for attr in ("index", "dest", "source_index"):
        value = getattr(command, attr, None)
        if isinstance(value, str):
            names.add(value)
    return names


async def _compare(
    cps: _Checkpoints,
    p: int,
    manifest: Manifest,
    rebuilt: Mapping[str, Index],
    skipped: set[str],
    report: ReplayReport,
) -> None:
    """Compare each index rebuilt from partition `p`'s log with its snapshot.

    An index in `skipped` (a command on it could not be replayed) is still compared: when
    the rebuild without that command equals the snapshot, the command changed nothing
    then either (an import refused for the same missing source), and the index counts as
    compared; when it differs, or is missing from the manifest or from the rebuild, it is
    `not_replayable`, not a difference. A snapshot that does not load is a difference
    either way.
    """
    for name in sorted(set(rebuilt) | set(manifest.indexes)):
        entry = manifest.indexes.get(name)
        if entry is None or name not in rebuilt:
            if name in skipped:
                report.not_replayable.append(name)
            elif entry is None:
                problem = "rebuilt from the log but not in the manifest"
                report.diffs.append(IndexDiff(p, name, problem))
            else:
                report.diffs.append(IndexDiff(p, name, "in the manifest but not in the log"))
            continue
        try:
            stored = await cps.store.load_index(name, entry)
        except LhvError as exc:
            report.diffs.append(IndexDiff(p, name, f"snapshot {entry.key} does not load: {exc}"))
            continue
        diff = await asyncio.to_thread(_state_diff, rebuilt[name], stored, entry.covered_offset)
        if diff is not None and name in skipped:
            report.not_replayable.append(name)
            continue
        report.compared.append(name)
        if diff is not None:
            report.diffs.append(IndexDiff(p, name, diff[0], tuple(diff[1])))


def _sharded_diffs(p: int, manifest: Manifest, partition: Partition) -> list[IndexDiff]:
    """What differs between the partition's sharded state rebuilt from the log (its
    catalog, the shard counts of its members, its forwarding marks) and the manifest's."""
    diffs = []
    rebuilt = catalog_to_wire(partition.catalog)
    for name in sorted(set(rebuilt) | set(manifest.catalog)):
        log_entry, stored = rebuilt.get(name), manifest.catalog.get(name)
        if log_entry != (None if stored is None else dict(stored)):
            diffs.append(
                IndexDiff(
                    p,
                    name,
                    f"catalog entry differs between the log ({log_entry}) and the manifest "
                    f"({None if stored is None else dict(stored)})",
                )
            )
    for name in sorted(set(partition.members) | set(manifest.members)):
        log_s, stored_s = partition.members.get(name), manifest.members.get(name)
        if log_s != stored_s:
            diffs.append(
                IndexDiff(
                    p,
                    name,
                    f"member of {log_s} shards in the log, of {stored_s} in the manifest",
                )
            )
    if dict(partition.forwarded) != dict(manifest.forwarded):
        diffs.append(
            IndexDiff(
                p,
                "",
                f"forwarding marks differ between the log ({dict(partition.forwarded)}) and "
                f"the manifest ({dict(manifest.forwarded)})",
            )
        )
    return diffs


def _state_diff(rebuilt: Index, stored: Index, covered: int) -> tuple[str, list[str]] | None:
    """None when both hold the same logical state, else (what differs, the ids).

    `stored` is the base and deltas of a checkpoint covering up to offset `covered`. A
    tombstone the log rebuilt but the checkpoint lacks is no difference when its offset
    is at or below `covered`: the worker dropped it under the tombstone horizon.
    """
    a, b = rebuilt.logical_state(), stored.logical_state()
    compacted = {
        i: c for i, c in a["tombstones"].items() if i not in b["tombstones"] and c.offset <= covered
    }
    if compacted:
        a["tombstones"] = {i: c for i, c in a["tombstones"].items() if i not in compacted}
    if a["live"] != b["live"]:
        ids = sorted(
            i for i in set(a["live"]) | set(b["live"]) if a["live"].get(i) != b["live"].get(i)
        )
        return "live items differ between the log and the snapshot", ids
    if a["tombstones"] != b["tombstones"]:
        ta, tb = a["tombstones"], b["tombstones"]
        ids = sorted(i for i in set(ta) | set(tb) if ta.get(i) != tb.get(i))
        return "tombstones differ between the log and the snapshot", ids
    if rebuilt.params.to_dict() != stored.params.to_dict():
        return "parameters differ between the log and the snapshot", []
    return None


def _ids_text(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_IDS_SHOWN])
    more = len(ids) - MAX_IDS_SHOWN
    return shown + (f" ... and {more} more" if more > 0 else "")


# -- the CLI --------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> WorkerConfig:
    env = dict(os.environ)
    if args.commands_topic:
        env["LHV_COMMANDS_TOPIC"] = args.commands_topic
    if args.s3_prefix is not None:
        env["LHV_S3_PREFIX"] = args.s3_prefix
    return WorkerConfig.from_env(env)


def run_snapshot(args: argparse.Namespace) -> int:
    """`lhv snapshot ls|inspect|verify`; 0 when all is well, 1 on problems."""
    config = _config(args)
    topic = config.topics.commands

    async def run() -> int:
        async with S3BlobStore(config.s3) as blobs:
            if args.snapshot_action == "ls":
                listings = await list_checkpoints(blobs, topic)
                if not listings and not args.json:
                    where = f"s3://{config.s3.bucket}/{config.s3.key_prefix}"
                    print(
                        f"no checkpoints yet for {topic} under {where}: a worker writes one "
                        "per partition after LHV_CHECKPOINT_RECORDS records or "
                        "LHV_CHECKPOINT_SECONDS seconds of changes, and when it stops"
                    )
                    return 0
                return _print_listing(listings, args.json)
            if args.snapshot_action == "inspect":
                print(json.dumps(await inspect_snapshot(blobs, topic, args.target), indent=2))
                return 0
            report = await verify_snapshots(blobs, topic, partitions=args.partition)
            if args.json:
                body = {
                    "checked": report.checked,
                    "problems": [str(p) for p in report.problems],
                    "absent_partitions": report.absent,
                }
                print(json.dumps(body, indent=2))
            else:
                for problem in report.problems:
                    print(f"BAD {problem}")
                where = f"s3://{config.s3.bucket}/{config.s3.key_prefix}"
                for p in report.absent:
                    print(
                        f"NONE partition {p}: no manifest under {where} (no checkpoint yet, "
                        f"or {topic} has no partition {p}): nothing checked"
                    )
                verdict = "ok" if report.ok else f"{len(report.problems)} problems"
                if report.absent and not report.problems:
                    verdict = f"{len(report.absent)} partitions without a manifest"
                print(f"{report.checked} snapshots checked: {verdict}")
            return 0 if report.ok else 1

    try:
        return asyncio.run(run())
    except BlobStoreError as exc:
        if not isinstance(exc, BlobNotFound) or exc.key is None:
            raise  # S3 unreachable, credentials: `lhv` says what to do, in one line
        print(f"lhv snapshot: {exc} (`lhv snapshot ls` lists what there is)", file=sys.stderr)
        return 1
    except (LhvError, SnapshotError) as exc:
        print(f"lhv snapshot: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _print_listing(listings: list[PartitionListing], as_json: bool) -> int:
    rows: list[dict[str, Any]] = []
    for listing in listings:
        m = listing.manifest
        named: dict[str, tuple[str, Segment, str]] = {}
        for name, e in m.indexes.items() if m else ():
            named[e.key] = (name, e.base, "base")
            named.update({d.key: (name, d, f"delta {i}") for i, d in enumerate(e.deltas, 1)})
        snaps: list[dict[str, Any]] = []
        for index, keys in sorted(listing.objects.items()):
            for key in keys:
                hit = named.get(key)
                snaps.append(
                    {
                        "index": index,
                        "key": key,
                        "named": hit is not None,
                        "kind": hit[2] if hit else None,
                        "offset": hit[1].offset if hit else None,
                        "bytes": hit[1].bytes if hit else None,
                    }
                )
        listed = {s["key"] for s in snaps}
        missing = [
            {"index": n, "key": k, "named": True, "kind": kind, "missing": True}
            for k, (n, _, kind) in named.items()
            if k not in listed
        ]
        rows.append(
            {
                "partition": listing.partition,
                "manifest": None
                if m is None
                else {
                    "offset": m.offset,
                    "generation": m.generation,
                    "writer": m.writer,
                    "written_at": m.written_at,
                    "indexes": len(m.indexes),
                    "catalog": {n: dict(e) for n, e in sorted(m.catalog.items())},
                    "members": dict(sorted(m.members.items())),
                },
                "snapshots": snaps + missing,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        m = row["manifest"]
        if m is None:
            print(f"partition {row['partition']}: no manifest")
        else:
            written = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m["written_at"]))
            print(
                f"partition {row['partition']}: offset {m['offset']} generation "
                f"{m['generation']} writer {m['writer']} at {written}, {m['indexes']} indexes"
            )
            for name, entry in m["catalog"].items():
                what = (
                    f"sharded, {entry['shards']} shards ({name}#0 .. {name}#{entry['shards'] - 1})"
                    if entry.get("kind") == "sharded"
                    else f"alias of {entry.get('target')!r}"
                )
                print(f"  {name:<24} {what}")
        for s in row["snapshots"]:
            if s.get("missing"):
                state = "MISSING"
            elif s["named"]:
                state = f"{s['kind']:<9} offset {s['offset']:>10} {s['bytes']:>12} B"
            else:
                state = "unreferenced (collected after the next checkpoint)"
            gen = f" gen {m['generation']} {m['writer']}" if s["named"] and m else ""
            shards = m["members"].get(s["index"]) if m else None
            member = f" (member of {shards} shards)" if shards else ""
            print(f"  {s['index']:<24} {state}{gen}{member}  {s['key']}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """`lhv replay --verify`: 0 when consistent, 1 otherwise."""
    config = _config(args)

    async def run() -> ReplayReport:
        async with S3BlobStore(config.s3) as blobs:
            return await replay_verify(
                config, blobs, partitions=args.partition, timeout_s=args.timeout
            )

    try:
        report = asyncio.run(run())
    except BlobStoreError as exc:
        if not isinstance(exc, BlobNotFound) or exc.key is None:
            raise  # S3 unreachable, credentials: `lhv` says what to do, in one line
        print(f"lhv replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except LhvError as exc:
        print(f"lhv replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        body = {
            "consistent": report.consistent,
            "covered": {str(p): o for p, o in sorted(report.covered.items())},
            "records": report.records,
            "compared": report.compared,
            "not_replayable": report.not_replayable,
            "diffs": [
                {
                    "partition": d.partition,
                    "index": d.index,
                    "problem": d.problem,
                    "ids": list(d.ids),
                }
                for d in report.diffs
            ],
            "errors": report.errors,
        }
        print(json.dumps(body, indent=2))
    else:
        for p, offset in sorted(report.covered.items()):
            what = f"replayed up to offset {offset}" if offset >= 0 else "no checkpoint yet"
            print(f"partition {p}: {what}")
        for name in report.not_replayable:
            print(
                f"index {name!r}: not compared (touched by an import whose source is gone, "
                "or by a merge from a partition that cannot be rebuilt)"
            )
        for error in report.errors:
            print(f"ERROR {error}")
        for diff in report.diffs:
            print(f"DIFFERS {diff}")
        verdict = "consistent" if report.consistent else "INCONSISTENT"
        print(
            f"{verdict}: {len(report.compared)} indexes compared, {report.records} records replayed"
        )
    return 0 if report.consistent else 1
