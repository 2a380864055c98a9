"""The worker's standby copies: which partitions it keeps warm, what it reports to the
group, and the hand-over of a warm copy when its partition is assigned here.

The group's assignor (`worker.kafka.assignor`) names, in each member's assignment, the
partitions that member keeps as standbys (`LHV_STANDBY_REPLICAS` copies of each, never on
the owner). `Ownership` calls `reconcile` at every assignment: a `WarmCopy` is started for
each standby partition not held yet (from the state this worker parked if it owned the
partition until this rebalance) and stopped for each partition no longer named. At the
next join this worker reports each warm copy's applied offset, so when an owner dies
the group gives its partitions to the member holding them warmest; `Ownership` then
takes the copy (`promote`) instead of downloading the snapshots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

from lhv_index import Limits as IndexLimits
from worker.service.apply import BarrierSteps
from worker.service.warm import LogReader, Warm, WarmCopy
from worker.storage.snapshots import SnapshotStore
from worker.telemetry.metrics import Metrics
from worker.wire.limits import MessageLimits

__all__ = ["Standbys"]

log = logging.getLogger(__name__)


class Standbys:
    """This worker's warm copies, by partition.

    Arguments:
        make: builds the copy of one partition (its reader, store and limits), from a
            seed state or not.
    """

    def __init__(self, make: Callable[[int, Warm | None], WarmCopy], metrics: Metrics) -> None:
        self._make = make
        self._metrics = metrics
        self._copies: dict[int, WarmCopy] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    @classmethod
    def over(
        cls,
        *,
        store: SnapshotStore,
        reader: Callable[[int], LogReader],
        num_partitions: Callable[[], int],
        metrics: Metrics,
        limits: MessageLimits,
        index_limits: IndexLimits,
        steps: BarrierSteps,
        max_records: int,
    ) -> Standbys:
        """Copies reading with `reader(p)`, restoring from `store` and taking the barrier
        steps read-only with `steps` (a `MergeProtocol` over `follower.ReadOnlyWrites`)."""

        def make(p: int, seed: Warm | None) -> WarmCopy:
            return WarmCopy(
                p,
                store=store,
                reader=reader(p),
                num_partitions=num_partitions(),
                limits=limits,
                index_limits=index_limits,
                steps=steps,
                seed=seed,
                max_records=max_records,
            )

        return cls(make, metrics)

    def reconcile(
        self,
        wanted: Iterable[int],
        *,
        keep: Iterable[int] = (),
        seeds: Mapping[int, Warm] | None = None,
    ) -> None:
        """Hold copies of exactly `wanted` (plus `keep`: partitions just assigned here,
        whose copies are about to be promoted); start from `seeds` where given."""
        wanted = set(wanted)
        seeds = seeds or {}
        keep = set(keep) | wanted
        for p in sorted(set(self._copies) - keep):
            self._stop(p)
        for p in sorted(wanted - set(self._copies)):
            copy = self._make(p, seeds.get(p))
            self._copies[p] = copy
            copy.start()
            log.info(
                "standby copy of partition %d started%s",
                p,
                " from this worker's last state" if p in seeds else "",
            )
        self._metrics.set_standbys(sorted(self._copies))

    def lags(self) -> dict[int, int]:
        """Partition -> records of the log not yet applied by its warm copy."""
        return {p: lag for p, f in self._copies.items() if (lag := f.lag) is not None}

    def held(self) -> dict[int, int]:
        """Partition -> applied offset of each warm copy (cold ones are left out)."""
        return {p: off for p, f in self._copies.items() if (off := f.offset) is not None}

    async def promote(self, p: int) -> Warm | None:
        """Take partition p's copy (stopped first); None when none is warm here."""
        copy = self._copies.pop(p, None)
        self._metrics.set_standbys(sorted(self._copies))
        if copy is None:
            return None
        warm = await copy.handover()
        if (closing := copy.closing) is not None and not closing.done():
            self._stopping.add(closing)
            closing.add_done_callback(self._stopping.discard)
        return warm

    def _stop(self, p: int) -> None:
        copy = self._copies.pop(p)
        log.info("standby copy of partition %d stopped", p)
        task = asyncio.create_task(copy.stop(), name=f"standby-stop-{p}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def stop(self) -> None:
        """Stop every copy. Idempotent."""
        for p in list(self._copies):
            self._stop(p)
        await asyncio.gather(*self._stopping, return_exceptions=True)
