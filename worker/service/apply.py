"""Applying one poll's worth of command records to a partition's indexes.

Runs in a worker thread (never on the event loop): it decodes, validates, groups and
applies. Writes (`add`, `delete`) to one index are collected until a barrier that touches
that index (`create`, `drop`, `merge`, `import`) or the end of the poll, then applied with
one `Index.apply` call: the index keeps the winning write per id (last-write-wins by
`(version, offset, position)`) and does one vectorized engine call. A barrier is applied
in its place, so nothing is reordered across it.

Every record ends with an `Outcome`: applied, skipped, or rejected with an `LhvError`. A
rejected record changes nothing; the caller sends it to the DLQ and, when the record asks
for it, an error ack.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from lhv_index import (
    Index,
    IndexParams,
    Limits,
    ValidatedWrites,
    Write,
)
from lhv_index.errors import (
    IndexExists,
    IndexNotFound,
    Internal,
    LhvError,
    WrongPartition,
)
from worker.service import sharding
from worker.service.partition import Partition
from worker.service.protocol_auth import ProtocolAuth
from worker.service.sharding import Forward
from worker.telemetry.logs import log_context
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
    UnaliasCommand,
    command_names,
    decode_command,
    record_key_text,
)
from worker.wire.headers import ReplyTo, reply_to_from_headers
from worker.wire.limits import MessageLimits
from worker.wire.shards import SHARD_SEPARATOR
from worker.wire.topics import home_partition

__all__ = [
    "BARRIERS",
    "BarrierSteps",
    "Decoded",
    "Outcome",
    "RestoreNeeded",
    "apply_records",
    "decode_records",
    "run_barrier",
]

log = logging.getLogger(__name__)


class RestoreNeeded(Exception):
    """A read-only copy cannot take this record's step (the object it needs is gone: its
    owner finished the step and removed it) and must restore from the newest manifest.

    Raised by a follower's barrier steps (`follower.ReadOnlyWrites`) and let through by
    `apply_records`, so the runner stops at the record instead of rejecting it.
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


@dataclass(slots=True)
class Outcome:
    """What happened to one command record."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    reply_to: ReplyTo | None = None
    request_id: str | None = None
    op: str = ""
    index: str = ""
    applied: int = 0
    skipped: int = 0
    error: LhvError | None = None
    command: Command | None = None
    forwards: list[Forward] = field(default_factory=list)
    """records to produce for this one (the home of a sharded index or alias), before
    its ack (`sharding.Forwarder`)"""
    forwarded: dict[str, int] | None = None
    """record key -> offset of each forward, once produced (the ack carries it)"""
    ack_passed_on: bool = False
    """the forward carries the requester's reply headers and is acked where it is
    applied; this record's own ack is sent only if forwarding it fails"""


@dataclass(slots=True)
class Decoded:
    """One record decoded ahead of its apply: its command, or why it is rejected."""

    reply_to: ReplyTo | None
    command: Command | None = None
    error: LhvError | None = None
    named: tuple[str, str, str | None] = ("", "", None)
    """a refused record's (op, index, request_id), as far as they could be read"""


def decode_records(
    records: Sequence[Any], *, partition: int, num_partitions: int, limits: MessageLimits
) -> list[Decoded]:
    """Decode and validate `records` of `partition` on their own (no index state is
    read), so the next batch can be decoded while the current one is applied."""
    out: list[Decoded] = []
    for rec in records:
        try:
            reply_to = reply_to_from_headers(rec.headers or (), limits=limits)
        except LhvError:
            reply_to = None
        item = Decoded(reply_to)
        out.append(item)
        try:
            if rec.key is not None:
                name = record_key_text(rec.key)  # not UTF-8: no index's, wherever it came
                home = home_partition(rec.key, num_partitions)
                if home != partition:
                    raise WrongPartition(
                        f"index {name[:128]!r} lives on partition {home}, not {partition}"
                    )
            item.command = decode_command(rec.key, rec.value, rec.headers or (), limits=limits)
        except LhvError as exc:
            item.error = exc
        except Exception as exc:  # a bug, not bad input: reject the record, keep going
            log.exception("record failed to decode", extra={"offset": rec.offset})
            item.error = Internal(f"{type(exc).__name__}: {exc}")
        if item.error is not None:
            item.named = command_names(rec.value, limits)
    return out


