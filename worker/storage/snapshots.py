"""Snapshots and manifests of partitions, over a `BlobStore`.

Layout under the configured prefix, for partition p of the commands topic::

    partitions/<topic>/<p:05d>/manifest.json
    partitions/<topic>/<p:05d>/snapshots/<index>/<offset:020d>-<nonce>.lhv

The manifest is the truth about a partition: it names one snapshot per live index and the
last command offset those snapshots cover. It is written with a conditional put on the ETag
the writer last saw (create-only when there was none), so a worker that lost the partition
and wakes up late cannot overwrite the new owner's manifest: its write fails with
`Fenced`. A new owner claims the partition by rewriting the manifest with a higher
`generation` before it serves, which also fences an old owner that has not checkpointed yet.

Snapshot objects are immutable; the ones no manifest names are garbage-collected after
the manifest that dropped them is written.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import orjson

from lhv_index import Index, IndexParams, Limits, read_snapshot, write_snapshot
from lhv_index.errors import Internal, LhvError
from worker.storage.blobstore import BlobNotFound, BlobStore, PreconditionFailed

__all__ = ["Fenced", "IndexEntry", "Manifest", "SnapshotStore"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
#: snapshots at or under this size are encoded in memory; larger ones spill to a temp file
SPOOL_BYTES = 64 * 1024 * 1024


class Fenced(Internal):
    """Another worker wrote this partition's manifest since we read it: ownership is lost."""

    retriable = False


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexEntry:
    """One index named by a manifest."""

    key: str
    """the snapshot object's key"""
    offset: int
    """the last command offset applied to the index when the snapshot was taken"""
    bytes: int
    params: dict[str, Any]


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

    def encode(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "generation": self.generation,
            "writer": self.writer,
            "written_at": self.written_at,
            "indexes": {
                name: {"key": e.key, "offset": e.offset, "bytes": e.bytes, "params": e.params}
                for name, e in sorted(self.indexes.items())
            },
        }
        return orjson.dumps(body, option=orjson.OPT_INDENT_2)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            body = orjson.loads(data)
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {body.get('format')!r}")
            return cls(
                topic=body["topic"],
                partition=int(body["partition"]),
                offset=int(body["offset"]),
                generation=int(body["generation"]),
                writer=str(body.get("writer", "")),
                written_at=float(body.get("written_at", 0.0)),
                indexes={
                    name: IndexEntry(
                        key=e["key"],
                        offset=int(e["offset"]),
                        bytes=int(e["bytes"]),
                        params=dict(e["params"]),
                    )
                    for name, e in body["indexes"].items()
                },
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise Internal(f"unreadable manifest: {exc}") from exc


class SnapshotStore:
    """Reads and writes one topic's partition checkpoints.

    Arguments:
        blobs: where objects live (S3, or memory in unit tests); started by the caller.
        topic: the commands topic whose partitions are checkpointed.
        worker_id: written into manifests, for operators.
        index_limits: limits of the indexes it loads (default `Limits()`).
    """

    def __init__(
        self, blobs: BlobStore, *, topic: str, worker_id: str, index_limits: Limits | None = None
    ) -> None:
        self._blobs = blobs
        self._index_limits = index_limits
        self._topic = topic
        self._worker_id = worker_id

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

    async def save_index(self, partition: int, index: Index, *, offset: int) -> IndexEntry:
        """Upload one snapshot of `index` covering commands up to `offset`."""
        key = (
            f"{self._base(partition)}snapshots/{index.name}/"
            f"{max(offset, 0):020d}-{uuid.uuid4().hex[:12]}.lhv"
        )
        source = {"topic": self._topic, "partition": partition, "offset": offset}
        spool: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        try:
            size = await asyncio.to_thread(_encode, index, spool, source)
            await self._blobs.put(key, spool)
        finally:
            spool.close()
        return IndexEntry(key=key, offset=offset, bytes=size, params=index.params.to_dict())

    async def load_index(self, name: str, entry: IndexEntry) -> Index:
        """Download and decode one snapshot named by a manifest; checks it matches."""
        data, _ = await self._blobs.get(entry.key)
        expect = IndexParams.from_dict(entry.params)
        try:
            index, _source = await asyncio.to_thread(
                read_snapshot, data, expect=expect, limits=self._index_limits
            )
        except LhvError:
            raise
        except Exception as exc:
            raise Internal(f"snapshot {entry.key} of index {name!r} failed to load: {exc}") from exc
        if index.name != name:
            raise Internal(f"snapshot {entry.key} holds index {index.name!r}, not {name!r}")
        return index

    async def collect_garbage(self, manifest: Manifest) -> int:
        """Delete this partition's snapshot objects that `manifest` does not name."""
        keep = {e.key for e in manifest.indexes.values()}
        prefix = self._base(manifest.partition) + "snapshots/"
        removed = 0
        for key in await self._blobs.list(prefix):
            if key not in keep:
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


def _encode(index: Index, out: BinaryIO, source: dict[str, Any]) -> int:
    size = write_snapshot(index, out, source=source)
    out.seek(0)
    return size
