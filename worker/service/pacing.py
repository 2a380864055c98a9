"""When the runner starts a checkpoint: a recovery-time budget and a cap on the share of
time spent checkpointing, within the every-N-records / S-seconds bounds.

The cost a checkpoint saves is the replay a restart would need: the records applied since
the last durable checkpoint. `Pace` (one per partition) measures this partition's apply
throughput (units per second of apply time, smoothed: a unit is one record plus one per
item it writes, so a 1 000-item `add` weighs like 1 001 one-item records) and counts the
units applied since the last capture; their quotient estimates the replay in seconds of
apply. The runner checkpoints once that estimate passes `max_replay_s`
(`LHV_CHECKPOINT_MAX_REPLAY_S`), unless checkpoints took more than `max_time_share`
(`LHV_CHECKPOINT_MAX_TIME_SHARE`) of the recent wall time; the share is overridden once the
estimate reaches twice the budget, so a restart's replay stays bounded whatever a
checkpoint costs. Checkpoints start between batches, so a batch is what the replay can
overshoot the budget by: the runner keeps each batch to about a quarter of the budget
(`Pace.batch_bytes`: record bytes at the measured bytes per second of apply, within
`LHV_MAX_BATCH_BYTES`). `LHV_CHECKPOINT_RECORDS` and `LHV_CHECKPOINT_SECONDS` stay hard bounds:
whatever the estimate and the share say, no more records or seconds than these pass
between two checkpoints (merge steps use the records bound to ask for one soon).

The estimate leaves out decoding (done ahead, in parallel with the apply) and the restore
of the snapshots themselves; a replay applies in larger batches than live ingest, so apply
time measured live tends to overestimate the replay, which errs on the safe side.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.service.config import CheckpointPolicy
    from worker.service.partition import Partition

__all__ = [
    "BATCH_SHARE",
    "RATE_HALF_LIFE_S",
    "SHARE_WINDOW_S",
    "Pace",
    "checkpoint_reason",
    "deferred",
]

#: apply throughput is smoothed over this many seconds of apply time (half-life)
RATE_HALF_LIFE_S = 10.0
#: the checkpoint time share is taken over this much wall time, at most
SHARE_WINDOW_S = 300.0
#: a batch applies in at most about this share of the replay budget
BATCH_SHARE = 0.25


@dataclass(slots=True)
class Pace:
    """What the checkpoint policy measures of one partition (monotonic seconds)."""

    since: int = 0
    """units applied since the last checkpoint's capture"""
    in_flight: int = 0
    """units covered by the checkpoint in flight (back in `since` if it fails)"""
    created: float = field(default_factory=time.monotonic)
    work: deque[tuple[float, float]] = field(default_factory=deque)
    """(start, seconds) of recent checkpoints: capture, uploads and manifest"""
    _units: float = 0.0
    _bytes: float = 0.0
    _seconds: float = 0.0

    def applied(self, units: int, seconds: float, nbytes: int = 0) -> None:
        """One batch of `units` (`nbytes` of record values) took `seconds` of apply."""
        self.since += units
        if seconds <= 0:
            return
        keep = 0.5 ** (seconds / RATE_HALF_LIFE_S)
        self._units = self._units * keep + units
        self._bytes = self._bytes * keep + nbytes
        self._seconds = self._seconds * keep + seconds

    def batch_bytes(self, max_replay_s: float) -> int | None:
        """Record bytes one batch may hold so that it applies in about `BATCH_SHARE` of
        the replay budget (checkpoints start between batches: a batch is what the
        replay may overshoot the budget by); None: no budget, or nothing measured."""
        rate = self.bytes_rate
        if max_replay_s <= 0 or rate is None:
            return None
        return int(rate * max_replay_s * BATCH_SHARE)

    @property
    def bytes_rate(self) -> float | None:
        """Smoothed record bytes per second of apply time; None before any was measured."""
        if self._seconds <= 0 or self._bytes <= 0:
            return None
        return self._bytes / self._seconds

    def chain_s(self, delta_bytes: int) -> float | None:
        """Estimated seconds of inserts `delta_bytes` of deltas leave a restore: their
        items are inserted into the engine again (in the background, once the partition
        serves), at about the rate the partition applies records of the same bytes
        (None: nothing measured)."""
        rate = self.bytes_rate
        return None if rate is None else delta_bytes / rate

    @property
    def rate(self) -> float | None:
        """Smoothed units per second of apply time; None before any was measured."""
        if self._seconds <= 0 or self._units <= 0:
            return None
        return self._units / self._seconds

    def replay_s(self) -> float | None:
        """Estimated seconds of apply a restart now would replay (None: not measured)."""
        rate = self.rate
        return None if rate is None else (self.since + self.in_flight) / rate

    def captured(self) -> None:
        """A checkpoint's capture was taken: what it covers is in flight."""
        self.in_flight += self.since
        self.since = 0

    def ended(self, started: float, seconds: float, *, durable: bool) -> None:
        """The checkpoint that started at `started` ended after `seconds`; `durable`: its
        manifest is written (else what it covered is to be replayed again)."""
        if durable:
            self.in_flight = 0
        else:
            self.since += self.in_flight
            self.in_flight = 0
        self.work.append((started, seconds))

    def time_share(self, now: float) -> float:
        """Share of the recent wall time (the last `SHARE_WINDOW_S`, or since this
        partition was assigned) spent in checkpoints."""
        start = max(now - SHARE_WINDOW_S, self.created)
        while self.work and sum(self.work[0]) < start:
            self.work.popleft()
        span = now - start
        if span <= 0:
            return 0.0
        busy = sum(max(0.0, min(s + d, now) - max(s, start)) for s, d in self.work)
        return busy / span


def checkpoint_reason(policy: CheckpointPolicy, partition: Partition, now: float) -> str | None:
    """Why the runner should start a checkpoint of `partition` now (logged), or None.

    Nothing when nothing changed, one is in flight, or a failed one's backoff runs.
    Then, in order: the records bound, the seconds bound, the replay budget (while the
    checkpoint time share is within its cap, or at twice the budget whatever the share).
    """
    p = partition
    if not p.needs_checkpoint or p.checkpoint_in_flight or now < p.retry_at:
        return None
    if p.records_since_checkpoint >= policy.every_records:
        return (
            f"{p.records_since_checkpoint} records since the last checkpoint "
            f"(LHV_CHECKPOINT_RECORDS {policy.every_records})"
        )
    if p.last_checkpoint == 0.0:
        return "retry of a failed checkpoint"
    age = now - p.last_checkpoint
    if age >= policy.every_s:
        return f"{age:.0f}s since the last checkpoint (LHV_CHECKPOINT_SECONDS {policy.every_s:g})"
    budget = policy.max_replay_s
    replay = p.pace.replay_s()
    if budget <= 0 or replay is None or replay <= budget:
        return None
    share = p.pace.time_share(now)
    what = f"estimated replay {replay:.1f}s over the budget {budget:g}s"
    if share <= policy.max_time_share:
        return f"{what}, checkpoint time share {share:.2f}"
    if replay >= 2 * budget:
        return (
            f"{what} twice over, though checkpoints took {share:.2f} of the time "
            f"(LHV_CHECKPOINT_MAX_TIME_SHARE {policy.max_time_share:g})"
        )
    return None


def deferred(policy: CheckpointPolicy, partition: Partition) -> bool:
    """The replay estimate is over the budget but a checkpoint waits for the time share
    to fall: the runner looks again soon even while idle."""
    replay = partition.pace.replay_s()
    return policy.max_replay_s > 0 and replay is not None and replay > policy.max_replay_s
