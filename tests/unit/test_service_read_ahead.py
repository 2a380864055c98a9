"""What a worker reads ahead of its apply threads stays within its byte bounds, per
partition (`LHV_MAX_PENDING_BYTES`) and over all its partitions together
(`LHV_MAX_READ_AHEAD_BYTES`), however much one poll returns; and every record is still
applied once, in order."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from servicekit import Cluster, caught_up, eventually

from worker.service.runner import records_within
from worker.wire.topics import home_partition

PER_PARTITION = 120_000
IN_ALL = 160_000
RECORDS = 40
ITEMS = 50


def _one_name_per_partition(partitions: int) -> list[str]:
    names: dict[int, str] = {}
    i = 0
    while len(names) < partitions:
        name = f"idx{i}"
        names.setdefault(home_partition(name.encode(), partitions), name)
        i += 1
    return [names[p] for p in range(partitions)]


def _add(rng: np.random.Generator, r: int) -> dict[str, Any]:
    vecs = rng.normal(size=(ITEMS, 64)).astype("<f4")
    items = [
        {"id": f"r{r}-{i}", "vector_b64": base64.b64encode(v.tobytes()).decode()}
        for i, v in enumerate(vecs)
    ]
    return {"op": "add", "items": items}


async def test_read_ahead_never_exceeds_its_byte_bounds_and_every_record_is_applied() -> None:
    cluster = Cluster(partitions=2)
    names = _one_name_per_partition(2)
    rng = np.random.default_rng(7)
    for name in names:
        cluster.command(name, {"op": "create", "dim": 64, "space": "l2", "engine": "exact"})
        for r in range(RECORDS):  # ~19 KB each: ~0.75 MB per partition, all in one poll
            cluster.command(name, _add(rng, r))
    async with cluster.worker(
        "a",
        max_pending_bytes=PER_PARTITION,
        max_read_ahead_bytes=IN_ALL,
        max_batch_bytes=40_000,
    ) as (w, client, _):
        seen: list[tuple[int, int]] = []  # (all partitions, the largest one) after each poll
        route = w._route_commands

        def spy(tp: Any, records: list[Any]) -> None:
            route(tp, records)
            pending = [r.pending_bytes for r in w._runners.values()]
            seen.append((sum(pending), max(pending)))

        w._route_commands = spy  # type: ignore[method-assign]
        await client.assign([0, 1])
        await eventually(caught_up(cluster, w), "both partitions applied", timeout_s=60)
        for p, name in enumerate(names):
            assert len(w.partitions[p].indexes[name]) == RECORDS * ITEMS
    assert len(seen) > 4  # the log was read in several polls, not one
    assert max(total for total, _ in seen) <= IN_ALL
    assert max(largest for _, largest in seen) <= PER_PARTITION


class _Rec:
    def __init__(self, n: int) -> None:
        self.value = b"x" * n


def test_records_within_takes_what_fits_and_one_record_larger_than_the_room() -> None:
    recs = [_Rec(10), _Rec(10), _Rec(10)]
    assert records_within(recs, 25, at_least_one=False) == 2
    assert records_within(recs, 30, at_least_one=False) == 3
    assert records_within([_Rec(100)], 25, at_least_one=False) == 0
    assert records_within([_Rec(100), _Rec(1)], 25, at_least_one=True) == 1
