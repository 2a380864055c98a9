"""The group's partition assignor: co-partitioned, balanced, sticky, with warm standbys.

Kafka's own group protocol carries everything (no coordinator of LHV's): each member
reports in its subscription's `user_data` which partitions it holds warm (active, or a
standby copy) and at what applied offset; the group leader runs `StandbyAssignor.assign`
over every member's report and tells each member, in its assignment's `user_data`,
which partitions to keep as standbys. The model is Kafka Streams' standby tasks and its
`HighAvailabilityTaskAssignor`, simplified to what LHV needs:

1. co-partitioned: partition p of every subscribed topic goes to one member (the owner of
   p of `lhv.commands` also gets p of `lhv.search`);
2. balanced: every member owns `floor(P / M)` or `ceil(P / M)` partitions;
3. sticky: a member keeps what it reported active, within its share (giving up first
   what another member holds warm, then what its own partitions crowd);
4. warm first: a partition whose owner left (or had to give it up) goes to the member
   that reports it warm with the highest applied offset, within its share;
5. the rest go to the least loaded members, each to the one owning the fewest partitions
   near it (a fresh group gets partition p on the (p mod M)-th member): the members of a
   sharded index sit on consecutive partitions, so they land on different workers;
6. standbys: `replicas` copies of each partition on members other than its owner,
   preferring members that already hold it warm, then the least loaded.

Members that run an older LHV, or send a report this version cannot read, make the whole
assignment a plain co-partitioned one (what `RangePartitionAssignor` gives), without
standbys: a bad report never fails the assignment. A member that does not list this
protocol at all makes the group coordinator pick the range protocol every member lists
(the worker lists both, this one first).

Wire formats (big-endian; a later version keeps the v1 prefix and appends, so an older
reader reads what it knows and ignores the rest):

- subscription `user_data` v1: `MAGIC` (2 bytes), version (u16), count (u16), then count
  times: partition (i32), role (u8: 1 active, 2 standby), applied offset (i64; -1 none).
  At most `MAX_REPORTED` entries.
- assignment `user_data` v1: `MAGIC`, version (u16), count (u16), then count times the
  standby partition (i32).
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = [
    "ASSIGNOR_NAME",
    "MAX_REPORTED",
    "Held",
    "MemberPlan",
    "Role",
    "StandbyAssignor",
    "decode_assignment",
    "decode_subscription",
    "encode_assignment",
    "encode_subscription",
    "plan",
]

log = logging.getLogger(__name__)

#: the protocol name members list in JoinGroup (the range assignor is listed after it)
ASSIGNOR_NAME = "lhv-standby"
MAGIC = b"LS"
VERSION = 1
#: entries a subscription carries at most (a worker holding more reports the first ones)
MAX_REPORTED = 4096
_HEADER = struct.Struct(">2sHH")
_ENTRY = struct.Struct(">iBq")
_PARTITION = struct.Struct(">i")


class Role(enum.IntEnum):
    """How a member holds a partition it reports."""

    ACTIVE = 1
    """owns it (or owned it until this rebalance: its state is parked, checkpointed)"""
    STANDBY = 2
    """holds a read-only copy kept up to date from the log"""


@dataclass(frozen=True, slots=True)
class Held:
    """One partition a member reports holding."""

    role: Role
    offset: int
    """the last command offset applied to the copy (-1: none)"""


@dataclass(frozen=True, slots=True)
class MemberPlan:
    """What the assignment gives one member."""

    partitions: tuple[int, ...]
    """owned: p of every subscribed topic"""
    standbys: tuple[int, ...] = ()
    """partitions to keep a warm copy of"""


def encode_subscription(held: Mapping[int, Held]) -> bytes:
    """A member's report (at most `MAX_REPORTED` entries: actives first, then the most
    advanced standbys)."""
    entries = sorted(held.items(), key=lambda kv: (kv[1].role, -kv[1].offset, kv[0]))
    entries = entries[:MAX_REPORTED]
    out = bytearray(_HEADER.pack(MAGIC, VERSION, len(entries)))
    for p, h in sorted(entries):
        out += _ENTRY.pack(p, int(h.role), max(-1, h.offset))
    return bytes(out)


def decode_subscription(data: bytes | None) -> dict[int, Held] | None:
    """A member's report, or None when it does not speak this protocol (empty, foreign,
    truncated or malformed `user_data`). Never raises."""
    try:
        if not data or len(data) < _HEADER.size:
            return None
        magic, version, count = _HEADER.unpack_from(data)
        end = _HEADER.size + count * _ENTRY.size
        if magic != MAGIC or version < 1 or count > MAX_REPORTED or len(data) < end:
            return None
        if version == VERSION and len(data) != end:
            return None
        held: dict[int, Held] = {}
        for i in range(count):
            p, role, offset = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
            if p < 0 or role not in (Role.ACTIVE, Role.STANDBY) or offset < -1:
                return None
            held[p] = Held(Role(role), offset)
        return held
    except (struct.error, TypeError, ValueError):
        return None


def encode_assignment(standbys: Iterable[int]) -> bytes:
    parts = sorted(set(standbys))
    return _HEADER.pack(MAGIC, VERSION, len(parts)) + b"".join(_PARTITION.pack(p) for p in parts)


def decode_assignment(data: bytes | None) -> frozenset[int] | None:
    """The standby partitions an assignment names, or None when its `user_data` is not
    this protocol's. Never raises."""
    try:
        if not data or len(data) < _HEADER.size:
            return None
        magic, version, count = _HEADER.unpack_from(data)
        end = _HEADER.size + count * _PARTITION.size
        if magic != MAGIC or version < 1 or len(data) < end:
            return None
        parts = [
            _PARTITION.unpack_from(data, _HEADER.size + i * _PARTITION.size)[0]
            for i in range(count)
        ]
        return frozenset(p for p in parts if p >= 0)
    except (struct.error, TypeError, ValueError):
        return None


