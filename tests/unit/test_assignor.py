"""The group's assignor: co-partitioned, balanced, sticky, warm first, standbys, and
tolerant of members that do not speak its protocol."""

from __future__ import annotations

import random

from aiokafka.coordinator.protocol import ConsumerProtocol, ConsumerProtocolMemberMetadata

from worker.kafka.assignor import (
    MAX_REPORTED,
    Held,
    Role,
    StandbyAssignor,
    decode_assignment,
    decode_subscription,
    encode_assignment,
    encode_subscription,
    plan,
)

TOPICS = ["lhv.commands", "lhv.search"]


class _Cluster:
    """The one call an assignor makes on aiokafka's `ClusterMetadata`."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self._partitions.get(topic)
        return None if n is None else set(range(n))


def _active(*ps: int, offset: int = 10) -> dict[int, Held]:
    return {p: Held(Role.ACTIVE, offset) for p in ps}


def _member(held: dict[int, Held] | None, topics: list[str] = TOPICS) -> bytes:
    user_data = encode_subscription(held) if held is not None else b""
    data: bytes = ConsumerProtocolMemberMetadata(0, topics, user_data).encode()
    return data


def _assign(
    members: dict[str, bytes], *, replicas: int = 1, partitions: int = 6
) -> dict[str, tuple[dict[str, list[int]], frozenset[int] | None]]:
    """Run the assignor as aiokafka's leader does: decode the members' metadata, assign,
    encode, and decode each member's assignment again."""
    decoded = {m: ConsumerProtocol.METADATA.decode(data) for m, data in members.items()}
    result = StandbyAssignor(replicas=replicas).assign(
        _Cluster(dict.fromkeys(TOPICS, partitions)), decoded
    )
    out = {}
    for m, a in result.items():
        wire = ConsumerProtocol.ASSIGNMENT.decode(a.encode())
        out[m] = (dict(wire.assignment), decode_assignment(wire.user_data))
    return out


def test_partition_p_of_every_topic_goes_to_one_member() -> None:
    got = _assign({"a": _member({}), "b": _member({}), "c": _member({})}, partitions=7)
    for topics, _ in got.values():
        assert topics["lhv.commands"] == topics["lhv.search"]
    owned = sorted(p for topics, _ in got.values() for p in topics["lhv.commands"])
    assert owned == list(range(7))


def test_every_member_owns_floor_or_ceil_of_the_partitions() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n_parts = rng.randint(0, 24)
        names = [f"m{i}" for i in range(rng.randint(1, 6))]
        reports = {
            m: {
                p: Held(rng.choice(list(Role)), rng.randint(-1, 100))
                for p in rng.sample(range(n_parts), rng.randint(0, n_parts))
            }
            for m in names
        }
        plans = plan(range(n_parts), reports, replicas=rng.randint(0, 3))
        sizes = [len(pl.partitions) for pl in plans.values()]
        assert sum(sizes) == n_parts
        assert max(sizes) - min(sizes) <= 1
        assert sorted(p for pl in plans.values() for p in pl.partitions) == list(range(n_parts))


def test_a_member_keeps_the_partitions_it_owned_when_one_joins() -> None:
    before = {"a": _active(0, 1, 2), "b": _active(3, 4, 5)}
    plans = plan(range(6), {**before, "c": {}}, replicas=0)
    assert set(plans["a"].partitions) <= {0, 1, 2}
    assert set(plans["b"].partitions) <= {3, 4, 5}
    assert len(plans["c"].partitions) == 2


def test_an_orphan_partition_goes_to_the_most_advanced_warm_member() -> None:
    reports = {
        "a": {**_active(0, 1), 2: Held(Role.STANDBY, 40)},
        "b": {**_active(3), 2: Held(Role.STANDBY, 90)},
        "c": _active(4, 5),
    }
    plans = plan(range(6), reports, replicas=1)
    assert 2 in plans["b"].partitions


def test_an_owner_that_must_give_up_a_partition_gives_one_held_warm_elsewhere() -> None:
    reports = {"a": _active(0, 1, 2, 3), "b": {2: Held(Role.STANDBY, 5)}}
    plans = plan(range(4), reports, replicas=1)
    assert 2 in plans["b"].partitions
    assert 2 not in plans["a"].partitions


def test_after_the_owner_dies_the_survivor_takes_over_from_its_standbys() -> None:
    # a owned 0-2 and kept standbys of 3-5; b owned 3-5 and died
    survivor = {**_active(0, 1, 2), **{p: Held(Role.STANDBY, 100 + p) for p in (3, 4, 5)}}
    plans = plan(range(6), {"a": survivor}, replicas=1)
    assert plans["a"].partitions == (0, 1, 2, 3, 4, 5)
    assert plans["a"].standbys == ()  # no other member to hold a copy


def test_each_partition_gets_one_standby_on_another_member() -> None:
    plans = plan(range(6), {"a": {}, "b": {}, "c": {}}, replicas=1)
    for p in range(6):
        owners = [m for m, pl in plans.items() if p in pl.partitions]
        copies = [m for m, pl in plans.items() if p in pl.standbys]
        assert len(owners) == 1 and len(copies) == 1 and owners != copies
    assert sorted(len(pl.standbys) for pl in plans.values()) == [2, 2, 2]


