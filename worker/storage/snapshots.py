"""Snapshots and manifests of partitions, over a `BlobStore`.

Layout under the configured prefix, for partition p of the commands topic::

    partitions/<topic>/<p:05d>/manifest.json
    partitions/<topic>/<p:05d>/snapshots/<index>/<offset:020d>-<nonce>.lhv         a base
    partitions/<topic>/<p:05d>/snapshots/<index>/<offset:020d>-<nonce>.delta.lhv   a delta

The manifest is the truth about a partition: it names, per live index, a base snapshot
(a full LHV1 frame, `write_snapshot`) and an ordered chain of delta segments on top of it
(`write_delta`, the ids written since the previous segment), and the last command offset
they cover. Restoring an index is: its base, then each delta in order (`load_index`).

Manifest, format 2 (written when some index has deltas)::

    {"format": 2, "topic": str, "partition": int, "offset": int, "generation": int,
     "writer": str, "written_at": float,
     "indexes": {"<name>": {"params": IndexParams.to_dict(),
                            "base": {"key", "offset", "bytes", "crc32"},
                            "deltas": [{"key", "offset", "bytes", "crc32"}, ...]}}}

Format 1 (one snapshot per index) is still read, and still written when no index has a
delta, so a reader that knows only format 1 keeps reading such manifests::

    {"format": 1, ..., "indexes": {"<name>": {"key", "offset", "bytes", "params", "crc32"?}}}

Format 3 (written when the partition has sharded state) is format 2 plus the partition's
catalog, its forwarding high-water marks and the shard counts of its member indexes::

    {"format": 3, ...format 2...,
     "catalog": {"<name>": {"kind": "sharded", "shards": S, "params": {...}}
                          | {"kind": "alias", "target": "<name>"}},
     "forwarded": {"<origin partition>": [offset, part]},
     "members": {"<NAME#s>": S}}

`catalog` holds the entries whose home is this partition (a sharded index, an alias),
`forwarded` the newest origin of a forwarded record applied here, per origin partition
(exactly-once forwarding), `members` S of each member index `NAME#s` held here. Formats
1 and 2 are read as having none of them.

Per segment: `offset` is the last command offset applied to the index when it was
captured (deltas in increasing order), `bytes` the object's size and `crc32` the crc32 of
the whole object (absent in manifests written before it was recorded). The crc32 is
derived from the frame's envelope and per-section checksums (`_frame_crc32`), so neither
the writer nor the reader makes an extra pass over the bytes to get it. A reader checks
every frame (each section against its checksum) before it applies anything, so a
corrupted segment is never applied. In a chain it also requires each segment to have the
size and crc32 the manifest recorded, since a delta is only meaningful on top of the exact
objects before it; a lone base that differs from its record but is a sound frame still
loads, with a warning (as before deltas: `lhv replay --verify` then says what differs).

The manifest is written with a conditional put on the ETag the writer last saw
(create-only when there was none), so a worker that lost the partition and wakes up late
cannot overwrite the new owner's manifest: its write fails with `Fenced`. A new owner
claims the partition by rewriting the manifest with a higher `generation` before it
serves, which also fences an old owner that has not checkpointed yet.

Snapshot objects are immutable. After a manifest is written, `collect_garbage` deletes
the objects it does not name (bases and deltas alike) whose offset is below the
manifest's: objects of a later offset may belong to a checkpoint still uploading. A
reader that finds an object gone (garbage-collected after the manifest it read was
replaced) gets `SnapshotGone`: re-read the manifest and load again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, BinaryIO, TypeVar

import orjson

from lhv_index import (
    Base,
    Delta,
    Index,
    IndexParams,
    Limits,
    apply_delta,
    read_delta,
    read_snapshot,
    write_delta,
    write_snapshot,
)
from lhv_index._crc import crc32_combine
from lhv_index._frame import HEADER, MAGIC, MAX_ENVELOPE_BYTES
from lhv_index.errors import Internal, LhvError, SnapshotError
from worker._environ import _env
from worker.storage.blobstore import (
    BlobNotFound,
    BlobStore,
    PreconditionFailed,
    StoreUnavailable,
)

__all__ = [
    "DeltaPolicy",
    "Fenced",
    "IndexEntry",
    "Manifest",
    "Segment",
    "SegmentKind",
    "SnapshotGone",
    "SnapshotStore",
    "capture_in_thread",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the manifest format written when the partition has sharded state (catalog, forwarding
#: high-water marks, member indexes)
MANIFEST_FORMAT_SHARDED = 3
#: the manifest format written when some index has deltas (and no sharded state)
MANIFEST_FORMAT = 2
#: the format written when none has: readers of the one-snapshot layout read it too
MANIFEST_FORMAT_SINGLE = 1
#: snapshots at or under this size are encoded in memory; larger ones spill to a temp file
SPOOL_BYTES = 8 * 1024 * 1024
#: reads of a segment that came back shorter or longer than the manifest says, before
#: `StoreUnavailable` (the object itself has the right size: the reads were cut)
FETCH_ATTEMPTS = 3

_SEGMENT_KEY = re.compile(r"(\d{20})-[0-9a-f]+(?:\.delta)?\.lhv")


class Fenced(Internal):
    """Another worker wrote this partition's manifest since we read it: ownership is lost."""

    retriable = False


