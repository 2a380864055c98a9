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

from lhv_index import Index
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
    applied_offset: int = -1
    """the last command offset consumed (applied, skipped or rejected); -1: none"""
    ready_offset: int = -1
    """serving starts once `applied_offset` reaches this (the log end at assignment - 1)"""
    manifest: Manifest | None = None
    etag: str | None = None
    """ETag of the manifest as this worker last read or wrote it"""
    dirty: set[str] = field(default_factory=set)
    """indexes changed since the last checkpoint"""
    dropped: bool = False
    """an index was dropped since the last checkpoint"""
    records_since_checkpoint: int = 0
    last_checkpoint: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0
    """after a failed checkpoint: no new attempt before this (monotonic seconds)"""
    retry_delay_s: float = 0.0
    refused_reason: str = ""
    after_checkpoint: list[tuple[int, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    """steps to run once a checkpoint covers their offset: (offset, step)"""
    _advanced: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def checkpoint_offset(self) -> int:
        return self.manifest.offset if self.manifest else -1

    @property
    def needs_checkpoint(self) -> bool:
        return bool(self.dirty) or self.dropped or self.applied_offset > self.checkpoint_offset

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
