"""The checkpoint policy in operator terms: a checkpoint starts once the estimated replay
(units since the last capture over the measured apply throughput) passes the budget,
unless checkpoints already took more than their share of the time, which only twice the
budget overrides; the records and seconds bounds hold whatever the estimate says."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from servicekit import Cluster, caught_up, eventually

from worker.service.config import CheckpointPolicy, WorkerConfig
from worker.service.pacing import Pace, checkpoint_reason
from worker.service.partition import Partition, PartitionStatus
from worker.storage.snapshots import Manifest
from worker.telemetry.logs import ContextFilter

POLICY = CheckpointPolicy(every_records=10**6, every_s=3600.0, max_replay_s=5.0)
NOW = 10_000.0


def _partition(*, rate: float, since: int, created: float = NOW - 1_000.0) -> Partition:
    """A serving partition with a change, `since` units applied at `rate` per second."""
    p = Partition(number=0, status=PartitionStatus.SERVING, pace=Pace(created=created))
    p.manifest = Manifest(topic="t", partition=0)
    p.dirty.add("docs")
    p.last_checkpoint = NOW - 60.0
    p.pace.applied(int(rate), 1.0)  # one second of apply at `rate`
    p.pace.since = since
    return p


def test_the_replay_estimate_is_units_since_the_capture_over_the_smoothed_throughput() -> None:
    pace = Pace()
    assert pace.replay_s() is None, "nothing measured: no estimate"
    pace.applied(1_000, 1.0)
    pace.applied(3_000, 1.0)
    assert pace.rate is not None and 1_000 < pace.rate < 3_000
    assert pace.replay_s() == pytest.approx(4_000 / pace.rate)
    pace.captured()
    assert pace.since == 0 and pace.in_flight == 4_000
    pace.applied(500, 0.25)
    pace.ended(NOW, 1.0, durable=False)  # a failed checkpoint: its records count again
    assert (pace.since, pace.in_flight) == (4_500, 0)
    pace.captured()
    pace.ended(NOW, 1.0, durable=True)
    assert (pace.since, pace.in_flight) == (0, 0) and pace.replay_s() == 0.0


def test_a_checkpoint_starts_once_the_estimated_replay_passes_the_budget() -> None:
    assert checkpoint_reason(POLICY, _partition(rate=1_000, since=4_000), NOW) is None
    reason = checkpoint_reason(POLICY, _partition(rate=1_000, since=6_000), NOW)
    assert reason is not None and "replay 6.0s over the budget 5s" in reason
    off = CheckpointPolicy(every_records=10**6, every_s=3600.0, max_replay_s=0)
    assert checkpoint_reason(off, _partition(rate=1_000, since=10**6), NOW) is None


def test_checkpoints_past_their_time_share_wait_unless_the_replay_is_twice_the_budget() -> None:
    p = _partition(rate=1_000, since=6_000)
    p.pace.work.append((NOW - 100.0, 20.0))  # 20 s of the last 300 s: 0.067
    assert checkpoint_reason(POLICY, p, NOW) is not None
    p.pace.work.append((NOW - 50.0, 20.0))  # 40 s of 300 s: 0.13, over 0.1
    assert p.pace.time_share(NOW) == pytest.approx(40 / 300)
    assert checkpoint_reason(POLICY, p, NOW) is None
    p.pace.since = 9_999
    assert checkpoint_reason(POLICY, p, NOW) is None
    p.pace.since = 10_000  # twice the budget
    reason = checkpoint_reason(POLICY, p, NOW)
    assert reason is not None and "twice" in reason and "0.13" in reason
    # the share falls as the wall time passes without checkpoints
    p.pace.since = 6_000
    assert checkpoint_reason(POLICY, p, NOW + 260.0) is not None  # 10 s of work left in it


def test_the_time_share_counts_only_the_time_since_the_partition_was_assigned() -> None:
    pace = Pace(created=NOW - 10.0)
    pace.work.append((NOW - 10.0, 2.0))
    assert pace.time_share(NOW) == pytest.approx(0.2)
    assert pace.time_share(NOW + 10.0) == pytest.approx(0.1)
    pace.work.append((NOW + 500.0, 1.0))
    assert pace.time_share(NOW + 601.0) == pytest.approx(1 / 300)
    assert len(pace.work) == 1, "work older than the window is forgotten"


def test_the_records_and_seconds_bounds_hold_whatever_the_estimate_and_the_share() -> None:
    bounded = CheckpointPolicy(every_records=100, every_s=30.0, max_replay_s=5.0)
    p = _partition(rate=1_000, since=10)
    p.pace.work.append((NOW - 5.0, 5.0))  # checkpoints took all the recent time
    assert checkpoint_reason(bounded, p, NOW) is not None  # 60 s since the last one
    p.last_checkpoint = NOW - 1.0
    assert checkpoint_reason(bounded, p, NOW) is None
    p.records_since_checkpoint = 100
    reason = checkpoint_reason(bounded, p, NOW)
    assert reason is not None and "LHV_CHECKPOINT_RECORDS" in reason
    p.dirty.clear()
    p.applied_offset = p.checkpoint_offset
    assert checkpoint_reason(bounded, p, NOW) is None, "nothing changed"


def test_the_budget_and_the_share_come_from_the_environment() -> None:
    default = WorkerConfig.from_env({"LHV_S3_BUCKET": "b"}).checkpoint
    assert (default.max_replay_s, default.max_time_share) == (4.0, 0.1)
    env = {
        "LHV_S3_BUCKET": "b",
        "LHV_CHECKPOINT_MAX_REPLAY_S": "0",
        "LHV_CHECKPOINT_MAX_TIME_SHARE": "0.25",
    }
    policy = WorkerConfig.from_env(env).checkpoint
    assert (policy.max_replay_s, policy.max_time_share) == (0.0, 0.25)
    with pytest.raises(ValueError, match="max_time_share"):
        CheckpointPolicy(max_time_share=0)


async def test_a_worker_checkpoints_for_its_replay_budget_and_logs_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(partitions=1)
    cluster.command("docs", {"op": "create", "dim": 4, "space": "l2"})
    vecs = np.random.default_rng(1).normal(size=(50, 4))
    items = [{"id": f"v{i}", "vector": [float(x) for x in vecs[i]]} for i in range(50)]
    cluster.command("docs", {"op": "add", "items": items})
    # bounds far away: only the (tiny) replay budget can start a checkpoint
    policy = CheckpointPolicy(
        every_records=10**6, every_s=3600.0, max_replay_s=1e-9, max_time_share=1.0
    )
    caplog.set_level(logging.INFO, logger="worker.service.ownership")
    caplog.handler.addFilter(ContextFilter())
    async with cluster.worker("a", checkpoint=policy) as (a, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, a), "a applies")
        part = a.partitions[0]
        await eventually(
            lambda: part.checkpoint_offset == cluster.end(0) - 1 and not part.checkpoint_in_flight,
            "a checkpoint covers the log",
        )
    started = [r for r in caplog.records if r.getMessage().startswith("checkpoint started")]
    assert started and "over the budget" in started[0].getMessage()
    assert getattr(started[0], "partition", None) == 0


async def test_a_worker_without_a_replay_budget_waits_for_its_bounds() -> None:
    cluster = Cluster(partitions=1)
    cluster.command("docs", {"op": "create", "dim": 4, "space": "l2"})
    policy = CheckpointPolicy(every_records=3, every_s=3600.0, max_replay_s=0)
    async with cluster.worker("a", checkpoint=policy) as (a, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, a), "a applies")
        part = a.partitions[0]
        assert part.checkpoint_offset == -1 and not part.checkpoint_in_flight
        for k in range(2):
            cluster.command(
                "docs", {"op": "add", "items": [{"id": f"x{k}", "vector": [1, 2, 3, k]}]}
            )
        await eventually(
            lambda: part.checkpoint_offset == 2 and not part.checkpoint_in_flight,
            "the records bound starts one",
        )


def test_a_batch_is_kept_to_a_quarter_of_the_replay_budget() -> None:
    pace = Pace()
    assert pace.batch_bytes(4.0) is None, "nothing measured: the usual bound"
    pace.applied(1_000, 2.0, nbytes=8_000_000)  # 4 MB per second of apply
    assert pace.batch_bytes(4.0) == pytest.approx(4_000_000, rel=1e-6)
    assert pace.batch_bytes(0.0) is None, "no budget: the usual bound"


async def test_a_worker_applies_in_smaller_batches_under_a_small_replay_budget() -> None:
    cluster = Cluster(partitions=1)
    rng = np.random.default_rng(2)

    def add(k: int) -> None:  # about 16 KB of JSON
        vecs = rng.normal(size=(100, 8))
        items = [{"id": f"v{k}-{j}", "vector": [float(x) for x in vecs[j]]} for j in range(100)]
        cluster.command("docs", {"op": "add", "items": items})

    def batches(worker: Any) -> float:
        (count,) = [
            s.value
            for s in worker.metrics.apply_records.collect()[0].samples
            if s.name.endswith("_count")
        ]
        return float(count)

    cluster.command("docs", {"op": "create", "dim": 8, "space": "l2"})
    add(0)
    tiny = CheckpointPolicy(
        every_records=10**6, every_s=3600.0, max_replay_s=1e-9, max_time_share=1.0
    )
    async with cluster.worker("a", checkpoint=tiny) as (a, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, a), "a applies the first batch")
        before = batches(a)
        for k in range(1, 41):  # 640 KB: one or two batches under the usual bounds
            add(k)
        await eventually(caught_up(cluster, a), "a applies the rest")
        assert batches(a) - before >= 8, "batches of the smallest size, 64 KiB"
        assert len(a.partitions[0].indexes["docs"]) == 4_100
