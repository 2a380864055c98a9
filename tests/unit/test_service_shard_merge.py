"""Merges into a sharded index over the in-memory log and blob store: the destination's
home forwards `merge_in` to every member, each member takes the exported items of its
shard and answers its own `merge_done`, the source clears exactly that shard's ids; any
shard counts on both sides, refusals before anything is applied, and a crash of each
party between the steps converging to the same result."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from servicekit import REPLIES, TOPICS, Cluster, caught_up, eventually

from worker.service import Worker, merge
from worker.storage.blobstore import BlobStoreError
from worker.wire.shards import shard_key
from worker.wire.topics import home_partition

P = 8


def _home(key: str) -> int:
    return home_partition(key.encode(), P)


def _parts(name: str, shards: int) -> set[int]:
    keys = [name] if shards <= 1 else [shard_key(name, s, shards) for s in range(shards)]
    return {_home(k) for k in keys}


def _names(prefix: str) -> Iterator[str]:
    return (f"{prefix}{i}" for i in range(10_000))


def _create(cluster: Cluster, name: str, shards: int, *, dim: int = 2, space: str = "l2") -> None:
    body: dict[str, Any] = {"op": "create", "dim": dim, "space": space, "engine": "exact"}
    if shards > 1:
        body["shards"] = shards
    cluster.command(name, body)


def _add(cluster: Cluster, name: str, ids: list[str], value: float) -> None:
    items = [{"id": i, "vector": [value, float(n)]} for n, i in enumerate(ids)]
    cluster.command(name, {"op": "add", "items": items})


def _live(workers: list[Worker], name: str, shards: int) -> dict[str, list[float]]:
    """Live items of `name` (every member), id -> vector; each id in its own shard."""
    keys = [name] if shards <= 1 else [shard_key(name, s, shards) for s in range(shards)]
    out: dict[str, list[float]] = {}
    for key in keys:
        part = next(w.partitions[_home(key)] for w in workers if _home(key) in w.partitions)
        for id_, (vec, _meta, _clock) in part.indexes[key].logical_state()["live"].items():
            assert id_ not in out, f"{id_} live in two members"
            out[id_] = np.frombuffer(vec, dtype=np.float32).tolist()
    return out


def _all(cluster: Cluster, workers: list[Worker]) -> Callable[[], bool]:
    checks = [caught_up(cluster, w) for w in workers]
    return lambda: all(c() for c in checks)


def _acks(cluster: Cluster, cid: bytes) -> list[dict[str, Any]]:
    return [
        orjson.loads(rec.value)
        for rec in cluster.broker.records(REPLIES)
        if dict(rec.headers).get("kafka_correlationId") == cid and rec.value
    ]


def _objects(cluster: Cluster) -> list[str]:
    return [k for k in cluster.blobs.objects if "merges/" in k]


def _oracle(src: dict[str, list[float]], dest: dict[str, list[float]]) -> dict[str, list[float]]:
    """What the destination holds after the merge: its own items win."""
    return {**src, **dest}


def _merged(
    cluster: Cluster, workers: list[Worker], src: str, dest: str, expected: dict[str, list[float]]
) -> Callable[[], bool]:
    """The merge of unsharded `src` into `dest` (3 shards) is done: the workers caught up,
    `dest` holds `expected`, `src` is empty, and no merge object is left."""
    return lambda: (
        _all(cluster, workers)()
        and _live(workers, dest, 3) == expected
        and not _live(workers, src, 1)
        and not _objects(cluster)
    )


def _assert_acked(cluster: Cluster, applied: int, skipped: int) -> None:
    acks = _acks(cluster, b"m")
    assert acks and all(a["status"] == "ok" for a in acks), acks
    assert (acks[0]["applied"], acks[0]["skipped"]) == (applied, skipped)


# -- shard counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("src_shards", "dest_shards"), [(3, 2), (2, 3), (1, 3)])
async def test_a_merge_into_a_sharded_index_equals_the_oracle_and_clears_the_source(
    src_shards: int, dest_shards: int
) -> None:
    cluster = Cluster(partitions=P)
    src, dest = f"src{src_shards}", f"dest{dest_shards}"
    _create(cluster, src, src_shards)
    _create(cluster, dest, dest_shards)
    src_ids = [f"id{i}" for i in range(60)]
    dest_ids = [f"id{i}" for i in range(50, 70)]
    _add(cluster, src, src_ids, 1.0)
    _add(cluster, dest, dest_ids, 9.0)
    cluster.command(src, {"op": "merge", "dest": dest, "clear_source": True}, reply=b"m")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(_all(cluster, [w]), "the writes applied")
        await eventually(lambda: _acks(cluster, b"m") != [], "the merge's ack", timeout_s=30)
        before_src = {i: [1.0, float(n)] for n, i in enumerate(src_ids)}
        before_dest = {i: [9.0, float(n)] for n, i in enumerate(dest_ids)}
        expected = _oracle(before_src, before_dest)
        await eventually(
            lambda: _all(cluster, [w])() and _live([w], dest, dest_shards) == expected,
            "the destination equals the oracle",
            timeout_s=30,
        )
        await eventually(lambda: not _live([w], src, src_shards), "the source was cleared")
        await eventually(lambda: not _objects(cluster), "merge objects collected", timeout_s=30)
        acks = _acks(cluster, b"m")
        assert len(acks) == 1 and acks[0]["status"] == "ok", acks
        if src_shards == 1:  # the source itself acknowledges, once every shard is done
            assert (acks[0]["applied"], acks[0]["skipped"]) == (50, 10)


async def test_without_clear_source_the_source_keeps_its_items() -> None:
    cluster = Cluster(partitions=P)
    _create(cluster, "plain", 1)
    _create(cluster, "sharded", 3)
    ids = [f"k{i}" for i in range(40)]
    _add(cluster, "plain", ids, 2.0)
    cluster.command("plain", {"op": "merge", "dest": "sharded"}, reply=b"m")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: _acks(cluster, b"m") != [], "the merge's ack", timeout_s=30)
        ack = _acks(cluster, b"m")[0]
        assert ack["status"] == "ok" and ack["applied"] == 40, ack
        await eventually(_all(cluster, [w]), "applied")
        assert sorted(_live([w], "sharded", 3)) == sorted(ids)
        assert sorted(_live([w], "plain", 1)) == sorted(ids)


async def test_a_merge_keyed_by_an_alias_merges_its_target() -> None:
    cluster = Cluster(partitions=P)
    _create(cluster, "target", 2)
    _create(cluster, "into", 2)
    cluster.command("al", {"op": "alias", "target": "target"})
    _add(cluster, "target", ["a", "b", "c"], 1.0)
    cluster.command("al", {"op": "merge", "dest": "into", "clear_source": True}, reply=b"m")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: _acks(cluster, b"m") != [], "the merge's ack")
        assert _acks(cluster, b"m")[0]["status"] == "ok"
        await eventually(
            lambda: _all(cluster, [w])() and sorted(_live([w], "into", 2)) == ["a", "b", "c"],
            "merged through the alias",
            timeout_s=30,
        )
        await eventually(lambda: not _live([w], "target", 2), "the target was cleared")


# -- refusals ---------------------------------------------------------------------------------


async def test_refused_merges_into_a_sharded_index_change_nothing() -> None:
    cluster = Cluster(partitions=P)
    _create(cluster, "dest", 3)
    _create(cluster, "wide", 1, dim=3)
    _create(cluster, "cos", 1, space="cosine")
    _create(cluster, "ok", 1)
    cluster.command("alias-of-dest", {"op": "alias", "target": "dest"})
    _add(cluster, "dest", ["d0", "d1"], 9.0)
    cluster.command("wide", {"op": "add", "items": [{"id": "w", "vector": [1.0, 2.0, 3.0]}]})
    _add(cluster, "cos", ["c"], 1.0)
    _add(cluster, "ok", ["o"], 1.0)
    cluster.command("wide", {"op": "merge", "dest": "dest", "clear_source": True}, reply=b"dim")
    cluster.command("cos", {"op": "merge", "dest": "dest", "clear_source": True}, reply=b"space")
    cluster.command("ok", {"op": "merge", "dest": "alias-of-dest"}, reply=b"alias")
    cluster.command("ok", {"op": "merge", "dest": "nowhere"}, reply=b"unknown")
    cluster.command("dest#1", {"op": "merge", "dest": "dest"}, reply=b"self")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        cids = [b"dim", b"space", b"alias", b"unknown", b"self"]
        await eventually(
            lambda: all(_acks(cluster, c) for c in cids), "every refusal's ack", timeout_s=30
        )
        codes = {c: [a["error"]["code"] for a in _acks(cluster, c)] for c in cids}
        assert codes == {
            b"dim": ["dim_mismatch"],
            b"space": ["invalid_request"],
            b"alias": ["invalid_request"],
            b"unknown": ["index_not_found"],
            b"self": ["invalid_request"],
        }
        assert "alias" in _acks(cluster, b"alias")[0]["error"]["message"]
        await eventually(_all(cluster, [w]), "applied")
        assert sorted(_live([w], "dest", 3)) == ["d0", "d1"], "no member took anything"
        assert sorted(_live([w], "wide", 1)) == ["w"] and sorted(_live([w], "cos", 1)) == ["c"]
        dlq = [orjson.loads(r.value)["op"] for r in cluster.broker.records(TOPICS.dlq)]
        assert dlq.count("merge") == 5, dlq
        forwarded = [
            r
            for p in range(P)
            for r in cluster.broker.records(TOPICS.commands, p)
            if r.key is not None and r.key.startswith(b"dest#") and b'"merge_in"' in r.value
        ]
        assert not forwarded, "a refused merge_in is never forwarded"
        await eventually(lambda: not _objects(cluster), "merge objects collected", timeout_s=30)


# -- crashes ----------------------------------------------------------------------------------


def _layout() -> tuple[str, str]:
    """An unsharded source apart from a destination of three shards (member s is s
    partitions after the home, so member 0 shares the home's partition)."""
    dest = "dest"
    src = next(s for s in _names("s") if _home(s) not in _parts(dest, 3) | {_home(dest)})
    return src, dest


def _layout_created() -> tuple[Cluster, str, str]:
    """A cluster with `_layout()`'s source (unsharded) and destination (3 shards) created."""
    cluster = Cluster(partitions=P)
    src, dest = _layout()
    _create(cluster, src, 1)
    _create(cluster, dest, 3)
    return cluster, src, dest


def _ops(cluster: Cluster, p: int, op: str) -> int:
    return sum(
        1
        for r in cluster.broker.records(TOPICS.commands, p)
        if r.value is not None and orjson.loads(r.value).get("op") == op
    )


@pytest.mark.parametrize(
    "party", ["source", "home", "members", "source-at-merge-done", "home-after-completion"]
)
async def test_a_crash_of_each_party_between_the_steps_converges_to_the_oracle(
    party: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merge, "RESEND_AFTER_S", 1.0)
    monkeypatch.setattr(merge, "SWEEP_INTERVAL_S", 0.2)
    cluster, src, dest = _layout_created()
    src_ids = [f"id{i}" for i in range(80)]
    dest_ids = [f"id{i}" for i in range(70, 90)]
    _add(cluster, src, src_ids, 1.0)
    _add(cluster, dest, dest_ids, 9.0)
    cluster.command(src, {"op": "merge", "dest": dest, "clear_source": True}, reply=b"m")
    members = sorted(_parts(dest, 3) - {_home(dest)})  # member 0 crashes with the home
    crashing = {
        "source": [_home(src)],
        "home": [_home(dest)],
        "members": members,
        "source-at-merge-done": [_home(src)],
        "home-after-completion": [_home(dest)],
    }[party]
    first: list[Worker] = []
    # the step whose record shows the crashing party got that far
    step: Callable[[], bool] = {
        "source": lambda: _ops(cluster, _home(dest), "merge_in") >= 1,
        "home": lambda: sum(_ops(cluster, p, "merge_in") for p in members) >= 2,
        "members": lambda: _ops(cluster, _home(src), "merge_done") >= 1,
        "source-at-merge-done": lambda: (
            _ops(cluster, _home(src), "merge_done") >= 2 and caught_up(cluster, first[0])()
        ),
        # the home replays its merge_in (never checkpointed) after the merge completed
        "home-after-completion": lambda: bool(_acks(cluster, b"m")) and not _objects(cluster),
    }[party]
    rest = [p for p in range(P) if p not in crashing]
    async with cluster.worker("rest") as (r, client_r, _):
        await client_r.assign(rest)
        async with cluster.worker("first") as (a, client_a, _):
            first.append(a)
            await client_a.assign(crashing)
            await eventually(step, f"the {party} made its step", timeout_s=30)
            for p in crashing:  # dies: whatever no checkpoint covers is lost
                a.forget_partition(p)
                a.partitions.pop(p, None)
        async with cluster.worker("second") as (b, client_b, _):
            await client_b.assign(crashing)
            expected = _oracle(
                {i: [1.0, float(n)] for n, i in enumerate(src_ids)},
                {i: [9.0, float(n)] for n, i in enumerate(dest_ids)},
            )
            await eventually(
                _merged(cluster, [r, b], src, dest, expected),
                "the merge converged to the oracle and its objects are collected",
                timeout_s=60,
            )
            _assert_acked(cluster, 70, 10)


@pytest.mark.parametrize("when", ["a shard before the last", "the last, export removed"])
async def test_a_failed_cleanup_step_is_finished_by_the_members_sweeper(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merge, "RESEND_AFTER_S", 0.5)
    cluster = Cluster(partitions=P)
    _create(cluster, "from", 1)
    _create(cluster, "to", 3)
    ids = [f"f{i}" for i in range(30)]
    _add(cluster, "from", ids, 1.0)
    cluster.command("from", {"op": "merge", "dest": "to", "clear_source": True}, reply=b"m")
    store = cluster.blobs
    real_delete = store.delete
    failed: list[str] = []

    async def delete(key: str) -> None:
        member_marker = "/applied/" in key and "-s" in key.rsplit("/", 1)[-1]
        export_gone = not any("/exports/" in k for k in store.objects)
        wanted = export_gone if when.startswith("the last") else not export_gone
        if member_marker and wanted and not failed:
            failed.append(key)
            raise BlobStoreError(f"injected failure deleting {key}")
        await real_delete(key)

    monkeypatch.setattr(store, "delete", delete)
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(
            lambda: (
                bool(failed)
                and not _objects(cluster)
                and _all(cluster, [w])()
                and sorted(_live([w], "to", 3)) == sorted(ids)
                and not _live([w], "from", 1)
            ),
            "the merge completed and every object was removed",
            timeout_s=60,
        )
        acks = _acks(cluster, b"m")
        assert acks and all(a["status"] == "ok" and a["applied"] == 30 for a in acks), acks


async def test_the_sweeper_removes_a_home_marker_whose_merge_completed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(merge, "SWEEP_INTERVAL_S", 0.1)
    cluster = Cluster(partitions=P)
    _create(cluster, "dest", 3)
    topic = TOPICS.commands
    home = _home("dest")
    left = merge.marker_key(topic, home, merge.merge_id_of(5, 7))
    live = merge.marker_key(topic, home, merge.merge_id_of(5, 8))
    for key, offset in ((left, 7), (live, 8)):
        export = merge.export_key(topic, 5, offset)
        body = {"offset": 0, "forwarded": 3, "export": export}
        await cluster.blobs.put(key, orjson.dumps(body))
    await cluster.blobs.put(merge.export_key(topic, 5, 8), b"in flight")
    async with cluster.worker("a") as (_w, client, _):
        await client.assign(range(P))
        await eventually(lambda: left not in cluster.blobs.objects, "the stale marker removed")
        assert live in cluster.blobs.objects, "a merge in flight keeps its marker"


async def test_a_member_marker_cut_short_counts_as_absent_and_is_written_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty object where a member's marker goes (what SeaweedFS keeps of a PutObject
    whose writer was killed) neither fails the member's `merge_in` nor stops the sweeper:
    the step applies and writes the marker anew, and the merge completes."""
    monkeypatch.setattr(merge, "SWEEP_INTERVAL_S", 0.1)
    cluster, src, dest = _layout_created()
    src_ids = [f"id{i}" for i in range(40)]
    _add(cluster, src, src_ids, 1.0)
    merge_id = merge.merge_id_of(
        _home(src), len(cluster.broker.records(TOPICS.commands, _home(src)))
    )
    member = shard_key(dest, 2, 3)
    cut = merge.marker_key(TOPICS.commands, _home(member), merge_id, 2)
    await cluster.blobs.put(cut, b"")
    cluster.command(src, {"op": "merge", "dest": dest, "clear_source": True}, reply=b"m")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        expected = _oracle({i: [1.0, float(n)] for n, i in enumerate(src_ids)}, {})
        await eventually(
            _merged(cluster, [w], src, dest, expected),
            "the merge completed and its objects were collected",
            timeout_s=30,
        )
        _assert_acked(cluster, 40, 0)