class SnapshotGone(BlobNotFound):
    """A segment the manifest names is not in the store: it was garbage-collected after
    that manifest was replaced (a restore racing a checkpoint of the new owner). Re-read
    the manifest and load again; if the manifest still names the key, the checkpoint is
    damaged."""

    retriable = True


class SegmentKind(StrEnum):
    """What the next snapshot of an index should be (`DeltaPolicy.next_kind`)."""

    BASE = "base"
    DELTA = "delta"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaPolicy:
    """When an index's chain of deltas is replaced by a new base.

    A longer chain makes each checkpoint cheaper (a delta costs what changed) and each
    restore dearer (every delta is read and applied after the base, and ids written many
    times are stored many times). The chain is cut by a new base as soon as either bound
    is passed.
    """

    max_delta_share: float = 0.5
    """a new base once the deltas' bytes pass this share of the base's bytes
    (`LHV_MAX_DELTA_SHARE`)"""
    max_deltas: int = 16
    """a new base once the chain holds this many deltas; 0: every snapshot is a base
    (`LHV_MAX_DELTAS`)"""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_delta_share <= 100.0:
            raise ValueError("DeltaPolicy.max_delta_share must be between 0 and 100")
        if not 0 <= self.max_deltas <= 10_000:
            raise ValueError("DeltaPolicy.max_deltas must be between 0 and 10000")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> DeltaPolicy:
        """Read `LHV_MAX_DELTA_SHARE` and `LHV_MAX_DELTAS` (defaults above)."""
        values: dict[str, Any] = {}
        if (share := _env(env, "LHV_MAX_DELTA_SHARE")) is not None:
            values["max_delta_share"] = float(share)
        if (count := _env(env, "LHV_MAX_DELTAS")) is not None:
            values["max_deltas"] = int(count)
        return cls(**values)

    def next_kind(self, entry: IndexEntry | None) -> SegmentKind:
        """A base when there is none yet (`entry` None) or the chain is past a bound; a
        delta otherwise. The caller captures accordingly (`capture_base`/`capture_delta`).

        Note: a captured delta that fails to upload is lost to the index's change
        tracking: the next snapshot of that index must be a base, whatever this says.
        """
        if entry is None or len(entry.deltas) >= self.max_deltas:
            return SegmentKind.BASE
        if entry.delta_bytes > self.max_delta_share * entry.bytes:
            return SegmentKind.BASE
        return SegmentKind.DELTA


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """One snapshot object named by a manifest: a base or a delta."""

    key: str
    offset: int
    """the last command offset applied to the index when the segment was captured"""
    bytes: int
    crc32: int | None = None
    """of the whole object; None in manifests written before it was recorded"""


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexEntry:
    """One index named by a manifest: its base snapshot (`key`, `offset`, `bytes`,
    `crc32`) and the deltas applied on top of it, in order."""

    key: str
    """the base snapshot object's key"""
    offset: int
    """the last command offset applied to the index when the base was captured"""
    bytes: int
    """the base's size"""
    params: dict[str, Any]
    crc32: int | None = None
    """the base's crc32; None in manifests written before it was recorded"""
    deltas: tuple[Segment, ...] = ()

    @property
    def base(self) -> Segment:
        return Segment(key=self.key, offset=self.offset, bytes=self.bytes, crc32=self.crc32)

    @property
    def covered_offset(self) -> int:
        """The last command offset whose effects the base and its deltas hold."""
        return self.deltas[-1].offset if self.deltas else self.offset

    @property
    def delta_bytes(self) -> int:
        return sum(d.bytes for d in self.deltas)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every object this entry names: the base, then the deltas in order."""
        return (self.key, *(d.key for d in self.deltas))

    def with_delta(self, delta: Segment) -> IndexEntry:
        """This entry with `delta` appended to its chain.

        Raises:
            ValueError: `delta` covers less than the chain already does.
        """
        if delta.offset < self.covered_offset:
            raise ValueError(
                f"delta at offset {delta.offset} is older than the chain ({self.covered_offset})"
            )
        return replace(self, deltas=(*self.deltas, delta))

    def _encode(self, fmt: int) -> dict[str, Any]:
        if fmt == MANIFEST_FORMAT_SINGLE:
            out = {"key": self.key, "offset": self.offset, "bytes": self.bytes}
            out["params"] = self.params
            if self.crc32 is not None:
                out["crc32"] = self.crc32
            return out
        return {
            "params": self.params,
            "base": _encode_segment(self.base),
            "deltas": [_encode_segment(d) for d in self.deltas],
        }

    @classmethod
    def _decode(cls, fmt: int, e: dict[str, Any]) -> IndexEntry:
        if fmt == MANIFEST_FORMAT_SINGLE:
            base = _decode_segment(e)
            deltas: tuple[Segment, ...] = ()
        else:
            base = _decode_segment(e["base"])
            deltas = tuple(_decode_segment(d) for d in e["deltas"])
        entry = cls(
            key=base.key,
            offset=base.offset,
            bytes=base.bytes,
            crc32=base.crc32,
            params=dict(e["params"]),
        )
        for d in deltas:
            entry = entry.with_delta(d)
        return entry


def _encode_segment(s: Segment) -> dict[str, Any]:
    return {"key": s.key, "offset": s.offset, "bytes": s.bytes, "crc32": s.crc32}


def _decode_segment(e: dict[str, Any]) -> Segment:
    crc = e.get("crc32")
    return Segment(
        key=str(e["key"]),
        offset=int(e["offset"]),
        bytes=int(e["bytes"]),
        crc32=None if crc is None else int(crc),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What a partition's checkpoint covers."""

    topic: str
    partition: int
    offset: int = -1
    """the last command offset whose effects the snapshots include (-1: none)"""
    generation: int = 0
    """bumped by every new owner when it claims the partition"""
    writer: str = ""
    written_at: float = 0.0
    indexes: Mapping[str, IndexEntry] = field(default_factory=dict)
    catalog: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """name -> catalog entry (a sharded index or an alias) whose home is this partition,
    as JSON (`worker.service.catalog` reads it)"""
    forwarded: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    """origin partition -> (offset, part) of the newest forwarded record applied"""
    members: Mapping[str, int] = field(default_factory=dict)
    """member index `NAME#s` -> S, the shard count of its sharded index"""

    @property
    def sharded(self) -> bool:
        return bool(self.catalog or self.forwarded or self.members)

    def encode(self) -> bytes:
        """Format 3 when the partition has sharded state, else format 2 when some index
        has deltas, else format 1 (see the module docstring)."""
        chained = any(e.deltas for e in self.indexes.values())
        if self.sharded:
            fmt = MANIFEST_FORMAT_SHARDED
        else:
            fmt = MANIFEST_FORMAT if chained else MANIFEST_FORMAT_SINGLE
        body: dict[str, Any] = {
            "format": fmt,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "generation": self.generation,
            "writer": self.writer,
            "written_at": self.written_at,
            "indexes": {
                name: e._encode(min(fmt, MANIFEST_FORMAT))
                for name, e in sorted(self.indexes.items())
            },
        }
        if fmt == MANIFEST_FORMAT_SHARDED:
            body["catalog"] = {name: dict(e) for name, e in sorted(self.catalog.items())}
            body["forwarded"] = {
                str(p): [offset, part] for p, (offset, part) in sorted(self.forwarded.items())
            }
            body["members"] = dict(sorted(self.members.items()))
        return orjson.dumps(body, option=orjson.OPT_INDENT_2)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            body = orjson.loads(data)
            fmt = body.get("format")
            if fmt not in (MANIFEST_FORMAT_SINGLE, MANIFEST_FORMAT, MANIFEST_FORMAT_SHARDED):
                raise ValueError(f"unknown manifest format {fmt!r}")
            entries = min(fmt, MANIFEST_FORMAT)
            return cls(
                topic=body["topic"],
                partition=int(body["partition"]),
                offset=int(body["offset"]),
                generation=int(body["generation"]),
                writer=str(body.get("writer", "")),
                written_at=float(body.get("written_at", 0.0)),
                indexes={
                    name: IndexEntry._decode(entries, e) for name, e in body["indexes"].items()
                },
                catalog={str(n): dict(e) for n, e in body.get("catalog", {}).items()},
                forwarded={
                    int(p): (int(v[0]), int(v[1])) for p, v in body.get("forwarded", {}).items()
                },
                members={str(n): int(s) for n, s in body.get("members", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Internal(f"unreadable manifest: {exc}") from exc


class SnapshotStore:
    """Reads and writes one topic's partition checkpoints.

    Arguments:
        blobs: where objects live (S3, or memory in unit tests); started by the caller.
        topic: the commands topic whose partitions are checkpointed.
        worker_id: written into manifests, for operators.
        index_limits: limits of the indexes it loads (default `Limits()`).
        policy: when a chain of deltas gets a new base (default `DeltaPolicy()`).
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        topic: str,
        worker_id: str,
        index_limits: Limits | None = None,
        policy: DeltaPolicy | None = None,
    ) -> None:
        self._blobs = blobs
        self._index_limits = index_limits
        self._topic = topic
        self._worker_id = worker_id
        self.policy = policy if policy is not None else DeltaPolicy()

    def _base(self, partition: int) -> str:
        return f"partitions/{self._topic}/{partition:05d}/"

    def manifest_key(self, partition: int) -> str:
        return self._base(partition) + "manifest.json"

    async def read_manifest(self, partition: int) -> tuple[Manifest | None, str | None]:
        """The partition's manifest and its ETag, or `(None, None)` when there is none."""
        try:
            data, etag = await self._blobs.get(self.manifest_key(partition))
        except BlobNotFound:
            return None, None
        return Manifest.decode(data), etag

    async def write_manifest(self, manifest: Manifest, *, etag: str | None) -> tuple[Manifest, str]:
        """Write `manifest` if the stored one still has `etag` (None: if there is none).

        Returns the manifest as written (with writer and time) and its new ETag.

        Raises:
            Fenced: someone else wrote the manifest since `etag` was read.
        """
        manifest = replace(manifest, writer=self._worker_id, written_at=time.time())
        try:
            new_etag = await self._blobs.put_if_match(
                self.manifest_key(manifest.partition), manifest.encode(), etag
            )
        except PreconditionFailed as exc:
            raise Fenced(
                f"manifest of partition {manifest.partition} changed since it was read: "
                "another worker owns it now"
            ) from exc
        return manifest, new_etag

    # -- writing --------------------------------------------------------------------------

    def next_kind(self, entry: IndexEntry | None) -> SegmentKind:
        """`self.policy.next_kind(entry)`: whether the next snapshot of the index whose
        manifest entry is `entry` (None: not in the manifest) is a base or a delta."""
        return self.policy.next_kind(entry)

    def _segment_key(self, partition: int, name: str, offset: int, kind: SegmentKind) -> str:
        suffix = ".delta.lhv" if kind is SegmentKind.DELTA else ".lhv"
        return (
            f"{self._base(partition)}snapshots/{name}/"
            f"{max(offset, 0):020d}-{uuid.uuid4().hex[:12]}{suffix}"
        )

    async def save_base(self, partition: int, base: Base, *, offset: int) -> IndexEntry:
        """Encode a captured base (`Index.capture_base`, taken by the caller) in a thread,
        spool it and upload it; returns its manifest entry (no deltas yet). The index's
        lock is not needed: the capture shares nothing with the index. The base stays
        open: the caller closes it (`Base.close`), uploaded or not.

        Raises:
            StoreUnavailable, BlobStoreError: the upload failed (nothing is named by any
                manifest yet; the object, if any, is garbage).
        """
        key = self._segment_key(partition, base.name, offset, SegmentKind.BASE)
        size, crc = await self._upload(key, _encode_base, base, self._source(partition, offset))
        return IndexEntry(
            key=key, offset=offset, bytes=size, crc32=crc, params=base.params.to_dict()
        )

    async def save_delta(self, partition: int, delta: Delta, *, offset: int) -> Segment:
        """Encode a captured delta (`Index.capture_delta`) in a thread, spool it and upload
        it; returns the segment to append to the index's entry (`IndexEntry.with_delta`).

        Raises:
            StoreUnavailable, BlobStoreError: the upload failed; the delta's changes are
                then in no segment, so the index's next snapshot must be a base.
        """
        key = self._segment_key(partition, delta.name, offset, SegmentKind.DELTA)
        size, crc = await self._upload(key, _encode_delta, delta, self._source(partition, offset))
        return Segment(key=key, offset=offset, bytes=size, crc32=crc)

    async def save_index(self, partition: int, index: Index, *, offset: int) -> IndexEntry:
        """Capture a base of `index` (under its lock, in a thread), `save_base` it and close
        it."""
        base = await capture_in_thread(index.capture_base)
        with base:
            return await self.save_base(partition, base, offset=offset)

    def _source(self, partition: int, offset: int) -> dict[str, Any]:
        return {"topic": self._topic, "partition": partition, "offset": offset}

    async def _upload(
        self,
        key: str,
        encode: Callable[[Any, BinaryIO, dict[str, Any]], tuple[int, int]],
        capture: Base | Delta,
        source: dict[str, Any],
    ) -> tuple[int, int]:
        spool: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        try:
            size, crc = await asyncio.to_thread(encode, capture, spool, source)
            await self._blobs.put(key, spool)
        finally:
            spool.close()
        return size, crc

    # -- reading --------------------------------------------------------------------------

    async def load_index(self, name: str, entry: IndexEntry, *, defer: bool = False) -> Index:
        """Restore one index a manifest names: its base, then each delta in order.

        `defer`: the index is returned with its inserts deferred (`Index.defer_inserts`),
        turned on before the deltas: their items are searchable at once (an exact scan)
        and inserted into the engine later (`Index.settle`), so a chain costs its bytes,
        not an HNSW insert per item, before the index can answer. The caller turns
        deferral off and settles.

        Each segment is downloaded to a temporary file and decoded from it a section at a
        time, so no segment is held whole in memory next to the index; the deltas are
        downloaded while the base decodes. Every frame is checked whole before it is
        applied; in a chain, each segment must also have the size and crc32 the entry
        recorded (see the module docstring).

        Raises:
            SnapshotGone: a segment is no longer in the store (retriable: re-read the
                manifest).
            SnapshotError: a segment is corrupted or of another index, or a segment of a
                chain is not the object the manifest recorded; nothing is returned.
            StoreUnavailable: S3 kept failing, or kept cutting reads short.
        """
        expect = IndexParams.from_dict(entry.params)
        base_file = await self._fetch(name, entry.base, strict=bool(entry.deltas))
        fetching = asyncio.create_task(self._fetch_all(name, entry.deltas))
        try:
            try:
                index = await self._decode(name, entry.base, base_file, _read_base, expect)
            finally:
                base_file.close()
            if defer:
                index.defer_inserts()
            for segment, f in zip(entry.deltas, await fetching, strict=True):
                try:
                    await self._decode(name, segment, f, _apply_delta, index)
                finally:
                    f.close()
        finally:
            if not fetching.done():
                fetching.cancel()
            await asyncio.gather(fetching, return_exceptions=True)
            if fetching.done() and not fetching.cancelled() and fetching.exception() is None:
                for f in fetching.result():
                    f.close()
        return index

    async def _decode(
        self, name: str, segment: Segment, f: BinaryIO, step: Callable[..., T], arg: Any
    ) -> T:
        try:
            result = await asyncio.to_thread(step, f, name, arg, self._index_limits)
        except LhvError as exc:
            if isinstance(exc, SnapshotError):
                raise SnapshotError(f"snapshot {segment.key} of index {name!r}: {exc}") from exc
            raise
        except Exception as exc:
            raise Internal(
                f"snapshot {segment.key} of index {name!r} failed to load: {exc}"
            ) from exc
        return result

    async def _fetch_all(self, name: str, segments: tuple[Segment, ...]) -> list[BinaryIO]:
        files: list[BinaryIO] = []
        try:
            for segment in segments:
                files.append(await self._fetch(name, segment, strict=True))
        except BaseException:
            for f in files:
                f.close()
            raise
        return files

    async def _fetch(self, name: str, segment: Segment, *, strict: bool) -> BinaryIO:
        """Download one segment to a temporary file; returns it positioned at 0.

        A read shorter or longer than the stored object is read again. `strict`: the object
        must have the size and crc32 the manifest recorded (`SnapshotError` otherwise);
        else a difference is logged and the frame's own checks decide.
        """
        f: BinaryIO = tempfile.TemporaryFile(prefix="lhv-restore-")  # noqa: SIM115
        try:
            for attempt in range(1, FETCH_ATTEMPTS + 1):
                got = await self._get_to_file(name, segment, f)
                if got == segment.bytes:
                    break
                stored = await self._head_size(name, segment)
                if got == stored:  # read whole, but not the object the manifest named
                    self._differs(name, segment, f"{stored} bytes", f"{segment.bytes}", strict)
                    break
                log.warning(
                    "read of %s came back with %d of %d bytes (attempt %d/%d)",
                    segment.key, got, stored, attempt, FETCH_ATTEMPTS,
                    extra={"index": name},
                )  # fmt: skip
            else:
                raise StoreUnavailable(
                    f"{segment.key}: every read came back cut short", key=segment.key
                )
            if segment.crc32 is not None and got == segment.bytes:
                try:
                    crc = await asyncio.to_thread(_frame_crc32, f, segment.bytes)
                except SnapshotError as exc:
                    raise SnapshotError(f"snapshot {segment.key} of index {name!r}: {exc}") from exc
                if crc != segment.crc32:
                    self._differs(
                        name, segment, f"crc32 {crc:#010x}", f"{segment.crc32:#010x}", strict
                    )
            await asyncio.to_thread(f.seek, 0)
        except BaseException:
            f.close()
            raise
        return f

    @staticmethod
    def _differs(name: str, segment: Segment, got: str, want: str, strict: bool) -> None:
        what = f"snapshot {segment.key} of index {name!r} has {got}, the manifest says {want}"
        if strict:
            raise SnapshotError(what)
        log.warning("%s: loading it if its frame is sound", what, extra={"index": name})

    async def _get_to_file(self, name: str, segment: Segment, f: BinaryIO) -> int:
        try:
            return (await self._blobs.get_to_file(segment.key, f)).size
        except BlobNotFound as exc:
            raise self._gone(name, segment) from exc

    async def _head_size(self, name: str, segment: Segment) -> int:
        try:
            return (await self._blobs.head(segment.key)).size
        except BlobNotFound as exc:
            raise self._gone(name, segment) from exc

    @staticmethod
    def _gone(name: str, segment: Segment) -> SnapshotGone:
        return SnapshotGone(
            f"snapshot {segment.key} of index {name!r} is gone (garbage-collected after a "
            "newer manifest replaced the one read?): re-read the manifest",
            key=segment.key,
        )

    # -- garbage ----------------------------------------------------------------------------

    async def collect_garbage(self, manifest: Manifest) -> int:
        """Delete this partition's snapshot objects that `manifest` does not name (bases
        and deltas) and whose offset is below `manifest.offset`; returns how many.

        An unnamed object at or past the manifest's offset is kept: it may belong to a
        checkpoint being written now, and a later collection removes it if no manifest
        comes to name it.
        """
        keep = {k for e in manifest.indexes.values() for k in e.keys}
        prefix = self._base(manifest.partition) + "snapshots/"
        removed = 0
        for key in await self._blobs.list(prefix):
            if key in keep:
                continue
            m = _SEGMENT_KEY.fullmatch(key.rsplit("/", 1)[-1])
            if m is not None and int(m.group(1)) >= max(manifest.offset, 0):
                continue
            try:
                await self._blobs.delete(key)
                removed += 1
            except LhvError as exc:
                log.warning("could not delete old snapshot %s: %s", key, exc)
        if removed:
            log.info(
                "removed %d old snapshot objects",
                removed,
                extra={"partition": manifest.partition},
            )
        return removed


# -- in threads ---------------------------------------------------------------------------


C = TypeVar("C", Base, Delta)


async def capture_in_thread(capture: Callable[[], C]) -> C:
    """`capture()` (`Index.capture_base` or `capture_delta`, which take the index's lock)
    in a thread. Cancelled, the thread still runs to its end; a base it returns then is
    closed, so its files are not left to the garbage collector."""
    task = asyncio.ensure_future(asyncio.to_thread(capture))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_abandoned)
        raise


def _close_abandoned(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is None and isinstance(task.result(), Base):
        task.result().close()


def _encode_base(base: Base, out: BinaryIO, source: dict[str, Any]) -> tuple[int, int]:
    size = write_snapshot(base, out, source=source)
    return size, _frame_crc32(out, size)


def _encode_delta(delta: Delta, out: BinaryIO, source: dict[str, Any]) -> tuple[int, int]:
    size = write_delta(delta, out, source=source)
    return size, _frame_crc32(out, size)


def _read_base(f: BinaryIO, name: str, expect: IndexParams, limits: Limits | None) -> Index:
    index, _source = read_snapshot(f, expect=expect, limits=limits)
    if index.name != name:
        raise SnapshotError(f"it holds index {index.name!r}")
    return index


def _apply_delta(f: BinaryIO, name: str, index: Index, limits: Limits | None) -> int:
    delta, _source = read_delta(f, expect=index.params, limits=limits)  # checked whole
    if delta.name != name:
        raise SnapshotError(f"it is a delta of index {delta.name!r}")
    return apply_delta(index, delta)


def _frame_crc32(f: BinaryIO, size: int | None = None) -> int:
    """The crc32 of the whole LHV1 v3 frame in `f`, from its header, its envelope and the
    per-section checksums the envelope lists (combined, no pass over the sections);
    leaves `f` at 0.

    Together with the reader's check of every section against its listed checksum, this
    equals checking the crc32 of every byte.

    Raises:
        SnapshotError: not a v3 frame, or its sections do not add up to `size`.
    """
    f.seek(0)
    head = f.read(HEADER.size)
    if len(head) != HEADER.size:
        raise SnapshotError("truncated in the header")
    magic, env_len = HEADER.unpack(head)
    if magic != MAGIC or env_len > MAX_ENVELOPE_BYTES:
        raise SnapshotError("not an LHV1 frame")
    env = f.read(env_len)
    f.seek(0)
    if len(env) != env_len:
        raise SnapshotError("truncated in the envelope")
    try:
        specs = orjson.loads(env)["sections"]
        pieces = [(int(s["crc32"]), int(s["length"])) for s in specs]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"the envelope lists no sections: {exc}") from exc
    crc = zlib.crc32(env, zlib.crc32(head))
    total = len(head) + len(env)
    for piece_crc, length in pieces:
        crc = crc32_combine(crc, piece_crc, length)
        total += length
    if size is not None and total != size:
        raise SnapshotError(f"the envelope lists {total} bytes, the frame has {size}")
    return crc