def test_standbys_stay_where_a_warm_copy_is() -> None:
    reports = {
        "a": {**_active(0, 1), 2: Held(Role.STANDBY, 9)},
        "b": _active(2, 3),
        "c": _active(4, 5),
    }
    assert 2 in plan(range(6), reports, replicas=1)["a"].standbys


def test_zero_replicas_assigns_no_standby() -> None:
    got = _assign({"a": _member({}), "b": _member({})}, replicas=0)
    assert all(standbys == frozenset() for _, standbys in got.values())


def test_a_member_without_the_report_makes_a_plain_co_partitioned_assignment() -> None:
    got = _assign({"a": _member(_active(3, 4, 5)), "b": _member(None)}, partitions=6)
    assert got["a"][0]["lhv.commands"] == [0, 1, 2]  # the range layout, not sticky
    assert got["b"][0]["lhv.commands"] == [3, 4, 5]
    assert got["a"][0]["lhv.search"] == [0, 1, 2]
    assert all(standbys is None for _, standbys in got.values())


def test_garbage_user_data_never_fails_the_assignment() -> None:
    rng = random.Random(3)
    good = encode_subscription(_active(1, 2))
    samples = [
        b"\x00",
        b"LS",
        b"LS\x00\x01\xff\xff",
        good[:-3],
        good + b"x",
        b"LS\x00\x01\x00\x01" + b"\x00\x00\x00\x01\x07" + b"\x00" * 8,  # unknown role
        bytes(rng.getrandbits(8) for _ in range(64)),
    ]
    for junk in samples:
        assert decode_subscription(junk) is None
        members = {"a": _member(_active(0)), "b": ConsumerProtocolMemberMetadata(0, TOPICS, junk)}
        got = _assign({m: v if isinstance(v, bytes) else v.encode() for m, v in members.items()})
        owned = sorted(p for topics, _ in got.values() for p in topics["lhv.commands"])
        assert owned == list(range(6))


def test_a_newer_report_is_read_for_what_this_version_knows() -> None:
    newer = bytearray(encode_subscription(_active(4, offset=77)))
    newer[2:4] = (2).to_bytes(2, "big")  # version 2 appends fields after the v1 entries
    assert decode_subscription(bytes(newer) + b"more") == _active(4, offset=77)


def test_a_report_is_bounded() -> None:
    many = {p: Held(Role.STANDBY, p) for p in range(MAX_REPORTED + 100)}
    data = encode_subscription({**many, 9999: Held(Role.ACTIVE, 1)})
    decoded = decode_subscription(data)
    assert decoded is not None and len(decoded) == MAX_REPORTED
    assert decoded[9999].role is Role.ACTIVE  # actives are never the ones left out


def test_assignment_user_data_round_trips() -> None:
    assert decode_assignment(encode_assignment([5, 1, 1])) == frozenset({1, 5})
    assert decode_assignment(b"") is None and decode_assignment(b"junk!!") is None


def test_the_member_reports_what_it_holds_and_hears_its_standbys() -> None:
    assignor = StandbyAssignor(replicas=1, held=lambda: {2: Held(Role.STANDBY, 8)})
    metadata = assignor.metadata(TOPICS)
    assert decode_subscription(metadata.user_data) == {2: Held(Role.STANDBY, 8)}
    result = assignor.assign(_Cluster(dict.fromkeys(TOPICS, 4)), {"only": metadata, "x": metadata})
    assignor.on_assignment(result["only"])
    assert assignor.take_standbys() is not None
    assert assignor.take_standbys() is None  # once per assignment


def test_a_failing_report_still_joins() -> None:
    def broken() -> dict[int, Held]:
        raise RuntimeError("boom")

    metadata = StandbyAssignor(replicas=1, held=broken).metadata(TOPICS)
    assert decode_subscription(metadata.user_data) == {}


def test_a_fresh_group_spreads_consecutive_partitions_over_every_member() -> None:
    # the members of a sharded index sit on consecutive partitions: on different workers
    out = plan(range(9), {"m0": {}, "m1": {}, "m2": {}}, replicas=0)
    owner = {p: m for m, mp in out.items() for p in mp.partitions}
    for start in range(9):
        run = [owner[(start + s) % 9] for s in range(3)]
        assert len(set(run)) == 3, (start, run)


def test_after_a_member_leaves_and_another_joins_consecutive_partitions_spread_again() -> None:
    members = [f"m{i:02d}" for i in range(8)]
    first = plan(range(32), {m: {} for m in members}, replicas=0)
    held = {m: {p: Held(Role.ACTIVE, 10) for p in mp.partitions} for m, mp in first.items()}
    del held["m03"]
    second = plan(range(32), held, replicas=0)
    moved = [
        p
        for p in range(32)
        if p not in first["m03"].partitions
        and not any(p in second[m].partitions and p in first[m].partitions for m in second)
    ]
    assert moved == [], "only the leaver's partitions move"
    held = {m: {p: Held(Role.ACTIVE, 10) for p in mp.partitions} for m, mp in second.items()}
    held["new"] = {}
    third = plan(range(32), held, replicas=0)
    owner = {p: m for m, mp in third.items() for p in mp.partitions}
    for start in range(32):
        run = {owner[(start + s) % 32] for s in range(8)}
        assert len(run) == 8, (start, sorted(run))
