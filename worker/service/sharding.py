"""Sharded indexes and aliases in the apply path: the home's catalog steps, forwarded
records (signed, exactly once) and the checks of member indexes.

The key scheme is `worker.wire.shards`; the catalog's entries are `catalog.py`. This
module runs in the apply thread (`apply.apply_records` calls it) except `Forwarder`,
which produces the forwarded records on the event loop once a batch is applied.

Home side (the partition of NAME, holding NAME's catalog entry):

- `create` NAME with `shards: S >= 2`: records `Sharded(S, params)` and forwards a signed
  `create` (with `shards: S`) to each member `NAME#s`.
- `add`/`delete` keyed NAME: validated whole with the library's own validation and the
  catalog's parameters (nothing is forwarded when one item is bad), split by `shard_of`
  (order kept within each shard), one forwarded record per shard that has items.
- `drop` NAME: forwarded to every member, the catalog entry removed.
- `import` NAME: checked whole (its objects read and validated), then forwarded to every
  member; each member imports its shard's rows.
- `merge` NAME into DEST: forwarded to every member; each member merges its items into
  DEST with the merge protocol.
- `merge_in` keyed NAME (a merge into the sharded NAME): checked against the catalog's
  dim and space, then forwarded to every member (`forward_merge_in`, called from the
  merge protocol's step); each member applies the exported items of its shard and
  answers its own `merge_done` (`merge.py`).
- A write keyed by an alias is forwarded whole to the alias's target (`via_alias`).

Forwarded records carry `origin: {partition, offset, part}` and the protocol MAC
(`protocol_auth.py`). Each partition keeps, per origin partition, the newest origin it
applied (`Partition.forwarded`, persisted in its manifest): a forwarded record whose
origin is not newer is a duplicate (a home owner that restarted and forwarded again, or a
zombie) and is skipped. That is exactly once because the home owner produces the forwards
of a batch in origin order, one destination partition at a time in order (`Forwarder`),
and waits for the broker to take all of them before the batch's acks are sent and before
any checkpoint can cover the batch (the runner forwards before it looks at the policy; a
revoke and a stop wait for the runner's batch).

Member side: a member `NAME#s` knows S (`Partition.members`, persisted); every item or id
written to it must have `shard_of(id, S) == s`, else the record is rejected whole
(`wrong_partition`). Only the home's owner creates or drops members: an unsigned `create`
or `drop` of a name with `#` is `invalid_request`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from lhv_index import Clock, Delete, EngineKind, Index, IndexParams, Limits, Upsert, Write
from lhv_index.errors import IndexExists, IndexNotFound, Internal, InvalidRequest, WrongPartition
from worker.service.catalog import Alias, CatalogEntry, Sharded
from worker.service.partition import Partition
from worker.service.ports import KafkaPort
from worker.service.protocol_auth import ProtocolAuth
from worker.wire.commands import (
    AddCommand,
    AliasCommand,
    Command,
    CreateCommand,
    DeleteCommand,
    DropCommand,
    ImportCommand,
    MergeCommand,
    MergeDoneCommand,
    MergeInCommand,
    Origin,
    UnaliasCommand,
    forward_value,
)
from worker.wire.headers import ReplyTo, request_headers
from worker.wire.shards import parse_shard_name, shard_key, shard_of, split_by_shard
from worker.wire.topics import home_partition

__all__ = [
    "Forward",
    "Forwarder",
    "HomeStep",
    "admit_forwarded",
    "at_home",
    "check_member_writes",
    "command_writes",
    "describe",
    "forward_merge_in",
    "member_shard",
]

log = logging.getLogger(__name__)

#: the longest the runner keeps retrying to produce one forwarded record (then it fails,
#: and the worker exits: the next owner replays and forwards again)
FORWARD_TIMEOUT_S = 600.0
#: what the broker says of a record it will never take: not retried
_REFUSED = (MessageSizeTooLargeError, RecordTooLargeError)
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class Forward:
    """One forwarded record to produce to the commands topic (signed)."""

    key: str
    value: bytes
    partition: int
    headers: tuple[tuple[str, bytes], ...]


@dataclass(slots=True)
class HomeStep:
    """What the home did with a record keyed by a catalog name (or a sharded create)."""

    forwards: list[Forward] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0
    ack_passed_on: bool = False
    """the one forward carries the requester's reply headers: the partition that applies
    (or rejects) it acks, so the home sends no ack of its own (a write by alias)"""


# -- forwarded records: admission -------------------------------------------------------------


def admit_forwarded(
    partition: Partition,
    cmd: Command,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    auth: ProtocolAuth | None,
) -> bool:
    """Check a record's `origin` (and what only a worker may do): False when it is a
    duplicate to skip (its origin is not newer than this partition's mark); True when it
    is to be applied (and the mark moved to its origin).

    Raises:
        InvalidRequest: an unsigned or forged forwarded record, or an unsigned create or
            drop of a member name; nothing changed.
    """
    origin = cmd.origin
    if origin is None:
        member = parse_shard_name(cmd.index)
        if member is not None and isinstance(cmd, CreateCommand | DropCommand):
            raise InvalidRequest(
                f"{cmd.op}: {cmd.index!r} is shard {member.shard} of the sharded index "
                f"{member.base!r}: only the owner of {member.base!r}'s partition creates and "
                f"drops its members ({cmd.op} {member.base!r} instead)"
            )
        return True
    if auth is None:
        raise InvalidRequest(f"{cmd.op}: a forwarded record (origin) cannot be verified here")
    auth.verify(key, value, headers, cmd.op, what="a forwarded record (origin)")
    mark = partition.forwarded.get(origin.partition)
    if mark is not None and origin.position <= mark:
        log.info(
            "duplicate forwarded record skipped (origin partition %d offset %d part %d)",
            origin.partition,
            origin.offset,
            origin.part,
        )
        return False
    partition.forwarded[origin.partition] = origin.position
    return True


def duplicate_count(cmd: Command) -> int:
    """What a skipped duplicate counts as skipped: its items, ids, or 1."""
    if isinstance(cmd, AddCommand):
        return len(cmd.items)
    if isinstance(cmd, DeleteCommand):
        return len(cmd.ids)
    return 1


# -- members ------------------------------------------------------------------------------------


def member_shard(partition: Partition, name: str) -> tuple[str, int, int] | None:
    """(NAME, s, S) when `name` is a member index `NAME#s` this partition holds, else None."""
    shards = partition.members.get(name)
    member = parse_shard_name(name)
    if shards is None or member is None:
        return None
    return member.base, member.shard, shards


def check_member_writes(partition: Partition, cmd: AddCommand | DeleteCommand) -> None:
    """Every id written to a member `NAME#s` must belong to shard s.

    Raises:
        WrongPartition: the first id of another shard (`item` = its position), naming the
            id, its shard and the record's; the record is rejected whole.
    """
    found = member_shard(partition, cmd.index)
    if found is None:
        return
    base, shard, shards = found
    ids = [item.id for item in cmd.items] if isinstance(cmd, AddCommand) else cmd.ids
    for pos, id_ in enumerate(ids):
        belongs = shard_of(id_, shards)
        if belongs != shard:
            raise WrongPartition(
                f"{cmd.op}: id {id_!r} (item {pos}) belongs to shard {belongs} of {base!r} "
                f"({shards} shards), not to shard {shard}: write it keyed "
                f"{shard_key(base, belongs, shards)!r} (or keyed {base!r})",
                item=pos,
            )


def created_member(partition: Partition, cmd: CreateCommand) -> None:
    """After a forwarded `create` of a member `NAME#s` applied: remember S."""
    if parse_shard_name(cmd.index) is not None and cmd.shards > 1:
        partition.members[cmd.index] = cmd.shards


def check_room(
    partition: Partition, cmd: CreateCommand, *, max_indexes: int | None, num_partitions: int
) -> None:
    """Refuse a `create` of a new index or sharded index that would take `partition` past
    `max_indexes` (`LHV_MAX_INDEXES_PER_PARTITION`; None: no bound). A partition counts
    the indexes it holds (members included) and, for each sharded index whose home it is,
    its members' share of one partition: ceil(S / P). A sharded create is weighed the
    same way here, at its home, where it is refused whole; its members' creates, signed by
    the home, are never refused for room (a refused member would leave the index
    half-created).

    Raises:
        InvalidRequest: no room; nothing changed.
    """
    if max_indexes is None or parse_shard_name(cmd.index) is not None:
        return

    def share(shards: int) -> int:
        return -(-shards // max(1, num_partitions))

    held = len(partition.indexes) + sum(
        share(e.shards) for e in partition.catalog.values() if isinstance(e, Sharded)
    )
    adding = share(cmd.shards) if cmd.shards > 1 else 1
    if held + adding > max_indexes:
        sharded = (
            f" and {cmd.index!r} ({cmd.shards} shards over {num_partitions} partitions) "
            f"would add {adding}"
            if cmd.shards > 1
            else ""
        )
        raise InvalidRequest(
            f"create: partition {partition.number} holds {held} indexes{sharded}, the limit "
            f"is {max_indexes} (LHV_MAX_INDEXES_PER_PARTITION): drop one first"
        )


def check_member_create(partition: Partition, cmd: CreateCommand) -> None:
    """A member that exists already must have the same S (its params are checked by the
    ordinary create).

    Raises:
        IndexExists: it exists as a member of another shard count.
    """
    known = partition.members.get(cmd.index)
    if known is not None and known != cmd.shards:
        raise IndexExists(
            f"member index {cmd.index!r} exists with shards {known}, not {cmd.shards}"
        )


# -- the home ---------------------------------------------------------------------------------


def at_home(
    partition: Partition,
    cmd: Command,
    *,
    offset: int,
    num_partitions: int,
    auth: ProtocolAuth | None,
    index_limits: Limits,
    max_record_bytes: int,
    max_indexes: int | None = None,
    check_import: Callable[[ImportCommand, Index, int], None] | None = None,
) -> HomeStep | None:
    """The home's step for a record keyed by a name of this partition's catalog, or for a
    sharded `create`; None when the record is an ordinary one (apply it as usual).
    `check_import(cmd, index, offset)` validates an import's rows (`BarrierSteps`).

    Raises:
        LhvError: the record is rejected; nothing changed and nothing is forwarded.
    """
    if parse_shard_name(cmd.index) is not None:
        return None  # a member: an index of its own partition
    entry = partition.catalog.get(cmd.index)
    sign = _Signer(auth, num_partitions, max_record_bytes)
    if isinstance(cmd, CreateCommand):
        if entry is None and cmd.shards <= 1:
            return None
        return _create(partition, cmd, entry, offset, sign, index_limits, max_indexes)
    if isinstance(cmd, AliasCommand | UnaliasCommand):
        return _alias(partition, cmd, entry, offset)
    if entry is None or isinstance(cmd, MergeInCommand | MergeDoneCommand):
        # a merge step keyed by a catalog name is the merge protocol's (`merge.py`): it
        # forwards a merge_in to a sharded destination's members, or refuses it
        return None
    if isinstance(entry, Alias):
        return _via_alias(partition, cmd, entry, offset, sign)
    if isinstance(cmd, AddCommand | DeleteCommand):
        return _split(partition, cmd, entry, offset, sign, index_limits)
    if isinstance(cmd, DropCommand):
        del partition.catalog[cmd.index]
        partition.validators.pop(cmd.index, None)
        step = _to_members(partition, cmd, entry, offset, sign)
        step.applied = 1
        log.info("sharded index dropped", extra={"index": cmd.index, "offset": offset})
        return step
    if isinstance(cmd, MergeCommand):
        # each member merges its items into the destination (the merge protocol)
        return _to_members(partition, cmd, entry, offset, sign)
    if isinstance(cmd, ImportCommand):
        if check_import is None:
            raise Internal("import: this worker cannot read imports")
        check_import(cmd, _validator(partition, cmd.index, entry, index_limits), offset)
        return _to_members(partition, cmd, entry, offset, sign)
    raise InvalidRequest(
        f"{cmd.op}: {cmd.index!r} is a sharded index; {cmd.op} of a sharded index is not supported"
    )


@dataclass(frozen=True, slots=True)
class _Signer:
    """Makes the signed forwarded records of one home step."""

    auth: ProtocolAuth | None
    num_partitions: int
    max_bytes: int
    """a forwarded record over it is refused at the home (a member would refuse it)"""

    def forward(
        self,
        cmd: Command,
        *,
        key: str,
        origin: Origin,
        positions: Sequence[int] | None = None,
        shards: int | None = None,
        via_alias: str | None = None,
        reply_to: ReplyTo | None = None,
    ) -> Forward:
        value = forward_value(
            cmd, index=key, origin=origin, positions=positions, shards=shards, via_alias=via_alias
        )
        if len(value) > self.max_bytes:
            raise InvalidRequest(
                f"{cmd.op}: the record forwarded to {key!r} would be {len(value)} bytes, over "
                f"max_message_bytes ({self.max_bytes}): send smaller records (or vector_b64)"
            )
        raw = key.encode("utf-8")
        # Without a key (a test's apply, `lhv replay` where no worker ever signed) the
        # record is unsigned: nothing sends it, and a partition would refuse it.
        auth = self.auth
        headers = (auth.header(raw, value),) if auth is not None and auth.can_sign else ()
        if reply_to is not None:
            headers = (*headers, *request_headers(reply_to))
        return Forward(
            key=key,
            value=value,
            partition=home_partition(raw, self.num_partitions),
            headers=headers,
        )


def _create(
    partition: Partition,
    cmd: CreateCommand,
    entry: CatalogEntry | None,
    offset: int,
    sign: _Signer,
    index_limits: Limits,
    max_indexes: int | None,
) -> HomeStep:
    name = cmd.index
    if cmd.via_alias is not None or isinstance(entry, Alias):
        target = entry.target if isinstance(entry, Alias) else "?"
        raise IndexExists(
            f"create: {name!r} is an alias (of {target!r}): create the target, or unalias "
            f"{name!r} first"
        )
    params = IndexParams.from_dict(cmd.params, limits=index_limits)
    if isinstance(entry, Sharded):
        if entry.shards == cmd.shards and entry.params == params.to_dict():
            return HomeStep(skipped=1)  # exists with these parameters: a no-op
        raise IndexExists(
            f"index {name!r} exists with {entry.shards} shards and parameters {entry.params}"
        )
    if name in partition.indexes:
        raise IndexExists(f"index {name!r} exists unsharded: drop it first to shard it")
    check_room(partition, cmd, max_indexes=max_indexes, num_partitions=sign.num_partitions)
    partition.catalog[name] = Sharded(cmd.shards, params.to_dict())
    step = HomeStep(applied=1)
    for s in range(cmd.shards):
        key = shard_key(name, s, cmd.shards)
        origin = Origin(partition.number, offset, s)
        step.forwards.append(sign.forward(cmd, key=key, origin=origin, shards=cmd.shards))
    log.info(
        "sharded index created: %d shards", cmd.shards, extra={"index": name, "offset": offset}
    )
    return step


def _alias(
    partition: Partition,
    cmd: AliasCommand | UnaliasCommand,
    entry: CatalogEntry | None,
    offset: int,
) -> HomeStep:
    name = cmd.index
    if isinstance(cmd, UnaliasCommand):
        if not isinstance(entry, Alias):
            raise IndexNotFound(f"unalias: {name!r} is not an alias")
        del partition.catalog[name]
        log.info("alias removed", extra={"index": name, "offset": offset})
        return HomeStep(applied=1)
    if name in partition.indexes or isinstance(entry, Sharded):
        raise IndexExists(
            f"alias: {name!r} is an index: an alias of that name would shadow it (pick "
            "another name, or drop the index first)"
        )
    partition.catalog[name] = Alias(cmd.target)
    log.info(
        "alias now names %s (was %s)",
        cmd.target,
        entry.target if isinstance(entry, Alias) else None,
        extra={"index": name, "offset": offset},
    )
    return HomeStep(applied=1)


def _validator(partition: Partition, name: str, entry: Sharded, limits: Limits) -> Index:
    """An empty index with the catalog's parameters: the library's validation of a
    sharded index's writes (dims, NaN, zero vectors under cosine, ids, metadata)."""
    cached = partition.validators.get(name)
    if cached is not None and cached[0] == entry.params:
        return cached[1]
    params = IndexParams.from_dict(entry.params)
    exact = replace(params, engine=EngineKind.EXACT, max_elements_hint=0)
    index = Index(name, exact, limits=limits)
    partition.validators[name] = (entry.params, index)
    return index


def command_writes(cmd: AddCommand | DeleteCommand, offset: int) -> list[Write]:
    """The library writes of an `add` or `delete` at `offset`: each item's clock is
    (version, offset, position in the record). The apply path and the home's check of a
    plain-name record use this one conversion."""
    if isinstance(cmd, AddCommand):
        return [
            Upsert(
                id=item.id,
                vector=item.vector,
                metadata=item.metadata,
                clock=Clock(item.version, offset, pos),
            )
            for pos, item in enumerate(cmd.items)
        ]
    return [
        Delete(id=id_, clock=Clock(cmd.version, offset, pos)) for pos, id_ in enumerate(cmd.ids)
    ]


def _split(
    partition: Partition,
    cmd: AddCommand | DeleteCommand,
    entry: Sharded,
    offset: int,
    sign: _Signer,
    limits: Limits,
) -> HomeStep:
    validator = _validator(partition, cmd.index, entry, limits)
    validator.validate(
        command_writes(cmd, offset)
    )  # the whole record, before anything is forwarded
    ids = [item.id for item in cmd.items] if isinstance(cmd, AddCommand) else cmd.ids
    step = HomeStep()
    for part, (shard, positions) in enumerate(sorted(split_by_shard(ids, entry.shards).items())):
        key = shard_key(cmd.index, shard, entry.shards)
        origin = Origin(partition.number, offset, part)
        step.forwards.append(sign.forward(cmd, key=key, origin=origin, positions=positions))
    return step


def _to_members(
    partition: Partition,
    cmd: Command,
    entry: Sharded,
    offset: int,
    sign: _Signer,
) -> HomeStep:
    step = HomeStep()
    for s in range(entry.shards):
        key = shard_key(cmd.index, s, entry.shards)
        origin = Origin(partition.number, offset, s)
        step.forwards.append(sign.forward(cmd, key=key, origin=origin))
    return step


def forward_merge_in(
    partition: Partition,
    cmd: MergeInCommand,
    entry: Sharded,
    *,
    offset: int,
    auth: ProtocolAuth | None,
    num_partitions: int,
    max_record_bytes: int,
) -> list[Forward]:
    """The signed `merge_in` for each member `NAME#s` of the sharded destination
    `cmd.index` (origin: this record at `offset`, part s).

    Raises:
        InvalidRequest: a forwarded record would be over `max_record_bytes`.
    """
    sign = _Signer(auth, num_partitions, max_record_bytes)
    return [
        sign.forward(
            cmd,
            key=shard_key(cmd.index, s, entry.shards),
            origin=Origin(partition.number, offset, s),
        )
        for s in range(entry.shards)
    ]


def _via_alias(
    partition: Partition,
    cmd: Command,
    entry: Alias,
    offset: int,
    sign: _Signer,
) -> HomeStep:
    if cmd.via_alias is not None:
        raise InvalidRequest(
            f"{cmd.op}: {cmd.index!r} is an alias, reached through the alias "
            f"{cmd.via_alias!r}: aliases point at indexes, not at other aliases (alias chain)"
        )
    if isinstance(cmd, DropCommand):
        raise InvalidRequest(
            f"drop: {cmd.index!r} is an alias (of {entry.target!r}): drop the target, or "
            f"unalias {cmd.index!r}"
        )
    if not isinstance(cmd, AddCommand | DeleteCommand | ImportCommand | MergeCommand):
        raise InvalidRequest(f"{cmd.op}: {cmd.index!r} is an alias; {cmd.op} needs an index")
    origin = Origin(partition.number, offset, 0)
    # The requester's ack comes from the target's home, which applies the write or refuses
    # it (e.g. an alias chain, or no such target): an ack of "forwarded" here would say ok
    # of a write that is then refused where nobody hears of it.
    forward = sign.forward(
        cmd, key=entry.target, origin=origin, via_alias=cmd.index, reply_to=cmd.reply_to
    )
    return HomeStep(forwards=[forward], ack_passed_on=cmd.reply_to is not None)


# -- describe -----------------------------------------------------------------------------------


def describe(partition: Partition, name: str) -> dict[str, Any]:
    """What `name` is on its home partition (the `describe` query).

    Raises:
        IndexNotFound: neither an index, a member, a sharded index nor an alias here.
    """
    entry = partition.catalog.get(name)
    if isinstance(entry, Sharded):
        return {"kind": "sharded", "shards": entry.shards, "params": dict(entry.params)}
    if isinstance(entry, Alias):
        return {"kind": "alias", "target": entry.target}
    index = partition.indexes.get(name)
    if index is None:
        raise IndexNotFound(f"index {name!r} does not exist")
    out: dict[str, Any] = {"kind": "index", "shards": 1, "params": index.params.to_dict()}
    found = member_shard(partition, name)
    if found is not None:
        base, shard, shards = found
        out["shard"] = shard
        out["of"] = {"index": base, "shards": shards}
    return out


# -- production (event loop) --------------------------------------------------------------------


class Forwarder:
    """Produces the forwarded records of an applied batch, before its acks.

    Records to one destination partition are produced one after the other, in the
    batch's order (origin order); destinations proceed in parallel. Each record is
    retried (backoff) until the broker takes it, for at most `FORWARD_TIMEOUT_S`; past
    that `Internal` is raised, which ends the runner and the worker: the batch's records
    are not covered by any checkpoint, so the next owner forwards them again (duplicates
    are skipped by their origin).
    """

    def __init__(self, *, kafka: KafkaPort, topic: str) -> None:
        self._kafka = kafka
        self._topic = topic

    async def send(self, outcomes: Sequence[Any]) -> int:
        """Produce every `out.forwards` of `outcomes` (`apply.Outcome`s) and fill each
        `out.forwarded` with the offsets; returns how many were produced."""
        lanes: dict[int, list[tuple[Any, Forward]]] = {}
        for out in outcomes:
            for forward in out.forwards:
                lanes.setdefault(forward.partition, []).append((out, forward))
        if not lanes:
            return 0
        await asyncio.gather(*(self._lane(todo) for todo in lanes.values()))
        return sum(len(todo) for todo in lanes.values())

    async def _lane(self, todo: list[tuple[Any, Forward]]) -> None:
        for out, forward in todo:
            try:
                offset = await self._produce(forward)
            except _REFUSED as exc:
                # The broker will never take it (its size bound is below ours): an error
                # for the original record, whatever else of it was forwarded; retrying
                # would stop the partition for good.
                log.error(
                    "forwarded record to %s refused by the broker: %s",
                    forward.key,
                    exc,
                    extra={"offset": out.offset},
                )
                out.error = InvalidRequest(
                    f"{out.op}: the record forwarded to {forward.key!r} "
                    f"({len(forward.value)} bytes) was refused by the broker ({exc}); other "
                    "parts of this record may have been forwarded: send smaller records"
                )
                continue
            if out.forwarded is None:
                out.forwarded = {}
            out.forwarded[forward.key] = offset

    async def _produce(self, forward: Forward) -> int:
        deadline = time.monotonic() + FORWARD_TIMEOUT_S
        delay = _RETRY_FIRST_S
        while True:
            try:
                return await self._kafka.send_internal(
                    self._topic,
                    key=forward.key.encode("utf-8"),
                    value=forward.value,
                    partition=forward.partition,
                    headers=list(forward.headers),
                )
            except (asyncio.CancelledError, *_REFUSED):
                raise
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise Internal(
                        f"forwarded record to {forward.key!r} not taken by the broker in "
                        f"{FORWARD_TIMEOUT_S:.0f}s: {exc}"
                    ) from exc
                log.warning("forwarding to %s failed, retrying: %s", forward.key, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
