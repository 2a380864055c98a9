"""Sharded indexes over the in-memory log and blob store: the home creates the members
with signed forwarded records, splits plain-name writes among them exactly once (across a
restart of the home owner and beside a zombie), members refuse ids of other shards,
forged or unsigned forwarded records change nothing, and the catalog survives a
checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, caught_up, eventually

from lhv_index.errors import InvalidRequest
from worker.service import Worker
from worker.service.catalog import Sharded
from worker.service.protocol_auth import ProtocolAuth
from worker.wire.commands import decode_command
from worker.wire.limits import MessageLimits
from worker.wire.shards import shard_key, shard_of
from worker.wire.topics import home_partition

P = 4
KEY = "unit-test-internal-key-0123456789abcdef"


def _name_apart(shards: int) -> str:
    """A name whose members 1.. sit on partitions other than its home (member 0 always
    shares the home), so ownership of the home and of those members can be split."""
    name = "docs"
    assert shards <= P
    return name


def _create(cluster: Cluster, name: str, shards: int, reply: bytes | None = None) -> int:
    body = {"op": "create", "dim": 2, "space": "l2", "engine": "exact", "shards": shards}
    return cluster.command(name, body, reply=reply)


def _add(cluster: Cluster, name: str, ids: list[str], reply: bytes | None = None) -> int:
    items = [{"id": i, "vector": [1.0, float(n)], "metadata": {"n": n}} for n, i in enumerate(ids)]
    return cluster.command(name, {"op": "add", "items": items}, reply=reply)


def _members(workers: list[Worker], name: str, shards: int) -> dict[str, Any]:
    out = {}
    for s in range(shards):
        key = shard_key(name, s, shards)
        part = next(
            w.partitions[home_partition(key.encode(), P)]
            for w in workers
            if home_partition(key.encode(), P) in w.partitions
        )
        out[key] = part.indexes.get(key)
    return out


def _live(workers: list[Worker], name: str, shards: int) -> dict[str, list[float]]:
    live: dict[str, list[float]] = {}
    for key, index in _members(workers, name, shards).items():
        assert index is not None, f"member {key} missing"
        for id_, (vec, _meta, _clock) in index.logical_state()["live"].items():
            assert id_ not in live, f"{id_} in two members"
            assert shard_key(name, shard_of(id_, shards), shards) == key, f"{id_} in {key}"
            live[id_] = np.frombuffer(vec, dtype=np.float32).tolist()
    return live


def _all_caught_up(cluster: Cluster, workers: list[Worker]) -> Any:
    checks = [caught_up(cluster, w) for w in workers]
    return lambda: all(c() for c in checks)


def _dlq(cluster: Cluster) -> list[tuple[str, str]]:
    out = []
    for rec in cluster.broker.records(TOPICS.dlq):
        headers = dict(rec.headers)
        out.append((headers["lhv_error_code"].decode(), headers["lhv_error_message"].decode()))
    return out


# -- create -------------------------------------------------------------------------------


async def test_a_sharded_create_makes_each_member_and_acks_with_the_forwarded_offsets() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(3)
    _create(cluster, name, 3, reply=b"c")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"c" in cluster.replies(), "the create's ack")
        ack = cluster.replies()[b"c"]
        assert ack["status"] == "ok" and ack["applied"] == 1, ack
        assert set(ack["forwarded"]) == {f"{name}#0", f"{name}#1", f"{name}#2"}
        for key, offset in ack["forwarded"].items():
            rec = cluster.broker.records(TOPICS.commands, home_partition(key.encode(), P))
            assert [r.key for r in rec if r.offset == offset] == [key.encode()]
        await eventually(_all_caught_up(cluster, [w]), "members applied")
        home = w.partitions[home_partition(name.encode(), P)]
        assert isinstance(home.catalog[name], Sharded) and home.catalog[name].shards == 3
        assert name not in home.indexes
        for key, index in _members([w], name, 3).items():
            assert index is not None and index.params.dim == 2
            assert w.partitions[home_partition(key.encode(), P)].members[key] == 3
        _create(cluster, name, 3, reply=b"again")
        _create(cluster, name, 4, reply=b"other")
        await eventually(lambda: b"other" in cluster.replies(), "the other creates' acks")
        again, other = cluster.replies()[b"again"], cluster.replies()[b"other"]
        assert again["status"] == "ok" and again["skipped"] == 1 and "forwarded" not in again
        assert other["error"]["code"] == "index_exists"


async def test_a_sharded_create_is_weighed_at_its_home_and_its_members_always_get_room() -> None:
    """With LHV_MAX_INDEXES_PER_PARTITION, a sharded index counts at its home as its
    members' share of one partition (ceil(S / P)) and is refused there whole; the members
    the home creates are never refused for room (that would leave it half-created), even
    on a partition that is full."""
    cluster = Cluster(partitions=P)
    name = "docs"
    home = home_partition(name.encode(), P)
    full = home_partition(shard_key(name, 1, P).encode(), P)
    fillers = [n for n in (f"f{i}" for i in range(500)) if home_partition(n.encode(), P) == full]
    for n in fillers[:2]:
        cluster.command(n, {"op": "create", "dim": 2})
    _create(cluster, name, P, reply=b"fits")  # share 1 at its home
    _create(cluster, "docs2", 3 * P, reply=b"big")  # share 3: over 2 wherever its home is
    async with cluster.worker("a", max_indexes_per_partition=2) as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"big" in cluster.replies(), "the creates' acks")
        await eventually(_all_caught_up(cluster, [w]), "members applied")
        fits, big = cluster.replies()[b"fits"], cluster.replies()[b"big"]
        assert fits["status"] == "ok" and len(fits["forwarded"]) == P, fits
        assert all(index is not None for index in _members([w], name, P).values())
        assert len(w.partitions[full].indexes) > 2  # the full partition took its member
        assert big["error"]["code"] == "invalid_request", big
        assert "LHV_MAX_INDEXES_PER_PARTITION" in big["error"]["message"]
        assert "docs2" not in w.partitions[home_partition(b"docs2", P)].catalog
        assert not any("docs2#" in i for part in w.partitions.values() for i in part.indexes)
        assert isinstance(w.partitions[home].catalog[name], Sharded)


async def test_describe_answers_from_the_homes_catalog() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2)
    cluster.command("plain", {"op": "create", "dim": 2})
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(_all_caught_up(cluster, [w]), "applied")
        for key in (name, f"{name}#1", "plain", "nothing"):
            cluster.query(key, {"op": "describe"}, key.encode())
        await eventually(lambda: b"nothing" in cluster.replies(), "the replies")
        replies = cluster.replies()
        assert replies[name.encode()]["kind"] == "sharded"
        assert replies[name.encode()]["shards"] == 2
        assert replies[name.encode()]["params"]["dim"] == 2
        member = replies[f"{name}#1".encode()]
        assert member["kind"] == "index" and member["of"] == {"index": name, "shards": 2}
        assert member["shard"] == 1
        assert replies[b"plain"]["kind"] == "index" and replies[b"plain"]["shards"] == 1
        assert replies[b"nothing"]["error"]["code"] == "index_not_found"


@pytest.mark.parametrize("shards", [0, -1, 2.5, "2", 1025])
def test_a_create_with_bad_shards_is_an_invalid_request(shards: object) -> None:
    body = {"op": "create", "index": "docs", "dim": 2, "shards": shards}
    with pytest.raises(InvalidRequest, match="shards"):
        decode_command(b"docs", orjson.dumps(body), [], limits=MessageLimits())


def test_max_shards_is_a_limit_of_its_own() -> None:
    body = {"op": "create", "index": "docs", "dim": 2, "shards": 9}
    with pytest.raises(InvalidRequest, match="max_shards"):
        decode_command(b"docs", orjson.dumps(body), [], limits=MessageLimits(max_shards=8))
    cmd = decode_command(b"docs", orjson.dumps(body), [], limits=MessageLimits(max_shards=9))
    assert cmd.shards == 9 and "shards" not in cmd.params  # type: ignore[union-attr]


async def test_an_unsigned_create_or_drop_of_a_member_name_is_refused_and_changes_nothing() -> None:
    cluster = Cluster(partitions=P)
    cluster.command("docs#1", {"op": "create", "dim": 2, "shards": 2}, reply=b"c")
    cluster.command("docs#1", {"op": "drop"}, reply=b"d")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"d" in cluster.replies(), "the acks")
        for cid in (b"c", b"d"):
            assert cluster.replies()[cid]["error"]["code"] == "invalid_request"
        assert all(not part.indexes for part in w.partitions.values())
        assert [code for code, _ in _dlq(cluster)] == ["invalid_request"] * 2


# -- forwarded records --------------------------------------------------------------------


def _forged(cluster: Cluster, key: str, body: dict[str, Any], mac: str | None) -> None:
    value = orjson.dumps({"index": key, **body})
    headers: list[tuple[str, bytes]] = []
    if mac == "wrong":
        other = ProtocolAuth([b"another-key-0123456789abcdef"], TOPICS.commands)
        headers = [other.header(key.encode(), value)]
    cluster.broker.produce(TOPICS.commands, key.encode(), value, headers=headers)


@pytest.mark.parametrize("mac", [None, "wrong"])
async def test_a_forged_forwarded_record_is_refused_and_changes_nothing(mac: str | None) -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2)
    origin = {"partition": 0, "offset": 10**9, "part": 0}
    member = f"{name}#0"
    _forged(cluster, member, {"op": "drop", "origin": origin}, mac)
    _forged(cluster, f"{name}#5", {"op": "create", "dim": 2, "shards": 6, "origin": origin}, mac)
    item = [{"id": "x", "vector": [1.0, 1.0]}]
    _forged(cluster, member, {"op": "add", "items": item, "origin": origin}, mac)
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(_all_caught_up(cluster, [w]), "applied")
        dlq = _dlq(cluster)
        assert [code for code, _ in dlq] == ["invalid_request"] * 3, dlq
        assert all("forwarded record" in message for _, message in dlq)
        members = _members([w], name, 2)
        assert all(index is not None and len(index) == 0 for index in members.values())
        assert all(not part.forwarded.get(0) for part in w.partitions.values())


async def test_a_member_refuses_a_record_with_an_id_of_another_shard() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2)
    ids = [f"id{i}" for i in range(40)]
    mine = [i for i in ids if shard_of(i, 2) == 0]
    theirs = next(i for i in ids if shard_of(i, 2) == 1)
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(_all_caught_up(cluster, [w]), "members created")
        _add(cluster, f"{name}#0", mine, reply=b"ok")
        _add(cluster, f"{name}#0", [*mine[:3], theirs], reply=b"bad")
        await eventually(lambda: b"bad" in cluster.replies(), "the acks")
        assert cluster.replies()[b"ok"]["applied"] == len(mine)
        bad = cluster.replies()[b"bad"]
        assert bad["error"]["code"] == "wrong_partition" and bad["error"]["item"] == 3
        assert theirs in bad["error"]["message"] and f"{name}#1" in bad["error"]["message"]
        await eventually(_all_caught_up(cluster, [w]), "applied")
        assert sorted(_live([w], name, 2)) == sorted(mine)


async def test_plain_name_writes_are_split_among_the_members_and_acked_with_their_offsets() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(3)
    _create(cluster, name, 3)
    ids = [f"id{i}" for i in range(60)]
    _add(cluster, name, ids, reply=b"add")
    cluster.command(name, {"op": "delete", "ids": ids[:10]}, reply=b"del")
    bad = [{"id": "z", "vector": [1.0, 2.0]}, {"id": "y", "vector": [1.0, 2.0, 3.0]}]
    cluster.command(name, {"op": "add", "items": bad}, reply=b"bad")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"bad" in cluster.replies(), "the acks")
        await eventually(_all_caught_up(cluster, [w]), "applied")
        add = cluster.replies()[b"add"]
        assert add["status"] == "ok" and add["applied"] == 0
        assert set(add["forwarded"]) == {shard_key(name, shard_of(i, 3), 3) for i in ids}
        assert cluster.replies()[b"bad"]["error"]["code"] == "dim_mismatch"
        live = _live([w], name, 3)
        assert sorted(live) == sorted(ids[10:])
        assert live["id12"] == [1.0, 12.0]


async def test_forwarding_retries_until_the_broker_takes_the_records() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2, reply=b"c")
    async with cluster.worker("a") as (w, client, _):
        client.fail_sends = 3
        await client.assign(range(P))
        await eventually(lambda: b"c" in cluster.replies(), "the ack", timeout_s=30)
        assert cluster.replies()[b"c"]["status"] == "ok"
        await eventually(_all_caught_up(cluster, [w]), "applied")
        assert all(index is not None for index in _members([w], name, 2).values())


# -- exactly once ---------------------------------------------------------------------------


def _forward_count(cluster: Cluster, name: str) -> int:
    return sum(
        1
        for rec in cluster.broker.records(TOPICS.commands)
        if rec.key is not None
        and rec.key.startswith(f"{name}#".encode())
        and b'"origin"' in (rec.value or b"")
    )


async def test_forwards_made_again_after_a_restart_of_the_home_owner_are_skipped() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(3)
    home = home_partition(name.encode(), P)
    others = [p for p in range(P) if p != home]
    _create(cluster, name, 3)
    ids = [f"id{i}" for i in range(90)]
    for n in range(3):
        _add(cluster, name, ids[n * 30 : (n + 1) * 30])
    async with cluster.worker("members") as (m, client_m, _):
        await client_m.assign(others)
        async with cluster.worker("first") as (a, client_a, _):
            await client_a.assign([home])
            await eventually(_all_caught_up(cluster, [a, m]), "the first owner forwarded")
            first = _forward_count(cluster, name)
            # the first owner dies before it checkpoints: nothing of it is durable
            a.forget_partition(home)
            a.partitions.pop(home)
        assert cluster.broker.committed("lhv").get(TopicPartition(TOPICS.commands, home)) is None
        async with cluster.worker("second") as (b, client_b, _):
            await client_b.assign([home])
            await eventually(_all_caught_up(cluster, [b, m]), "the second owner replayed")
            assert _forward_count(cluster, name) == 2 * first, "everything was forwarded twice"
            await eventually(_all_caught_up(cluster, [b, m]), "duplicates applied (skipped)")
            live = _live([m, b], name, 3)
            assert sorted(live) == sorted(ids)
            for key, index in _members([m, b], name, 3).items():
                clocks = {c[1] for _, _, c in index.logical_state()["live"].values()}
                number = home_partition(key.encode(), P)
                part = (m if number in m.partitions else b).partitions[number]
                firsts = {
                    r.offset
                    for r in cluster.broker.records(TOPICS.commands, part.number)
                    if r.key == key.encode()
                }
                assert clocks <= firsts  # written by the first forwards only
                assert part.forwarded[home][0] >= 0


async def test_a_zombie_home_owners_forwards_are_skipped() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    home = home_partition(name.encode(), P)
    others = [p for p in range(P) if p != home]
    _create(cluster, name, 2)
    async with cluster.worker("members") as (m, client_m, _):
        await client_m.assign(others)
        async with cluster.worker("zombie") as (z, client_z, _):
            await client_z.assign([home])
            await eventually(_all_caught_up(cluster, [z, m]), "the zombie created")
            async with cluster.worker("owner") as (o, client_o, _):
                await client_o.assign([home])  # the group moved it; the zombie was not told
                ids = [f"id{i}" for i in range(50)]
                _add(cluster, name, ids[:25])
                cluster.command(name, {"op": "delete", "ids": ids[:5]})
                _add(cluster, name, ids[25:])
                await eventually(_all_caught_up(cluster, [z, o, m]), "all applied")
                await eventually(
                    lambda: _forward_count(cluster, name) >= 2 * 2 + 3 * 2 * 2,
                    "both forwarded every write",
                )
                await eventually(_all_caught_up(cluster, [m]), "members applied")
                assert sorted(_live([m, o, z], name, 2)) == sorted(ids[5:])
                for index in _members([m, o, z], name, 2).values():
                    assert len(index.logical_state()["tombstones"]) <= 5


# -- persistence ----------------------------------------------------------------------------


async def test_the_catalog_members_and_marks_survive_a_checkpoint_and_a_new_owner() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2)
    ids = [f"id{i}" for i in range(20)]
    _add(cluster, name, ids)
    async with cluster.worker("a") as (a, client_a, _):
        await client_a.assign(range(P))
        await eventually(_all_caught_up(cluster, [a]), "applied")
        await client_a.assign([])  # revoke: checkpoint every partition
    manifests = [
        orjson.loads(v) for k, v in cluster.blobs.objects.items() if k.endswith("manifest.json")
    ]
    assert {m["format"] for m in manifests if m.get("catalog") or m.get("members")} == {3}
    async with cluster.worker("b") as (b, client_b, _):
        await client_b.assign(range(P))
        await eventually(_all_caught_up(cluster, [b]), "restored")
        home = b.partitions[home_partition(name.encode(), P)]
        assert home.catalog == {name: Sharded(2, home.catalog[name].params)}  # type: ignore[union-attr]
        assert sorted(_live([b], name, 2)) == sorted(ids)
        theirs = next(i for i in ids if shard_of(i, 2) == 1)
        _add(cluster, f"{name}#0", [theirs], reply=b"bad")
        _add(cluster, name, ["new"], reply=b"new")
        await eventually(lambda: b"new" in cluster.replies(), "the acks")
        assert cluster.replies()[b"bad"]["error"]["code"] == "wrong_partition"
        await eventually(_all_caught_up(cluster, [b]), "applied")
        assert "new" in _live([b], name, 2)


# -- aliases ----------------------------------------------------------------------------------


async def test_writes_keyed_by_an_alias_reach_its_target_and_a_switch_moves_them() -> None:
    cluster = Cluster(partitions=P)
    sharded = _name_apart(2)
    _create(cluster, sharded, 2)
    cluster.command("plain", {"op": "create", "dim": 2, "space": "l2"})
    cluster.command("current", {"op": "alias", "target": "plain"}, reply=b"alias")
    _add(cluster, "current", ["a", "b"], reply=b"w1")
    cluster.command("current", {"op": "alias", "target": sharded}, reply=b"switch")
    _add(cluster, "current", ["c", "d"], reply=b"w2")
    cluster.command("current", {"op": "delete", "ids": ["c"]}, reply=b"w3")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"w3" in cluster.replies(), "the acks")
        replies = cluster.replies()
        assert replies[b"alias"]["status"] == "ok" and replies[b"switch"]["status"] == "ok"
        # each write is acked where it lands: by the plain index, by the sharded home
        assert replies[b"w1"]["status"] == "ok" and replies[b"w1"]["applied"] == 2
        assert replies[b"w2"]["forwarded"].keys() <= {f"{sharded}#0", f"{sharded}#1"}
        assert replies[b"w2"]["forwarded"]
        await eventually(_all_caught_up(cluster, [w]), "applied")
        plain = w.partitions[home_partition(b"plain", P)].indexes["plain"]
        assert sorted(plain.logical_state()["live"]) == ["a", "b"]
        assert sorted(_live([w], sharded, 2)) == ["d"]
        cluster.query("current", {"op": "describe"}, b"describe")
        await eventually(lambda: b"describe" in cluster.replies(), "describe")
        assert cluster.replies()[b"describe"]["kind"] == "alias"
        assert cluster.replies()[b"describe"]["target"] == sharded


async def test_alias_errors_shadowing_chain_unalias_create_and_drop() -> None:
    cluster = Cluster(partitions=P)
    sharded = _name_apart(2)
    _create(cluster, sharded, 2)
    cluster.command("plain", {"op": "create", "dim": 2})
    cluster.command("plain", {"op": "alias", "target": sharded}, reply=b"shadow-index")
    cluster.command(sharded, {"op": "alias", "target": "plain"}, reply=b"shadow-sharded")
    cluster.command("self", {"op": "alias", "target": "self"}, reply=b"self")
    cluster.command("member", {"op": "alias", "target": f"{sharded}#0"}, reply=b"member")
    cluster.command("first", {"op": "alias", "target": "second"}, reply=b"first")
    cluster.command("second", {"op": "alias", "target": "plain"}, reply=b"second")
    _add(cluster, "first", ["x"], reply=b"chain")
    cluster.command("plain", {"op": "unalias"}, reply=b"unalias-index")
    cluster.command("first", {"op": "create", "dim": 2}, reply=b"create")
    cluster.command("first", {"op": "drop"}, reply=b"drop")
    cluster.command("first", {"op": "unalias"}, reply=b"unalias")
    cluster.command("first", {"op": "unalias"}, reply=b"unalias-again")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        # "chain" is refused on the partition of "second", after a forward: its ack can
        # come after every other one
        asked = [b"shadow-index", b"shadow-sharded", b"self", b"member", b"first", b"second"]
        asked += [b"chain", b"unalias-index", b"create", b"drop", b"unalias", b"unalias-again"]
        await eventually(lambda: set(asked) <= set(cluster.replies()), "the acks")
        await eventually(_all_caught_up(cluster, [w]), "applied")
        await eventually(
            lambda: any("alias chain" in message for _, message in _dlq(cluster)),
            "the dead letter of the chain",
        )
        codes = {cid: r.get("error", {}).get("code", "ok") for cid, r in cluster.replies().items()}
        assert codes[b"shadow-index"] == codes[b"shadow-sharded"] == "index_exists"
        assert codes[b"self"] == codes[b"member"] == "invalid_request"
        assert codes[b"first"] == codes[b"second"] == "ok"
        assert codes[b"chain"] == "invalid_request"  # refused by "second", acked from there
        assert "alias chain" in cluster.replies()[b"chain"]["error"]["message"]
        plain = w.partitions[home_partition(b"plain", P)].indexes["plain"]
        assert len(plain) == 0, "nothing went through two aliases"
        assert codes[b"unalias-index"] == "index_not_found"
        assert codes[b"create"] == "index_exists"
        assert codes[b"drop"] == "invalid_request"
        assert codes[b"unalias"] == "ok" and codes[b"unalias-again"] == "index_not_found"


# -- drop and merge ---------------------------------------------------------------------------


async def test_dropping_a_sharded_index_drops_its_members_and_frees_the_name() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(3)
    _create(cluster, name, 3)
    _add(cluster, name, [f"id{i}" for i in range(30)])
    cluster.command(name, {"op": "drop"}, reply=b"drop")
    _create(cluster, name, 2, reply=b"again")
    _add(cluster, name, ["new"])
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"again" in cluster.replies(), "the acks")
        drop = cluster.replies()[b"drop"]
        assert drop["status"] == "ok" and len(drop["forwarded"]) == 3
        assert cluster.replies()[b"again"]["status"] == "ok"
        await eventually(_all_caught_up(cluster, [w]), "applied")
        assert f"{name}#2" not in {n for part in w.partitions.values() for n in part.indexes}
        assert sorted(_live([w], name, 2)) == ["new"]


async def test_a_merge_of_a_sharded_index_runs_per_member_into_the_destination() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2)
    cluster.command("dest", {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    ids = [f"id{i}" for i in range(20)]
    _add(cluster, name, ids)
    cluster.command(name, {"op": "merge", "dest": "dest", "clear_source": True}, reply=b"m")
    cluster.command("dest", {"op": "merge", "dest": name}, reply=b"into")
    async with cluster.worker("a") as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"m" in cluster.replies(), "the merge's ack")
        assert cluster.replies()[b"m"]["status"] == "ok"
        dest = w.partitions[home_partition(b"dest", P)]
        await eventually(
            lambda: sorted(dest.indexes["dest"].logical_state()["live"]) == sorted(ids),
            "every member merged into dest",
            timeout_s=30,
        )
        await eventually(lambda: not _live([w], name, 2), "the members were cleared")
        await eventually(lambda: b"into" in cluster.replies(), "the other merge's ack")
        assert cluster.replies()[b"into"]["status"] == "ok"  # into a sharded index


# -- sizes ------------------------------------------------------------------------------------


async def test_a_record_whose_forwards_would_be_over_the_size_bound_is_refused_whole() -> None:
    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    cluster.command(name, {"op": "create", "dim": 300, "engine": "exact", "shards": 2})
    items = [{"id": f"id{i}", "vector": [0] * 299 + [1]} for i in range(2)]
    size = len(orjson.dumps({"index": name, "op": "add", "items": items}))
    cluster.command(name, {"op": "add", "items": items}, reply=b"big")
    limits = MessageLimits(max_message_bytes=size + 200)
    async with cluster.worker("a", limits=limits) as (w, client, _):
        await client.assign(range(P))
        await eventually(lambda: b"big" in cluster.replies(), "the ack")
        ack = cluster.replies()[b"big"]
        assert (
            ack["error"]["code"] == "invalid_request"
            and "max_message_bytes" in ack["error"]["message"]
        )
        await eventually(_all_caught_up(cluster, [w]), "applied")
        assert _forward_count(cluster, name) == 2, "only the creates were forwarded"


async def test_a_forward_the_broker_refuses_fails_its_record_and_the_partition_goes_on() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    cluster = Cluster(partitions=P)
    name = _name_apart(2)
    _create(cluster, name, 2)
    async with cluster.worker("a") as (w, client, run):
        await client.assign(range(P))
        await eventually(_all_caught_up(cluster, [w]), "created")
        client.fail_sends, client.send_error = 1, MessageSizeTooLargeError("too large")
        _add(cluster, name, ["only"], reply=b"refused")
        _add(cluster, name, ["next"], reply=b"next")
        await eventually(lambda: b"next" in cluster.replies(), "the acks")
        assert cluster.replies()[b"refused"]["error"]["code"] == "invalid_request"
        assert cluster.replies()[b"next"]["status"] == "ok"
        await eventually(_all_caught_up(cluster, [w]), "applied")
        assert sorted(_live([w], name, 2)) == ["next"]
        assert not run.done()