#: the commands that are barriers: the pending writes of every index they touch are
#: applied before them, and nothing is reordered across them
BARRIERS = (
    CreateCommand,
    DropCommand,
    MergeCommand,
    MergeInCommand,
    MergeDoneCommand,
    ImportCommand,
)


class BarrierSteps(Protocol):
    """What runs for the barriers that move many items (`run_barrier`): the worker's
    `MergeProtocol` (through S3 and Kafka) and `lhv replay --verify` (in memory).

    Each step runs in the apply thread, sets `out` (applied, skipped; or `reply_to=None`
    when the requester's ack comes later) or raises `LhvError` with nothing applied.
    `auth` signs and verifies the records only workers produce (protocol steps, forwarded
    records).
    """

    @property
    def auth(self) -> ProtocolAuth: ...

    def merge(self, partition: Partition, cmd: MergeCommand, out: Outcome) -> None: ...

    def merge_in(self, partition: Partition, cmd: MergeInCommand, out: Outcome) -> None: ...

    def merge_done(self, partition: Partition, cmd: MergeDoneCommand, out: Outcome) -> None: ...

    def import_(self, partition: Partition, cmd: ImportCommand, out: Outcome) -> None: ...

    def check_import(self, cmd: ImportCommand, index: Index, offset: int) -> None:
        """Validate every row of an import against `index` (the home of a sharded index
        does, before it forwards the import); raises `LhvError`, applies nothing."""
        ...


def run_barrier(
    partition: Partition,
    cmd: Command,
    out: Outcome,
    *,
    steps: BarrierSteps | None,
    index_limits: Limits,
    max_indexes: int | None = None,
    num_partitions: int = 1,
) -> None:
    """Apply one barrier command (one of `BARRIERS`) in its place: `create` and `drop`
    here, the others through `steps`; the one dispatch of the worker and of `lhv replay`.
    A `create` of a new index is refused when the partition holds `max_indexes`
    (`sharding.check_room`).

    Raises:
        LhvError: the command is rejected; nothing changed.
    """
    if isinstance(cmd, CreateCommand):
        _create(partition, cmd, out, index_limits, max_indexes, num_partitions)
        return
    if isinstance(cmd, DropCommand):
        _drop(partition, cmd, out)
        return
    if steps is None:
        raise Internal(f"op {out.op!r} is not supported by this worker")
    with log_context(partition=partition.number, index=cmd.index, offset=out.offset):
        if isinstance(cmd, MergeCommand):
            steps.merge(partition, cmd, out)
        elif isinstance(cmd, MergeInCommand):
            steps.merge_in(partition, cmd, out)
        elif isinstance(cmd, MergeDoneCommand):
            steps.merge_done(partition, cmd, out)
        elif isinstance(cmd, ImportCommand):
            steps.import_(partition, cmd, out)
        else:
            raise Internal(f"op {out.op!r} is not a barrier")


@dataclass(slots=True)
class _Group:
    """The pending writes of one index: each member's batch was validated on its own."""

    batches: list[ValidatedWrites] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    members: list[tuple[Outcome, int, int]] = field(default_factory=list)
    """(outcome, first write position in `writes`, number of writes)"""