def plan(
    partitions: Sequence[int],
    reports: Mapping[str, Mapping[int, Held] | None],
    *,
    replicas: int,
) -> dict[str, MemberPlan]:
    """Assign `partitions` to the members of `reports` (member id -> its report; None: it
    does not speak the protocol). Pure and deterministic (module docstring for the
    rules)."""
    members = sorted(reports)
    if not members:
        return {}
    parts = sorted(set(partitions))
    if any(reports[m] is None for m in members):
        return _plain(parts, members)
    held: dict[str, Mapping[int, Held]] = {m: reports[m] or {} for m in members}
    floor, extra = divmod(len(parts), len(members))
    load: dict[str, int] = dict.fromkeys(members, 0)
    owner: dict[int, str] = {}

    at_ceil = [0]  # members holding floor + 1

    def can_take(m: str) -> bool:
        return load[m] < floor or (load[m] == floor and at_ceil[0] < extra)

    def give(p: int, m: str) -> None:
        owner[p] = m
        load[m] += 1
        if load[m] == floor + 1:
            at_ceil[0] += 1
        owned_by[m].add(p)

    def warm_elsewhere(p: int, m: str) -> bool:
        return any(p in held[n] for n in members if n != m)

    # The members of a sharded index sit on consecutive partitions: a member should own
    # partitions far apart, so any run of up to M partitions spreads over M members.
    span = min(len(members), len(parts), 33) - 1  # bounded: the leader's work per join
    n_parts = len(parts)
    index_of = {p: i for i, p in enumerate(parts)}
    owned_by: dict[str, set[int]] = {m: set() for m in members}

    def crowding(p: int, own: set[int]) -> int:
        """How many of `own` lie within `span` positions of p (around the ring)."""
        i = index_of[p]
        return sum(
            1
            for d in range(1, span + 1)
            for j in ((i + d) % n_parts, (i - d) % n_parts)
            if parts[j] in own and parts[j] != p
        )

    # 1. sticky: each member keeps what it owned, within its share; when a member must
    #    give some up, it first gives those another member holds warm. Two members
    #    claiming one partition (a zombie): the most advanced keeps it.
    claims: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for m in members:
        for p, mine in held[m].items():
            if mine.role is Role.ACTIVE:
                claims[p].append((mine.offset, m))
    keep: dict[str, list[int]] = defaultdict(list)
    for p in parts:
        if claims.get(p):
            best = min(claims[p], key=lambda c: (-c[0], c[1]))
            keep[best[1]].append(p)
    for m in members:
        kept = set(keep[m])
        # what a member gives up first: partitions another member holds warm, then those
        # crowded by its own neighbours (the spread of consecutive partitions)
        for p in sorted(kept, key=lambda p: (warm_elsewhere(p, m), crowding(p, kept), p)):
            if can_take(m):
                give(p, m)
    # 2. warm first: the member holding it warm with the highest applied offset
    for p in parts:
        if p in owner:
            continue
        warm = [(held[m][p].offset, m) for m in members if p in held[m]]
        for _, m in sorted(warm, key=lambda c: (-c[0], load[c[1]], c[1])):
            if can_take(m):
                give(p, m)
                break
    # 3. the rest: the least loaded member, then the one owning fewest near it (a fresh
    #    group gets partition p on the (p mod M)-th member)
    for p in parts:
        if p not in owner:
            able = [m for m in members if can_take(m)]
            least = min(load[m] for m in able)
            m = min(
                (m for m in able if load[m] == least),
                key=lambda m: (crowding(p, owned_by[m]), m),
            )
            give(p, m)
    # 4. standbys: on members other than the owner, warm ones first, then the least loaded
    standbys: dict[str, list[int]] = defaultdict(list)
    copies = min(max(replicas, 0), len(members) - 1)
    for p in parts:
        for _ in range(copies):
            taken = {owner[p], *(m for m in members if p in standbys[m])}
            candidates = [m for m in members if m not in taken]
            m = min(
                candidates,
                key=lambda m: (
                    p not in held[m],
                    len(standbys[m]),
                    -(held[m][p].offset if p in held[m] else -1),
                    m,
                ),
            )
            standbys[m].append(p)
    out = {}
    for m in members:
        owned = tuple(p for p in parts if owner[p] == m)
        out[m] = MemberPlan(owned, tuple(sorted(standbys[m])))
    return out


