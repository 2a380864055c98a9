"""One owned partition: its indexes, how far it has applied, and whether it may serve.

A `Partition` is created when the partition is assigned, fills while it restores, serves
once it has replayed to the log end seen at assignment, and is dropped on revoke or when
ownership is lost. Offsets are Kafka offsets of the commands topic.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lhv_index import Index
from worker.service.catalog import CatalogEntry, catalog_from_wire, catalog_to_wire
from worker.service.pacing import Pace
from worker.storage.snapshots import Manifest

__all__ = ["Partition", "PartitionStatus"]


class PartitionStatus(enum.StrEnum):
    RESTORING = "restoring"
    SERVING = "serving"
    REFUSED = "refused"
    """the log lost records past the checkpoint; nothing is served or applied"""
    REVOKED = "revoked"


@dataclass(eq=False, slots=True)
class Partition:
    """State of partition `number` of the commands topic (and of the search topic)."""

    number: int
    status: PartitionStatus = PartitionStatus.RESTORING
    indexes: dict[str, Index] = field(default_factory=dict)
    catalog: dict[str, CatalogEntry] = field(default_factory=dict)
    """sharded indexes and aliases whose home is this partition (`catalog.py`)"""
    forwarded: dict[int, tuple[int, int]] = field(default_factory=dict)
    """origin partition -> (offset, part) of the newest forwarded record applied here: a
    forwarded record whose origin is not newer is a duplicate and is skipped"""
    members: dict[str, int] = field(default_factory=dict)
    """member index `NAME#s` held here -> S, the shard count of its sharded index"""
    validators: dict[str, tuple[dict[str, Any], Index]] = field(default_factory=dict)
    """sharded index -> (its parameters, an empty index of them): the home validates a
    plain-name write with it before splitting it (not persisted)"""
    applied_offset: int = -1
    """the last command offset consumed (applied, skipped or rejected); -1: none"""
    ready_offset: int = -1
    """serving starts once `applied_offset` reaches this (the log end at assignment - 1)"""
    manifest: Manifest | None = None
    etag: str | None = None
    """ETag of the manifest as this worker last read or wrote it"""
    dirty: set[str] = field(default_factory=set)
    """indexes changed since the last checkpoint's capture"""
    dropped: bool = False
    """an index was dropped since the last checkpoint's capture"""
    records_since_checkpoint: int = 0
    """records applied since the last checkpoint's capture"""
    last_checkpoint: float = field(default_factory=time.monotonic)
    """when the last checkpoint's capture was taken (monotonic seconds); 0.0 after a
    failed checkpoint: due again once its backoff ends (`retry_at`)"""
    pace: Pace = field(default_factory=Pace)
    """apply throughput, units since the last capture, recent checkpoint work: what the
    runner's checkpoint policy reads (worker/service/pacing.py)"""
    retry_at: float = 0.0
    """after a failed checkpoint: no new attempt before this (monotonic seconds)"""
    retry_delay_s: float = 0.0
    refused_reason: str = ""
    after_checkpoint: list[tuple[int, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    """steps to run once a checkpoint covers their offset: (offset, step)"""
    persisted: dict[str, Index] = field(default_factory=dict)
    """name -> the index object whose state the manifest's entry holds, with every change
    since tracked by the index itself. Only such an index may be saved as a delta on that
    entry: a checkpoint removes the name before it captures (a capture ends the tracking
    of what it took) and puts it back once the manifest naming the capture is written,
    so a failed upload or manifest write, or an index dropped and created again, leaves
    the name out and the next snapshot of that index is a base."""
    history: list[tuple[float, int]] = field(default_factory=list)
    """(wall-clock time, offset) of this partition's durable checkpoints, oldest first,
    pruned to what the tombstone horizon still needs (`horizon`)"""
    checkpointing: asyncio.Task[bool] | None = None
    """the partition's latest checkpoint: its capture was taken between two batches, its
    uploads, manifest and commit run in the background; at most one is in flight"""
    _advanced: asyncio.Condition = field(default_factory=asyncio.Condition)

    def take_manifest_state(self, manifest: Manifest | None) -> None:
        """Take the state a manifest holds beside the indexes: the catalog, the forwarding
        marks and the members (none without a manifest). The one restore of it, for an
        owner, a read replica and a standby copy alike."""
        self.catalog = catalog_from_wire(manifest.catalog) if manifest is not None else {}
        self.forwarded = dict(manifest.forwarded) if manifest is not None else {}
        self.members = dict(manifest.members) if manifest is not None else {}

    def manifest_state(self) -> dict[str, Any]:
        """The state beside the indexes as a manifest holds it (`Manifest`'s `catalog`,
        `forwarded`, `members`): what `take_manifest_state` reads back."""
        return {
            "catalog": catalog_to_wire(self.catalog),
            "forwarded": dict(self.forwarded),
            "members": dict(self.members),
        }

    @property
    def checkpoint_in_flight(self) -> bool:
        return self.checkpointing is not None and not self.checkpointing.done()

    @property
    def checkpoint_offset(self) -> int:
        return self.manifest.offset if self.manifest else -1

    @property
    def needs_checkpoint(self) -> bool:
        return bool(self.dirty) or self.dropped or self.applied_offset > self.checkpoint_offset

    def durable(self, written_at: float, offset: int) -> None:
        """Record a checkpoint whose manifest is written (wall-clock time, offset)."""
        if offset >= 0 and (not self.history or offset > self.history[-1][1]):
            self.history.append((written_at, offset))

    def horizon(self, retention_s: float, now: float) -> int | None:
        """The tombstone horizon: one past the offset of the newest durable checkpoint at
        least `retention_s` old at `now` (wall clock), or None (no such checkpoint, or
        `retention_s` 0: tombstones are kept for good). No replay starts at or below it.
        Older history is pruned."""
        if retention_s <= 0:
            return None
        cutoff = now - retention_s
        old = [i for i, (at, _) in enumerate(self.history) if at <= cutoff]
        if not old:
            return None
        del self.history[: old[-1]]
        return self.history[0][1] + 1

    def mark_ready_if_caught_up(self) -> bool:
        """Switch from restoring to serving once the replay reached the target."""
        if self.status is PartitionStatus.RESTORING and self.applied_offset >= self.ready_offset:
            self.status = PartitionStatus.SERVING
            return True
        return False

    async def notify(self) -> None:
        """Wake everything waiting on the applied offset or the status."""
        async with self._advanced:
            self._advanced.notify_all()

    @property
    def revoked(self) -> bool:
        """Dropped by this worker (read after an await: the status may have changed)."""
        return self.status is PartitionStatus.REVOKED

    def serves(self, offset: int | None) -> bool:
        """Serving, and `offset` (None: any) applied: a query on it need not wait."""
        return self.status is PartitionStatus.SERVING and (
            offset is None or self.applied_offset >= offset
        )

    async def wait_for(self, offset: int | None, *, timeout_s: float) -> bool:
        """Wait until serving and `applied_offset >= offset`; False at the timeout."""
        if self.serves(offset):
            return True
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                async with self._advanced:
                    await self._advanced.wait_for(
                        lambda: self.serves(offset) or self.status is PartitionStatus.REVOKED
                    )
        except TimeoutError:
            return False
        return self.serves(offset)
