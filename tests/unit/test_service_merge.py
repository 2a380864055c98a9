"""The merge protocol inside a worker over the in-memory log and blob store: a merge
across partitions runs its three steps (export and `merge_in`, apply and `merge_done`,
clear and acknowledge) to completion, and its objects are collected."""

from __future__ import annotations

import numpy as np
import orjson
from servicekit import Cluster, caught_up, eventually

from worker.wire.topics import home_partition


def _names_on_two_partitions() -> tuple[str, str]:
    src = "src"
    dest = next(
        f"dest-{i}"
        for i in range(100)
        if home_partition(f"dest-{i}".encode(), 2) != home_partition(src.encode(), 2)
    )
    return src, dest


async def test_a_merge_across_partitions_runs_its_three_steps_to_completion() -> None:
    cluster = Cluster(partitions=2)
    src, dest = _names_on_two_partitions()
    for name in (src, dest):
        cluster.command(name, {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    cluster.command(
        src,
        {"op": "add", "items": [{"id": f"s{i}", "vector": [1.0, float(i)]} for i in range(5)]},
    )
    cluster.command(dest, {"op": "add", "items": [{"id": "s0", "vector": [9.0, 9.0]}]})
    async with cluster.worker("a") as (w, client, _):
        await client.assign([0, 1])
        await eventually(caught_up(cluster, w), "the indexes are applied")
        cluster.command(src, {"op": "merge", "dest": dest, "clear_source": True}, reply=b"m")
        await eventually(lambda: b"m" in cluster.replies(), "the merge's ack", timeout_s=30)
        ack = cluster.replies()[b"m"]
        assert ack["status"] == "ok", ack
        assert ack["applied"] == 4 and ack["skipped"] == 1
        ops = [
            _op(rec.value) for p in range(2) for rec in cluster.broker.records("lhv.commands", p)
        ]
        assert ops.count("merge_in") == 1 and ops.count("merge_done") == 1
        await eventually(caught_up(cluster, w), "every step applied")
        src_part = w.partitions[home_partition(src.encode(), 2)]
        dest_part = w.partitions[home_partition(dest.encode(), 2)]
        assert len(src_part.indexes[src]) == 0, "the source was cleared"
        live = dest_part.indexes[dest].logical_state()["live"]
        assert sorted(live) == [f"s{i}" for i in range(5)]
        kept = np.frombuffer(live["s0"][0], dtype=np.float32)
        assert kept.tolist() == [9.0, 9.0], "an id live in dest keeps dest's item"
        await eventually(
            lambda: not [k for k in cluster.blobs.objects if "merges/" in k],
            "export and marker collected",
            timeout_s=30,
        )


def _op(value: bytes | None) -> str:
    return str(orjson.loads(value or b"{}").get("op"))