def _plain(parts: list[int], members: list[str]) -> dict[str, MemberPlan]:
    """The range assignor's layout for co-partitioned topics: contiguous runs of
    partitions, members in id order, the first ones one more."""
    floor, extra = divmod(len(parts), len(members))
    out = {}
    start = 0
    for i, m in enumerate(members):
        n = floor + (1 if i < extra else 0)
        out[m] = MemberPlan(tuple(parts[start : start + n]))
        start += n
    return out


class StandbyAssignor:
    """aiokafka's assignor interface (`name`, `metadata`, `assign`, `on_assignment`, as
    `AbstractPartitionAssignor`), as an instance: it carries this member's report and
    the standbys its last assignment named.

    Arguments:
        replicas: standby copies of each partition (the leader's setting is the group's).
        held: what this member holds, asked for at each join (after the revoke callback,
            so partitions just revoked are reported from their parked state).
    """

    name = ASSIGNOR_NAME
    version = 0

    def __init__(
        self, *, replicas: int, held: Callable[[], Mapping[int, Held]] | None = None
    ) -> None:
        if replicas < 0:
            raise ValueError("standby replicas must be >= 0")
        self.replicas = replicas
        self.held: Callable[[], Mapping[int, Held]] = held or dict
        self._standbys: frozenset[int] | None = None

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        try:
            report = encode_subscription(self.held())
        except Exception:  # a report is an optimisation: never fail the join over it
            log.exception("could not build the standby report; joining without one")
            report = encode_subscription({})
        return ConsumerProtocolMemberMetadata(self.version, list(topics), report)

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscriptions = {m: frozenset(md.subscription) for m, md in members.items()}
        topics = sorted(set().union(*subscriptions.values())) if subscriptions else []
        if len(set(subscriptions.values())) > 1:
            log.warning("members subscribe to different topics: range assignment")
            result: dict[str, ConsumerProtocolMemberAssignment] = RangePartitionAssignor.assign(
                cluster, members
            )
            return result
        by_topic: dict[str, set[int]] = {}
        for topic in topics:
            found = cluster.partitions_for_topic(topic)
            if found is None:
                log.warning("no partition metadata for topic %s", topic)
                continue
            by_topic[topic] = set(found)
        reports = {m: decode_subscription(md.user_data) for m, md in members.items()}
        silent = sorted(m for m, r in reports.items() if r is None)
        if silent:
            log.warning(
                "members %s send no standby report this version reads: plain co-partitioned "
                "assignment, no standbys",
                silent,
            )
        every = sorted(set().union(*by_topic.values())) if by_topic else []
        plans = plan(every, reports, replicas=self.replicas)
        out = {}
        for m, pl in plans.items():
            assignment = [
                (topic, [p for p in pl.partitions if p in by_topic[topic]])
                for topic in sorted(by_topic)
            ]
            out[m] = ConsumerProtocolMemberAssignment(
                self.version, assignment, encode_assignment(pl.standbys) if not silent else b""
            )
            log.info(
                "assignment: %s owns %s, standby for %s", m, list(pl.partitions), list(pl.standbys)
            )
        return out

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self._standbys = decode_assignment(assignment.user_data) or frozenset()

    def take_standbys(self) -> frozenset[int] | None:
        """The standbys named by the assignment received since the last call; None when
        none was (the group used another protocol): keep no standby."""
        standbys, self._standbys = self._standbys, None
        return standbys