def apply_records(
    partition: Partition,
    records: Sequence[Any],
    *,
    num_partitions: int,
    limits: MessageLimits,
    index_limits: Limits,
    max_indexes: int | None = None,
    barrier: BarrierSteps | None = None,
    on_norms: Callable[[str, npt.NDArray[np.float32]], None] | None = None,
    decoded: Sequence[Decoded] | None = None,
) -> list[Outcome]:
    """Apply `records` (consumer records of one partition, in offset order).

    Mutates `partition` (its indexes, dirty set and applied offset). Never raises for bad
    input: each record's fate is in its `Outcome`. `barrier` runs the steps of `merge`,
    `merge_in`, `merge_done` and `import` (`run_barrier`). `on_norms(index, norms)` sees the
    norms of the upserted vectors of each applied group, as their validation computed them
    (drift monitoring). `decoded` is `decode_records` of `records`, when it was done ahead.
    `max_indexes`: the indexes the partition may hold (None: no bound).
    """
    if decoded is None:
        decoded = decode_records(
            records, partition=partition.number, num_partitions=num_partitions, limits=limits
        )
    outcomes: list[Outcome] = []
    groups: dict[str, _Group] = {}
    keys: list[ProtocolAuth | None] = []

    def auth() -> ProtocolAuth | None:
        """The workers' key (from `barrier`), looked up once, when a record needs it."""
        if not keys:
            try:
                keys.append(barrier.auth if barrier is not None else None)
            except (AttributeError, Internal):
                keys.append(None)
        return keys[0]

    def flush(name: str) -> None:
        group = groups.pop(name, None)
        if group is not None and group.writes:
            _apply_group(partition, name, group)
            if on_norms is not None:
                on_norms(name, np.concatenate([b.norms for b in group.batches]))

    for rec, pre in zip(records, decoded, strict=True):
        out = Outcome(offset=rec.offset, key=rec.key, value=rec.value, headers=rec.headers or ())
        out.reply_to = pre.reply_to
        outcomes.append(out)
        try:
            if pre.error is not None:
                out.op, out.index, out.request_id = pre.named
                raise pre.error
            cmd = pre.command
            assert cmd is not None
            sharded = bool(partition.catalog) or _may_shard(cmd)
            out.command = cmd
            out.index = cmd.index
            out.request_id = cmd.request_id
            out.op = _op_name(cmd)
            if cmd.origin is not None or sharded:
                if not sharding.admit_forwarded(
                    partition,
                    cmd,
                    key=rec.key,
                    value=rec.value,
                    headers=out.headers,
                    auth=auth(),
                ):
                    out.skipped = sharding.duplicate_count(cmd)
                    continue
                home = sharding.at_home(
                    partition,
                    cmd,
                    offset=rec.offset,
                    num_partitions=num_partitions,
                    auth=auth(),
                    index_limits=index_limits,
                    max_record_bytes=limits.max_message_bytes,
                    max_indexes=max_indexes,
                    check_import=None if barrier is None else barrier.check_import,
                )
                if home is not None:
                    out.forwards, out.applied, out.skipped = (
                        home.forwards,
                        home.applied,
                        home.skipped,
                    )
                    out.ack_passed_on = home.ack_passed_on
                    continue
            if isinstance(cmd, AddCommand | DeleteCommand):
                index = partition.indexes.get(cmd.index)
                if index is None:
                    raise IndexNotFound(f"index {cmd.index!r} does not exist")
                if partition.members:
                    sharding.check_member_writes(partition, cmd)
                writes = sharding.command_writes(cmd, rec.offset)
                checked = index.validate(writes)  # the one validation pass of these writes
                pending = groups.get(cmd.index)
                if pending and len(pending.writes) + len(writes) > index_limits.max_batch_items:
                    flush(cmd.index)  # one engine call stays within the index's batch limit
                group = groups.setdefault(cmd.index, _Group())
                group.members.append((out, len(group.writes), len(writes)))
                group.writes.extend(writes)
                group.batches.append(checked)
            elif isinstance(cmd, BARRIERS):
                for name in _touched(cmd):
                    flush(name)
                run_barrier(
                    partition,
                    cmd,
                    out,
                    steps=barrier,
                    index_limits=index_limits,
                    max_indexes=max_indexes,
                    num_partitions=num_partitions,
                )
            else:
                raise Internal(f"op {out.op!r} is not supported by this worker")
        except RestoreNeeded:
            raise  # the copy is thrown away: nothing of this batch is reported
        except LhvError as exc:
            out.error = exc
        except Exception as exc:  # a bug, not bad input: reject the record, keep going
            log.exception(
                "record failed unexpectedly",
                extra={"offset": rec.offset, "index": out.index or None},
            )
            out.error = Internal(f"{type(exc).__name__}: {exc}")
    for name in list(groups):
        flush(name)
    # Only now, with every write of the batch in its index: a query checks the applied
    # offset on the event loop while this runs in a thread, and one that saw an offset
    # before its write reached the index would break read-your-writes.
    if records:
        partition.applied_offset = records[-1].offset
    partition.records_since_checkpoint += len(records)
    return outcomes


def _may_shard(cmd: Command) -> bool:
    """Whether the sharding step must see `cmd` although the partition has no catalog:
    a sharded create, alias and unalias, or a create or drop of a member name (refused
    unsigned)."""
    if isinstance(cmd, CreateCommand):
        return cmd.shards > 1 or SHARD_SEPARATOR in cmd.index
    if isinstance(cmd, AliasCommand | UnaliasCommand):
        return True
    return isinstance(cmd, DropCommand) and SHARD_SEPARATOR in cmd.index


def _op_name(cmd: Command) -> str:
    return str(getattr(cmd, "op", type(cmd).__name__.removesuffix("Command").lower()))


def _touched(cmd: Any) -> list[str]:
    names = [cmd.index]
    for attr in ("dest", "source_index"):
        other = getattr(cmd, attr, None)
        if isinstance(other, str):
            names.append(other)
    return names


def _apply_group(partition: Partition, name: str, group: _Group) -> None:
    index = partition.indexes[name]
    try:
        result = index.apply(ValidatedWrites.join(group.batches))
    except Exception as exc:
        if len(group.members) == 1:
            out = group.members[0][0]
            out.error = exc if isinstance(exc, LhvError) else Internal(str(exc))
            log.error("apply failed: %s", exc, extra={"index": name, "offset": out.offset})
            return
        # Isolate the record at fault: apply the group's records one by one.
        log.warning(
            "group apply failed (%s); applying its records one by one",
            exc,
            extra={"index": name, "offset": group.members[0][0].offset},
        )
        for (out, start, count), batch in zip(group.members, group.batches, strict=True):
            one = _Group([batch], group.writes[start : start + count], [(out, 0, count)])
            _apply_group(partition, name, one)
        return
    partition.dirty.add(name)
    won = result.won  # ascending positions in the group
    for out, start, count in group.members:
        out.applied = bisect_left(won, start + count) - bisect_left(won, start)
        out.skipped = count - out.applied


def _create(
    partition: Partition,
    cmd: CreateCommand,
    out: Outcome,
    index_limits: Limits,
    max_indexes: int | None,
    num_partitions: int,
) -> None:
    params = IndexParams.from_dict(cmd.params)
    sharding.check_member_create(partition, cmd)
    existing = partition.indexes.get(cmd.index)
    if existing is not None:
        if existing.params.to_dict() == params.to_dict():
            out.skipped = 1  # even over today's limits: it exists already
            return
        raise IndexExists(
            f"index {cmd.index!r} exists with other parameters: {existing.params.to_dict()}"
        )
    sharding.check_room(partition, cmd, max_indexes=max_indexes, num_partitions=num_partitions)
    partition.indexes[cmd.index] = Index(cmd.index, params, limits=index_limits)
    sharding.created_member(partition, cmd)
    partition.dirty.add(cmd.index)
    out.applied = 1
    log.info("index created", extra={"index": cmd.index, "offset": out.offset})


def _drop(partition: Partition, cmd: DropCommand, out: Outcome) -> None:
    if partition.indexes.pop(cmd.index, None) is None:
        raise IndexNotFound(f"index {cmd.index!r} does not exist")
    partition.members.pop(cmd.index, None)
    partition.dirty.discard(cmd.index)
    partition.dropped = True
    out.applied = 1
    log.info("index dropped", extra={"index": cmd.index, "offset": out.offset})
