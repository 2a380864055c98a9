"""Merge and import: the barrier steps that move many items at once (DESIGN section 6).

`MergeProtocol` holds the worker's barrier steps (`apply.BarrierSteps`): `apply.run_barrier`
calls them in the apply thread for `merge`, `merge_in`, `merge_done` and `import` records,
after flushing the pending writes of the indexes they touch, so nothing is reordered
across them. `lhv replay --verify` gives the same dispatch steps of its own.

Merge of `src` into `dest` (the `merge` record is keyed by `src`):

- Same partition: applied locally in one step. The live items of `src` (sorted by id)
  that are not live in `dest` are upserted into `dest` with clock `(item.version, merge
  offset, position)`, so they win over older tombstones in `dest` (a tombstone with a
  higher client version still wins); ids live in `dest` are left untouched. With
  `clear_source`, the exported items are then deleted from `src`.
- Across partitions, in three records:
  1. `merge` on src's partition: the owner writes an export object (an LHV1 snapshot of an
     exact-engine index holding src's live items with their clocks) under
     `merges/<topic>/exports/<src partition>/<offset>.lhv`, then produces `merge_in` to
     dest's partition. The merge id (`m<partition>-<offset>`) and the key come from the
     merge record, so a replay overwrites the same object with the same items.
  2. `merge_in` on dest's partition: the owner checks dest exists with src's dim and space
     (otherwise nothing is applied and the error travels back), applies the exported
     items not live in dest in one step, writes a marker object
     `merges/<topic>/applied/<dest partition>/<merge id>.json`, and produces `merge_done`
     back only once a checkpoint covers the `merge_in` record.
  3. `merge_done` on src's partition: with `clear_source`, deletes exactly the exported
     items whose stored clock still equals the exported clock (items added or updated
     after the merge record stay), then acknowledges to the merge's requester (its reply
     headers travel in the `reply` field). Once a checkpoint covers `merge_done`, the
     export object and the marker are deleted.

Into a sharded index DEST (S members): step 2 happens at DEST's home, which checks the
source's dim and space (carried by `merge_in`) against its catalog and forwards the
`merge_in` (signed, `origin`) to every member `DEST#s`, or refuses it with one
`merge_done` (an alias, another dim or space: nothing applied anywhere). Each member
applies the exported items of its shard and answers its own `merge_done` (`dest_shard`,
`dest_shards`; marker `<merge id>-s<s>.json`). The source clears that shard's exported
ids; once a checkpoint covers it, it writes the fact `merges/<topic>/done/<p>/<merge
id>/<s>.json` and removes the member's marker; the step that finds every shard's fact
acknowledges the requester and removes the export, the home's marker and the facts.

Every step is idempotent, so a crash anywhere followed by replay converges to one merge:
a replayed `merge` rewrites the same export and produces a duplicate `merge_in`; a
`merge_in` whose marker names an earlier offset, or whose export object is already gone,
is a duplicate and is skipped; a second `merge_done` finds nothing left to delete. A
crash after dest's checkpoint but before `merge_done` was produced is repaired by a
sweeper that re-produces `merge_done` for every marker a checkpoint covers and that this
process has not produced (and again every `RESEND_AFTER_S`, until src removes the marker).
One caveat: dedup of a duplicate `merge_in` relies on the marker written at the first
one, so a user write to dest between the two cannot be undone by the duplicate.

A replayed step writes the same bytes again; the objects are not rewritten when they
already hold them (`put_unless_same`), so the other side never reads an object while it
is overwritten, and reads are checked against the object's ETag (`get_verified`): a
body cut short by the server is read again instead of failing the merge as unreadable.

Trust (DESIGN section 6: a forged protocol record changes nothing). The protocol records
stay on the commands topic: their offsets are the clocks of the merged items and order
them against user writes on the destination's partition, so moving them to another topic
would break replay equivalence. Instead:

- Every `merge_in` and `merge_done` a worker produces carries an HMAC-SHA256 of its key
  and value bytes (`worker/service/protocol_auth.py`: the key is `LHV_INTERNAL_KEY`, or a random
  one the workers keep in their own bucket, created once with a create-only put). A
  record without a valid MAC is rejected (`invalid_request`, dead-letter queue) before
  anything is read, so a forged one changes nothing, however well it names a real merge.
- The records name their objects only as `merge_id_of`/`export_key` derive them from the
  merge record's place; a record naming anything else is rejected, so even a worker's
  record cannot make another worker read or delete other objects.
- Beyond the MAC, the counts and flags of a record are not the truth. What the source
  does at `merge_done` comes from what its own owner wrote: the export object's envelope
  holds `clear_source`, the destination, the requester's reply headers and its `merge`
  record (key, value, headers, bounded by `MAX_ORIGIN_BYTES`). What the destination did
  (applied, skipped, or its error) is read from the destination's marker object, not
  from the record's `applied`. `lhv replay --verify` checks the MAC the same way and
  takes `clear_source` from the export it rebuilt; the marker is gone by then, so it
  takes the error from the (verified) record, which the destination produced from the
  marker's body.

Errors (the record is rejected, nothing changes): merging an index into itself
(`invalid_request`), unknown source or destination (`index_not_found`), another dim
(`dim_mismatch`) or space (`invalid_request`). Across partitions, the destination's
error comes back to the source's owner, which dead-letters the requester's own `merge`
record (its key, value and headers, with DLQ headers naming the merge record's partition
and offset) and sends the error ack to the requester.

Import (`import` record keyed by the index) loads `s3://bucket/key` with the worker's S3
endpoint and credentials, only from the allowed sources and within the bounds of
`ImportPolicy` (`worker/service/importsource.py`: `LHV_IMPORT_SOURCES`, default the `imports/`
prefix of the workers' own bucket and prefix; never the workers' own checkpoint, merge or
key objects):

- `.npy`: a 2-D float array (no pickles), one row per item; ids from `ids_source` (a
  `.npy` of strings or integers, or a text file with one id per line) or else the row
  number in decimal;
- `.npz`: the vectors array (`vectors`, else `embeddings`, `x` or `data`, else the only
  array besides `ids`) and optionally `ids` (`worker.wire.arrays`, as `lhv load` reads it);
- `.lhv`: an LHV1 snapshot (ids, vectors, metadata and client versions);
- `metadata_source`: JSON Lines, one object (or null: keep the stored metadata) per row.

Every row becomes an upsert with clock `(version, import offset, row)` through the same
`Index.validate`/`Index.apply` path as `add`. The whole import is validated before
anything is applied, so an invalid row (its number is the error's `item`) rejects the
import with nothing applied (error messages name rows of the import, never what was
read); it is then applied `chunk_items` rows per engine call, each
chunk whole-or-nothing. A replay reads the objects again: keep them unchanged until a
checkpoint covers the import record.

Failpoints (`worker.service.failpoints`): `merge_exported` (src: export written, `merge_in` not
produced), `merge_in_produced` (src: `merge_in` produced, merge record not
checkpointed), `merge_in_applied` (dest: items applied and marker written, not
checkpointed), `merge_done_pending` (dest: checkpoint covers `merge_in`, `merge_done` not
produced), `merge_done_applied` (src: source cleared in memory, not checkpointed),
`merge_cleanup_pending` (src: checkpoint covers `merge_done`, objects not deleted).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson

from lhv_index import (
    Clock,
    Delete,
    EngineKind,
    Index,
    IndexParams,
    Item,
    Upsert,
    Write,
    read_frame,
    read_snapshot,
    write_snapshot,
)
from lhv_index.errors import (
    DimMismatch,
    IndexNotFound,
    Internal,
    InvalidRequest,
    LhvError,
    SnapshotError,
)
from worker.service import failpoints
from worker.service.apply import Outcome
from worker.service.catalog import Alias, CatalogEntry
from worker.service.config import ImportPolicy
from worker.service.importsource import (
    SourcePolicy,
    as_import_error,
    decode_npy,
    decode_npz,
    read_object,
    row_of,
)
from worker.service.partition import Partition, PartitionStatus
from worker.service.ports import KafkaPort, PartitionRegistry, TaskOwner
from worker.service.protocol_auth import ProtocolAuth, load_protocol_auth
from worker.service.sharding import forward_merge_in, member_shard
from worker.storage.blobstore import (
    BlobNotFound,
    BlobStore,
    S3Config,
    get_verified,
    put_unless_same,
)
from worker.telemetry.logs import log_context
from worker.wire.arrays import ID_KINDS, VECTOR_KINDS, VECTOR_MEMBERS, ArrayFileError, ids_of
from worker.wire.commands import ImportCommand, MergeCommand, MergeDoneCommand, MergeInCommand
from worker.wire.headers import ReplyTo
from worker.wire.replies import Ack, ErrorInfo
from worker.wire.shards import parse_shard_name, shard_key, shard_of
from worker.wire.topics import TopicsConfig, home_partition

__all__ = [
    "MAX_ORIGIN_BYTES",
    "ExportInfo",
    "MergeProtocol",
    "MergeResult",
    "OwnerWrites",
    "ProtocolWrites",
    "apply_import",
    "check_merge_done",
    "check_merge_in",
    "export_key",
    "export_source",
    "finish_merge",
    "finish_merge_shard",
    "home_merge_in",
    "import_fetcher",
    "marker_key",
    "merge_id_of",
    "merge_locally",
    "merges_locally",
    "receive_export",
    "validate_import",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how often the sweeper looks for `merge_done` records to (re-)produce
SWEEP_INTERVAL_S = 3.0
#: a marker still present this long after its `merge_done` was produced is produced again
RESEND_AFTER_S = 300.0
_MERGE_ID = re.compile(r"m(\d+)-(\d+)")
#: bound of one S3 transfer or Kafka send made from the apply thread
STEP_TIMEOUT_S = 600.0
#: a read-only copy that found no protocol key looks for it again at most this often
_KEY_LOOK_AGAIN_S = 5.0
#: bound of the requester's merge record value, and of its headers, kept in an export
MAX_ORIGIN_BYTES = 64 * 1024


def merge_id_of(partition: int, offset: int) -> str:
    """The merge id of the `merge` record at (`partition`, `offset`)."""
    return f"m{partition}-{offset}"


def export_key(topic: str, partition: int, offset: int) -> str:
    """Key (under the workers' prefix) of the export of the merge record at that place."""
    return f"merges/{topic}/exports/{partition:05d}/{offset:020d}.lhv"


def marker_key(topic: str, dest_partition: int, merge_id: str, shard: int | None = None) -> str:
    """Key of the marker saying that dest's partition applied `merge_in` of `merge_id`
    (with `shard`: that member `DEST#shard` of a sharded destination applied its shard;
    two members of one destination may share a partition)."""
    name = merge_id if shard is None else f"{merge_id}-s{shard}"
    return f"merges/{topic}/applied/{dest_partition:05d}/{name}.json"


def done_key(topic: str, src_partition: int, merge_id: str, shard: int) -> str:
    """Key of the fact that the source's partition finished (cleared, durably: written
    once a checkpoint covers the `merge_done`) destination shard `shard` of `merge_id`."""
    return f"{done_prefix(topic, src_partition, merge_id)}{shard}.json"


def done_prefix(topic: str, src_partition: int, merge_id: str) -> str:
    return f"merges/{topic}/done/{src_partition:05d}/{merge_id}/"


def _merge_source(partition: Partition, cmd: MergeCommand) -> tuple[Index, list[Item]]:
    """The source index of a merge and its live items (sorted by id), or the error."""
    member = parse_shard_name(cmd.index)
    if cmd.dest == cmd.index or (member is not None and member.base == cmd.dest):
        raise InvalidRequest(f"merge: index {cmd.dest!r} cannot be merged into itself")
    src = partition.indexes.get(cmd.index)
    if src is None:
        raise IndexNotFound(f"merge: source index {cmd.index!r} does not exist")
    return src, _sorted_live(src)


def merges_locally(partition: Partition, cmd: MergeCommand, num_partitions: int) -> bool:
    """Whether the merge of `cmd` is applied in one step on `partition` (its destination is
    an index of this partition); False: across partitions (`merge_in` to the destination's
    home, which may be this partition when it holds the destination's catalog entry: a
    sharded destination's members get it from there).

    Raises:
        InvalidRequest: the destination is an alias (homed here).
    """
    entry = partition.catalog.get(cmd.dest)
    if isinstance(entry, Alias):
        raise _alias_dest(cmd.dest, entry)
    if entry is not None:
        return False
    return home_partition(cmd.dest.encode(), num_partitions) == partition.number


def _alias_dest(name: str, entry: Alias) -> InvalidRequest:
    return InvalidRequest(
        f"merge: the destination {name!r} is an alias (of {entry.target!r}): merge into "
        f"{entry.target!r} (a merge's destination is not resolved through an alias)"
    )


def merge_locally(partition: Partition, cmd: MergeCommand, out: Outcome) -> None:
    """Apply a merge whose source and destination live on `partition`, in one step (no
    S3, no Kafka); shared by the worker and `lhv replay --verify`.

    Raises:
        LhvError: nothing changed (unknown source or destination, self-merge, dim or
            space mismatch).
    """
    src, items = _merge_source(partition, cmd)
    dest = partition.indexes.get(cmd.dest)
    if dest is None:
        raise IndexNotFound(f"merge: destination index {cmd.dest!r} does not exist")
    _check_compatible(src, dest)
    applied = _merge_into(dest, items, out.offset)
    partition.dirty.add(cmd.dest)
    if cmd.clear_source:
        cleared = _clear(src, items, out.offset)
        partition.dirty.add(cmd.index)
    else:
        cleared = 0
    out.applied, out.skipped = applied, len(items) - applied
    log.info(
        "merged %d of %d items of %s into %s (same partition), cleared %d",
        applied,
        len(items),
        cmd.index,
        cmd.dest,
        cleared,
    )


# -- the steps of a merge across partitions, without S3 or Kafka ------------------------
# The worker's `MergeProtocol` moves their bytes through S3 and Kafka; `lhv replay
# --verify` hands them over in memory.


def export_source(
    partition: Partition, cmd: MergeCommand, topic: str, out: Outcome
) -> tuple[bytes, int]:
    """Source side of `merge` (the record of `out`): the export object of `cmd.index`'s
    live items (an LHV1 snapshot, see `_export_bytes`) and how many items it holds. Its
    envelope's `source` holds what the source's owner needs at `merge_done` (`ExportInfo`).

    Raises:
        LhvError: unknown source, or a merge into itself (nothing exported).
    """
    src, items = _merge_source(partition, cmd)
    source = {
        "topic": topic,
        "partition": partition.number,
        "offset": out.offset,
        "dest": cmd.dest,
        "clear_source": cmd.clear_source,
        "reply": None if cmd.reply_to is None else cmd.reply_to.to_wire(),
        "origin": _origin_record(cmd, out),
    }
    return _export_bytes(src, items, source), len(items)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _origin_record(cmd: MergeCommand, out: Outcome) -> dict[str, Any]:
    """The requester's `merge` record, bounded: a value over `MAX_ORIGIN_BYTES` (padding:
    the schema keeps a merge small) is replaced by its compact JSON, and headers past
    `MAX_ORIGIN_BYTES` in total are dropped (counted in `lhv_headers_dropped`)."""
    value = out.value or b""
    if len(value) > MAX_ORIGIN_BYTES:
        body: dict[str, Any] = {"op": "merge", "index": cmd.index, "dest": cmd.dest}
        body["clear_source"] = cmd.clear_source
        if cmd.request_id is not None:
            body["request_id"] = cmd.request_id
        value = orjson.dumps(body)
    headers: list[list[str]] = []
    used = dropped = 0
    for name, hval in out.headers or ():
        size = len(name.encode("utf-8", "replace")) + len(hval or b"")
        if used + size > MAX_ORIGIN_BYTES:
            dropped += 1
            continue
        used += size
        headers.append([name, _b64(hval or b"")])
    if dropped:
        headers.append(["lhv_headers_dropped", _b64(str(dropped).encode("ascii"))])
    return {"key": _b64(out.key or b""), "value": _b64(value), "headers": headers}


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the source's owner wrote in an export's envelope about its merge."""

    index: str
    partition: int
    offset: int
    dest: str
    clear_source: bool
    reply: ReplyTo | None
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]

    @classmethod
    def of(cls, data: bytes) -> ExportInfo:
        """Parse the header and envelope of an export object (no sections are read).

        Raises:
            Internal: not an export object written by this version.
        """
        try:
            envelope = read_frame(data, verify=False).envelope
            src = envelope["source"]
            origin = src["origin"]
            reply = src.get("reply")
            return cls(
                index=str(envelope["name"]),
                partition=int(src["partition"]),
                offset=int(src["offset"]),
                dest=str(src["dest"]),
                clear_source=src["clear_source"] is True,
                reply=None if reply is None else ReplyTo.from_wire(reply),
                key=base64.b64decode(origin["key"]),
                value=base64.b64decode(origin["value"]),
                headers=[(str(n), base64.b64decode(v)) for n, v in origin["headers"]],
            )
        except (SnapshotError, ValueError, KeyError, TypeError) as exc:
            raise Internal(f"merge: unreadable export envelope: {exc}") from exc


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What the destination did with a merge: applied and skipped, or its error."""

    applied: int = 0
    skipped: int = 0
    error: ErrorInfo | None = None

    @classmethod
    def of_body(cls, body: Mapping[str, Any]) -> MergeResult:
        """From a `merge_done` body (as the destination's marker holds it)."""
        error = body.get("error")
        return cls(
            applied=int(body.get("applied") or 0),
            skipped=int(body.get("skipped") or 0),
            error=None
            if error is None
            else ErrorInfo(str(error["code"]), str(error["message"]), error.get("item")),
        )


def check_merge_in(topic: str, cmd: MergeInCommand) -> None:
    """Raise `InvalidRequest` unless `cmd` names the merge id and export object that its
    origin (`origin_partition`, `origin_offset`) derives (a forged record reads nothing)."""
    if cmd.merge_id != merge_id_of(cmd.origin_partition, cmd.origin_offset) or (
        cmd.export != export_key(topic, cmd.origin_partition, cmd.origin_offset)
    ):
        raise InvalidRequest(
            f"merge_in: {cmd.merge_id!r} and {cmd.export!r} do not match the merge record "
            f"at partition {cmd.origin_partition}, offset {cmd.origin_offset}"
        )


def check_merge_done(topic: str, partition: int, cmd: MergeDoneCommand) -> int:
    """The offset of the `merge` record on `partition` that `cmd` completes.

    Raises:
        InvalidRequest: `cmd` names no merge of this partition (or another export object).
    """
    origin = _MERGE_ID.fullmatch(cmd.merge_id)
    if (
        origin is None
        or int(origin[1]) != partition
        or cmd.export != export_key(topic, partition, int(origin[2]))
    ):
        raise InvalidRequest(
            f"merge_done: {cmd.merge_id!r} and {cmd.export!r} name no merge of this partition"
        )
    if (cmd.dest_shard is None) != (cmd.dest_shards is None) or (
        cmd.dest_shards is not None
        and cmd.dest_shard is not None
        and not 0 <= cmd.dest_shard < cmd.dest_shards
    ):
        raise InvalidRequest("merge_done: dest_shard and dest_shards name no member")
    return int(origin[2])


def receive_export(
    partition: Partition, cmd: MergeInCommand, out: Outcome, data: bytes
) -> MergeDoneCommand:
    """Destination side of `merge_in`: apply the exported items (`data`) not live in the
    destination, in one step; returns the `merge_done` to send back, which carries the
    destination's error instead when nothing was applied (missing or incompatible index).

    Raises:
        Internal: the export's envelope does not describe this merge (nothing applied).
    """
    info = ExportInfo.of(data)
    member = member_shard(partition, cmd.index)
    dest = cmd.index if member is None else member[0]
    if (info.index, info.dest, info.partition, info.offset) != (
        cmd.source_index,
        dest,
        cmd.origin_partition,
        cmd.origin_offset,
    ):
        raise Internal(f"merge {cmd.merge_id}: the export object describes another merge")
    done = MergeDoneCommand(
        index=cmd.source_index,
        request_id=cmd.request_id,
        dest=dest,
        export=cmd.export,
        merge_id=cmd.merge_id,
        clear_source=info.clear_source,
        reply=info.reply,
        dest_shard=None if member is None else member[1],
        dest_shards=None if member is None else member[2],
    )
    try:
        items = _read_export(data, dest=partition.indexes.get(cmd.index), name=cmd.index)
        if member is not None:  # a member of a sharded destination takes its shard's items
            items = [it for it in items if shard_of(it.id, member[2]) == member[1]]
        applied = _merge_into(partition.indexes[cmd.index], items, out.offset)
    except LhvError as exc:
        out.skipped = 1
        log.warning("merge %s rejected by the destination: %s", cmd.merge_id, exc.message)
        return replace(done, error=ErrorInfo.of(exc))
    partition.dirty.add(cmd.index)
    out.applied, out.skipped = applied, len(items) - applied
    log.info(
        "merge %s: applied %d of %d items from %s",
        cmd.merge_id,
        applied,
        len(items),
        cmd.source_index,
    )
    return replace(done, applied=applied, skipped=len(items) - applied)


def finish_merge(
    partition: Partition, cmd: MergeDoneCommand, out: Outcome, data: bytes, result: MergeResult
) -> None:
    """Source side of `merge_done`: acknowledge the merge's requester with `result` (what
    the destination did) and, when the export's envelope says `clear_source`, delete
    exactly the exported items (`data`) whose clock is still the exported one.

    Flags come from the envelope the source's owner wrote, never from `cmd`. When the
    destination failed, `out` becomes the requester's `merge` record (key, value, headers,
    offset), so it is that record that goes to the dead-letter queue.

    Raises:
        LhvError: the destination's error (nothing changed), or `Internal` when the export
            does not describe this merge.
    """
    info = ExportInfo.of(data)
    if (info.index, info.dest, info.partition) != (cmd.index, cmd.dest, partition.number):
        raise Internal(f"merge {cmd.merge_id}: the export object describes another merge")
    out.op = "merge"
    out.reply_to = info.reply
    if result.error is not None:
        log.warning(
            "merge %s into %s failed at the destination: %s",
            cmd.merge_id,
            cmd.dest,
            result.error.message,
        )
        out.key, out.value, out.headers = info.key, info.value, info.headers
        out.offset = info.offset
        raise result.error.to_error()
    out.applied, out.skipped = result.applied, result.skipped
    if not info.clear_source:
        return
    src = partition.indexes.get(cmd.index)
    if src is None:
        log.warning("merge %s: source %s is gone, nothing to clear", cmd.merge_id, cmd.index)
        return
    exported = _read_export(data)
    cleared = _clear(src, exported, out.offset)
    if cleared:
        partition.dirty.add(cmd.index)
    log.info(
        "merge %s: %d items now in %s; cleared %d of %d exported from %s",
        cmd.merge_id,
        result.applied,
        cmd.dest,
        cleared,
        len(exported),
        cmd.index,
    )


def finish_merge_shard(
    partition: Partition, cmd: MergeDoneCommand, out: Outcome, data: bytes, result: MergeResult
) -> ExportInfo:
    """Source side of a `merge_done` from member `dest_shard` of a sharded destination:
    when the export's envelope says `clear_source` (and the member applied), delete the
    exported items of that shard (`shard_of(id, dest_shards) == dest_shard`) whose clock
    is still the exported one. Idempotent per shard: a second time finds nothing to
    delete. The requester is acknowledged once every shard is done (`MergeProtocol`), so
    `out` gets no reply; returns the export's envelope.

    Raises:
        Internal: the export does not describe this merge.
    """
    info = ExportInfo.of(data)
    if (info.index, info.dest, info.partition) != (cmd.index, cmd.dest, partition.number):
        raise Internal(f"merge {cmd.merge_id}: the export object describes another merge")
    shard, shards = cmd.dest_shard, cmd.dest_shards
    assert shard is not None and shards is not None
    out.op = "merge"
    out.reply_to = None
    if result.error is not None:
        out.skipped = 1
        log.warning(
            "merge %s: shard %d of %s failed: %s",
            cmd.merge_id,
            shard,
            cmd.dest,
            result.error.message,
        )
        return info
    out.applied, out.skipped = result.applied, result.skipped
    src = partition.indexes.get(cmd.index)
    if not info.clear_source or src is None:
        return info
    exported = [it for it in _read_export(data) if shard_of(it.id, shards) == shard]
    cleared = _clear(src, exported, out.offset)
    if cleared:
        partition.dirty.add(cmd.index)
    log.info(
        "merge %s: shard %d of %s done (%d applied); cleared %d of its %d exported from %s",
        cmd.merge_id,
        shard,
        cmd.dest,
        result.applied,
        cleared,
        len(exported),
        cmd.index,
    )
    return info


def home_merge_in(
    partition: Partition,
    cmd: MergeInCommand,
    out: Outcome,
    entry: CatalogEntry,
    *,
    auth: ProtocolAuth | None,
    num_partitions: int,
    max_record_bytes: int,
    source_params: Callable[[], tuple[int, str] | None],
) -> MergeDoneCommand | None:
    """The home of a sharded destination (or an alias) at a `merge_in`: check the source's
    dim and space against the catalog's (from the record; `source_params()` reads them
    from the export when it lacks them, None: export gone) and set `out.forwards` to a
    signed `merge_in` (origin: this record, part s) for every member `DEST#s`. Returns the
    `merge_done` carrying the error instead when the merge is refused (an alias, another
    dim or space), so every member refuses or none does; None when forwarded (or, export
    gone, a duplicate: skipped).
    """
    done = MergeDoneCommand(
        index=cmd.source_index,
        request_id=cmd.request_id,
        dest=cmd.index,
        export=cmd.export,
        merge_id=cmd.merge_id,
        clear_source=cmd.clear_source,
        reply=cmd.reply,
    )
    try:
        if isinstance(entry, Alias):
            raise _alias_dest(cmd.index, entry)
        if cmd.dim is not None and cmd.space is not None:
            dim, space = cmd.dim, cmd.space
        else:
            found = source_params()
            if found is None:
                out.skipped = 1
                log.warning("merge %s: export is gone (duplicate skipped)", cmd.merge_id)
                return None
            dim, space = found
        params = IndexParams.from_dict(entry.params)
        if dim != params.dim:
            raise DimMismatch(
                f"merge: {cmd.source_index!r} has dim {dim}, {cmd.index!r} has {params.dim}"
            )
        if space != params.space.value:
            raise InvalidRequest(
                f"merge: {cmd.source_index!r} has space {space}, {cmd.index!r} has "
                f"{params.space.value}"
            )
        out.forwards = forward_merge_in(
            partition,
            cmd,
            entry,
            offset=out.offset,
            auth=auth,
            num_partitions=num_partitions,
            max_record_bytes=max_record_bytes,
        )
    except LhvError as exc:
        out.skipped = 1
        log.warning("merge %s refused by the destination's home: %s", cmd.merge_id, exc.message)
        return replace(done, error=ErrorInfo.of(exc))
    log.info(
        "merge %s: merge_in forwarded to the %d members of %s",
        cmd.merge_id,
        len(out.forwards),
        cmd.index,
    )
    return None


def export_params(data: bytes) -> tuple[int, str]:
    """(dim, space) of the index an export object holds."""
    try:
        export, _ = read_snapshot(data)
    except LhvError as exc:
        raise Internal(f"merge: unreadable export object: {exc.message}") from exc
    return export.params.dim, export.params.space.value


def import_fetcher(
    policy: SourcePolicy,
    run: Callable[[Any], bytes | None],
    *,
    on_missing: Callable[[str], None] | None = None,
) -> Callable[[str, str], bytes]:
    """`fetch(uri, field)` for `apply_import`: checks `uri` against `policy`, then reads it
    within `max_object_bytes` by running `read_object(...)` with `run` (which waits for
    the coroutine on a loop). `on_missing(field)` is told of an object that does not
    exist before the import is refused (a read-only copy restores instead)."""
    s3 = policy.s3

    def fetch(uri: str, field: str) -> bytes:
        bucket, key = policy.check(uri, field)
        data = run(read_object(s3, bucket, key, policy.policy.max_object_bytes))
        if data is None:
            if on_missing is not None:
                on_missing(field)
            raise InvalidRequest(f"import: {field} {uri} does not exist")
        return data

    return fetch


def apply_import(
    partition: Partition,
    cmd: ImportCommand,
    out: Outcome,
    fetch: Callable[[str, str], bytes],
    policy: ImportPolicy,
) -> None:
    """Apply one `import` record: read its objects with `fetch(uri, field)` (see
    `import_fetcher`; it raises `InvalidRequest` for a missing or refused one), decode them
    within `policy`'s bounds, validate every chunk, then apply them; shared by the worker
    and `lhv replay --verify`.

    Raises:
        LhvError: nothing applied (bad or refused source, over a bound, dim mismatch, an
            invalid row).
    """
    index = partition.indexes.get(cmd.index)
    if index is None:
        raise IndexNotFound(f"import: index {cmd.index!r} does not exist")
    started = time.monotonic()
    rows = _load_rows(cmd, fetch, policy)
    member = member_shard(partition, cmd.index)
    if member is not None:  # a member of a sharded index imports the rows of its shard
        rows = rows.of_shard(member[1], member[2])
    _validate_rows(rows, index, cmd, out.offset)
    chunk = max(1, min(cmd.chunk_items, index.limits.max_batch_items))
    loaded = time.monotonic()
    applied = 0
    for start in range(0, rows.n, chunk):
        writes = rows.writes(start, start + chunk, out.offset, cmd.version)
        applied += index.apply(writes).applied
        partition.dirty.add(cmd.index)
    out.applied, out.skipped = applied, rows.n - applied
    log.info(
        "import of %d rows: %d applied, %.2fs to load and validate, %.2fs to apply",
        rows.n,
        applied,
        loaded - started,
        time.monotonic() - loaded,
    )


def validate_import(
    cmd: ImportCommand,
    index: Index,
    fetch: Callable[[str, str], bytes],
    policy: ImportPolicy,
    *,
    offset: int,
) -> None:
    """Read and validate every row of an import against `index`'s parameters without
    applying anything: the home of a sharded index checks an import whole before it
    forwards it to the members.

    Raises:
        LhvError: as `apply_import` (bad or refused source, dim mismatch, an invalid row).
    """
    _validate_rows(_load_rows(cmd, fetch, policy), index, cmd, offset)


def _validate_rows(rows: _Rows, index: Index, cmd: ImportCommand, offset: int) -> None:
    if rows.n and rows.vectors.shape[1] != index.params.dim:
        raise DimMismatch(
            f"import: the vectors of source do not have the dim of index {cmd.index!r} "
            f"({index.params.dim})"
        )
    chunk = max(1, min(cmd.chunk_items, index.limits.max_batch_items))
    for start in range(0, rows.n, chunk):
        writes = rows.writes(start, start + chunk, offset, cmd.version)
        try:
            index.validate(writes)
        except LhvError as exc:
            raise _row_error(exc, writes, start) from None


def _row_error(exc: LhvError, writes: Sequence[Write], start: int) -> LhvError:
    """`exc` of a chunk's validation as the import's error: named by the row of the
    import, without the id or anything else read from the objects."""
    if exc.item is None or not 0 <= exc.item < len(writes):
        return type(exc)(f"import: {exc.message}")
    row = start + exc.item
    why = exc.message.removeprefix(f"item {exc.item} (id {writes[exc.item].id!r}): ")
    return type(exc)(f"import: row {row}: {why}", item=row)


def _load_rows(
    cmd: ImportCommand, fetch: Callable[[str, str], bytes], policy: ImportPolicy
) -> _Rows:
    data = fetch(cmd.source, "source")  # refused before anything else when not allowed
    fmt = cmd.format or _format_of(cmd.source)
    if fmt == "lhv":
        try:
            snap, _ = read_snapshot(data)
        except LhvError as exc:
            raise InvalidRequest("import: source is not a readable LHV1 snapshot") from exc
        items = _sorted_live(snap)
        rows = _Rows(
            vectors=np.stack([_vector(it) for it in items]).astype(np.float32, copy=False)
            if items
            else np.zeros((0, snap.params.dim), np.float32),
            ids=[it.id for it in items],
            metadata=[it.metadata for it in items],
            versions=[it.clock.version for it in items],
        )
    else:
        vectors, ids = _decode_arrays(data, fmt, policy)
        rows = _Rows(vectors=vectors, ids=ids)
    del data
    if cmd.ids_source is not None:
        rows.ids = _decode_ids(fetch(cmd.ids_source, "ids_source"), cmd.ids_source, policy)
    if cmd.metadata_source is not None:
        rows.metadata = _decode_metadata(fetch(cmd.metadata_source, "metadata_source"))
    rows.check()
    return rows


class ProtocolWrites(Protocol):
    """Everything the merge and import steps do outside the partition's memory: objects
    written or deleted, protocol records produced, steps run once a checkpoint covers a
    record, and what to do when an object a step reads is gone.

    The owner's (`OwnerWrites`) does all of it. A read-only copy's
    (`worker.service.follower.ReadOnlyWrites`) does none of it (the owner does) and,
    when an object is gone, restores from the newest manifest instead of guessing: the
    one gate between the steps and the outside, so a read-only copy cannot write by a
    path someone forgot.
    """

    @property
    def owner(self) -> bool:
        """The partition owner's: the protocol key may be created, the sweeper runs."""
        ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def delete(self, key: str) -> None:
        """Delete `key` (absent: nothing)."""
        ...

    async def send(
        self, topic: str, *, key: bytes, value: bytes, partition: int, headers: Sequence[Any]
    ) -> None:
        """Produce one signed protocol record."""
        ...

    def after_checkpoint(
        self, partition: Partition, offset: int, step: Callable[[], Awaitable[None]]
    ) -> None:
        """Run `step` once a checkpoint covers `offset` (and checkpoint soon)."""
        ...

    async def gone(self, partition: Partition, offset: int, what: str) -> None:
        """The object `what` that the step at `offset` reads is gone. The owner returns
        (the step completed earlier: a duplicate); a read-only copy raises
        `RestoreNeeded` when the newest manifest covers `offset`."""
        ...


class OwnerWrites:
    """The partition owner's `ProtocolWrites`: the workers' bucket and the protocol
    producer; an object is not rewritten when it holds the same bytes already."""

    owner = True

    def __init__(self, blobs: BlobStore, kafka: KafkaPort, *, every_records: int) -> None:
        self._blobs = blobs
        self._kafka = kafka
        self._every_records = every_records

    async def put(self, key: str, data: bytes) -> None:
        # A replayed step writes the same bytes again: never overwrite them while the
        # other side may be reading (`put_unless_same`).
        if not await put_unless_same(self._blobs, key, data):
            log.info("%s already holds these bytes (written by an earlier run)", key)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(BlobNotFound):
            await self._blobs.delete(key)

    async def send(
        self, topic: str, *, key: bytes, value: bytes, partition: int, headers: Sequence[Any]
    ) -> None:
        await self._kafka.send_internal(
            topic, key=key, value=value, partition=partition, headers=headers
        )

    def after_checkpoint(
        self, partition: Partition, offset: int, step: Callable[[], Awaitable[None]]
    ) -> None:
        partition.after_checkpoint.append((offset, step))
        _checkpoint_soon(partition, self._every_records)

    async def gone(self, partition: Partition, offset: int, what: str) -> None:
        return None


class MergeProtocol:
    """The worker's barrier steps (`BarrierSteps`) for `merge`, `merge_in`, `merge_done`
    and `import`; `apply.run_barrier` dispatches to them.

    Called in a partition's apply thread; its S3 and Kafka steps run on the event loop
    it was started on (`_wait`). `start()` launches the sweeper (see the module docstring).

    Arguments:
        registry: the owned partitions (read only; the sweeper visits them) and the
            partition count.
        kafka: produces the signed protocol records (`send_internal`).
        blobs: the workers' store: exports, markers, the internal key.
        tasks: runs the sweeper as a long-lived task (a crash ends the worker).
        checkpoint_every_records: a protocol step sets the partition's record count to
            this, so its runner checkpoints right after the batch.
        writes: what the steps write (`ProtocolWrites`); default the owner's
            (`OwnerWrites`); a read replica passes its read-only one.
        max_record_bytes: bound of a forwarded `merge_in` (`max_message_bytes`).
        acks: sends an acknowledgement (reply headers, value): the requester of a merge
            into a sharded index is acknowledged once every shard is done.
    """

    def __init__(
        self,
        *,
        topics: TopicsConfig,
        registry: PartitionRegistry,
        kafka: KafkaPort,
        blobs: BlobStore,
        tasks: TaskOwner,
        imports: ImportPolicy,
        s3: S3Config,
        internal_key: str | None,
        checkpoint_every_records: int,
        writes: ProtocolWrites | None = None,
        max_record_bytes: int = 1 << 20,
        acks: Callable[[ReplyTo, bytes], Awaitable[object]] | None = None,
    ) -> None:
        self._topics = topics
        self._registry = registry
        self._blobs = blobs
        self._tasks = tasks
        self._imports = imports
        self._internal_key = internal_key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._produced: dict[str, float] = {}
        """merge id -> when this process produced its merge_done (monotonic)"""
        self._auth: ProtocolAuth | None = None
        self._sources = SourcePolicy(imports, s3)
        self._key_looked = 0.0
        self._writes: ProtocolWrites = writes or OwnerWrites(
            blobs, kafka, every_records=checkpoint_every_records
        )
        self._max_record_bytes = max_record_bytes
        self._acks = acks
        self._finishing: dict[str, asyncio.Lock] = {}
        """merge id -> held while one of its shards is finished (after a checkpoint)"""

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load (or, the owner, create) the internal protocol key, then (the owner) start
        the sweeper; it is cancelled with the worker's other background steps.

        Raises:
            BlobStoreError: the key object could not be read or created.
        """
        self._loop = asyncio.get_running_loop()
        owner = self._writes.owner
        self._auth = await load_protocol_auth(
            self._blobs, self._topics.commands, self._internal_key, create=owner
        )
        if owner:
            self._tasks.start(self._sweep_forever(), name="merge_sweeper")

    @property
    def auth(self) -> ProtocolAuth:
        if self._auth is None:
            raise Internal("merge protocol not started: no internal key")
        if not self._auth.can_sign and not self._writes.owner and self._may_look_again():
            # A read-only copy started before any owner created the key: the first owner
            # creates it before it signs anything, so look again (from the apply thread).
            self._auth = self._wait(
                load_protocol_auth(
                    self._blobs, self._topics.commands, self._internal_key, create=False
                )
            )
        return self._auth

    def _may_look_again(self) -> bool:
        """Off the loop, and not more often than every `_KEY_LOOK_AGAIN_S`."""
        try:
            asyncio.get_running_loop()
            return False  # on the loop: `_wait` would block it
        except RuntimeError:
            pass
        now = time.monotonic()
        if now - self._key_looked < _KEY_LOOK_AGAIN_S:
            return False
        self._key_looked = now
        return True

    # -- merge: the source's side ---------------------------------------------------------

    def merge(self, partition: Partition, cmd: MergeCommand, out: Outcome) -> None:
        dest_partition = home_partition(cmd.dest.encode(), self._registry.num_partitions)
        if merges_locally(partition, cmd, self._registry.num_partitions):
            merge_locally(partition, cmd, out)
            return
        topic = self._topics.commands
        merge_id = merge_id_of(partition.number, out.offset)
        key = export_key(topic, partition.number, out.offset)
        data, exported = export_source(partition, cmd, topic, out)
        self._wait(self._put(key, data))
        failpoints.hit("merge_exported")
        merge_in = MergeInCommand(
            index=cmd.dest,
            request_id=cmd.request_id,
            source_index=cmd.index,
            export=key,
            merge_id=merge_id,
            origin_partition=partition.number,
            origin_offset=out.offset,
            clear_source=cmd.clear_source,
            reply=cmd.reply_to,
            dim=partition.indexes[cmd.index].params.dim,
            space=partition.indexes[cmd.index].params.space.value,
        )
        try:
            self._wait(self._produce(*merge_in.encode()))
        except Exception as exc:
            self._wait(self._delete_quietly(key))
            raise Internal(f"merge: could not produce merge_in: {exc}") from exc
        failpoints.hit("merge_in_produced")
        out.reply_to = None  # the requester's ack comes with merge_done
        log.info(
            "merge %s: exported %d items of %s (%d bytes) for %s on partition %d",
            merge_id,
            exported,
            cmd.index,
            len(data),
            cmd.dest,
            dest_partition,
        )

    def merge_done(self, partition: Partition, cmd: MergeDoneCommand, out: Outcome) -> None:
        topic = self._topics.commands
        self.auth.verify(out.key, out.value, out.headers, "merge_done")
        check_merge_done(topic, partition.number, cmd)
        out.op = "merge"
        if cmd.dest_shards is not None:
            self._merge_done_shard(partition, cmd, out)
            return
        dest_partition = home_partition(cmd.dest.encode(), self._registry.num_partitions)
        marker = marker_key(topic, dest_partition, cmd.merge_id)
        self._writes.after_checkpoint(
            partition, out.offset, lambda: self._cleanup(cmd.merge_id, cmd.export, marker)
        )
        data = self._wait(self._get(cmd.export))
        if data is None:
            self._wait(self._writes.gone(partition, out.offset, cmd.export))
            # Only deleted after a checkpoint covered an earlier merge_done: a duplicate.
            out.reply_to = None
            log.info("merge %s: already completed (export removed)", cmd.merge_id)
            return
        # The export is deleted before the marker, so the marker is still there.
        seen = self._wait(self._get(marker))
        if seen is None:
            self._wait(self._writes.gone(partition, out.offset, marker))
            raise Internal(f"merge {cmd.merge_id}: the destination's marker {marker} is missing")
        result = MergeResult.of_body(orjson.loads(_marker_value(orjson.loads(seen))))
        finish_merge(partition, cmd, out, data, result)
        failpoints.hit("merge_done_applied")

    def _merge_done_shard(self, partition: Partition, cmd: MergeDoneCommand, out: Outcome) -> None:
        """`merge_done` of one member of a sharded destination: clear that shard's
        exported ids; once a checkpoint covers it, `_shard_done` records the shard done
        and, when it was the last, acknowledges the requester and removes the objects."""
        assert cmd.dest_shard is not None and cmd.dest_shards is not None
        topic = self._topics.commands
        shard, shards = cmd.dest_shard, cmd.dest_shards
        member = shard_key(cmd.dest, shard, shards)
        where = home_partition(member.encode(), self._registry.num_partitions)
        home = home_partition(cmd.dest.encode(), self._registry.num_partitions)
        step = _ShardDone(
            partition=partition.number,
            cmd=cmd,
            marker=marker_key(topic, where, cmd.merge_id, shard),
            home_marker=marker_key(topic, home, cmd.merge_id),
        )
        out.reply_to = None
        data = self._wait(self._get(cmd.export))
        if data is None:
            # The merge completed; a marker left by a step that failed midway brings the
            # member's sweeper back here: remove what is left once this is covered.
            self._wait(self._writes.gone(partition, out.offset, cmd.export))
            out.skipped = 1
            log.info("merge %s: already completed (export removed)", cmd.merge_id)
            self._writes.after_checkpoint(partition, out.offset, lambda: self._leftovers(step))
            return
        seen = self._wait(self._get(step.marker))
        if seen is None:
            # removed only once this partition recorded the shard done: a duplicate
            self._wait(self._writes.gone(partition, out.offset, step.marker))
            out.skipped = 1
            log.info("merge %s: shard %d already done", cmd.merge_id, shard)
            return
        result = MergeResult.of_body(orjson.loads(_marker_value(orjson.loads(seen))))
        info = finish_merge_shard(partition, cmd, out, data, result)
        del data
        failpoints.hit("merge_done_applied")
        step = replace(step, info=info, result=result)
        self._writes.after_checkpoint(partition, out.offset, lambda: self._shard_done(step))

    async def _shard_done(self, step: _ShardDone) -> None:
        """After a checkpoint covers a shard's `merge_done`: record the shard done (an
        object: a durable fact now) and remove its member's marker; when every shard is
        done instead, acknowledge the requester, then remove the export, the home's
        marker, the facts and this shard's marker.

        The member's marker goes last: while it stays, the member's sweeper produces
        `merge_done` again and this step is redone (or, export gone, `_leftovers`), so a
        step that failed midway is finished by a later one."""
        cmd, info, result = step.cmd, step.info, step.result
        assert cmd.dest_shard is not None and cmd.dest_shards is not None
        assert info is not None and result is not None
        topic = self._topics.commands
        lock = self._finishing.setdefault(cmd.merge_id, asyncio.Lock())
        async with lock:
            failpoints.hit("merge_cleanup_pending")
            try:
                await self._blobs.head(cmd.export)
            except BlobNotFound:  # completed by an earlier step: leave no fact behind
                await self._leftovers(step)
                return
            body: dict[str, Any] = {"applied": result.applied, "skipped": result.skipped}
            if result.error is not None:
                body["error"] = result.error.to_wire()
            fact = done_key(topic, step.partition, cmd.merge_id, cmd.dest_shard)
            await self._put(fact, orjson.dumps(body))
            facts = await self._blobs.list(done_prefix(topic, step.partition, cmd.merge_id))
            if len(facts) < cmd.dest_shards:
                await self._delete_quietly(step.marker)
                return
            applied = skipped = 0
            errors: list[ErrorInfo] = []
            for key in sorted(facts):
                seen = await self._get(key)
                if seen is None:
                    continue
                done = MergeResult.of_body(orjson.loads(seen))
                applied, skipped = applied + done.applied, skipped + done.skipped
                if done.error is not None:
                    errors.append(done.error)
            if info.reply is not None and self._acks is not None:
                ack = Ack(
                    reply_to=info.reply,
                    offset=info.offset,
                    index=cmd.index,
                    op="merge",
                    request_id=cmd.request_id,
                    applied=applied,
                    skipped=skipped,
                    error=None if not errors else _shards_failed(cmd, errors),
                )
                await self._acks(info.reply, ack.encode())
            for key in (cmd.export, step.home_marker, *facts, step.marker):
                await self._writes.delete(key)
            self._finishing.pop(cmd.merge_id, None)
        log.info(
            "merge %s complete: every shard of %s done, objects removed", cmd.merge_id, cmd.dest
        )

    async def _leftovers(self, step: _ShardDone) -> None:
        """Remove what a completed merge into a sharded index left behind (its export is
        gone): the home's marker, the facts, this shard's marker."""
        cmd = step.cmd
        prefix = done_prefix(self._topics.commands, step.partition, cmd.merge_id)
        for key in (step.home_marker, *await self._blobs.list(prefix), step.marker):
            await self._writes.delete(key)

    async def _cleanup(self, merge_id: str, export: str, marker: str) -> None:
        failpoints.hit("merge_cleanup_pending")
        for key in (export, marker):
            await self._writes.delete(key)
        log.info("merge %s complete: export and marker removed", merge_id)

    # -- merge: the destination's side ----------------------------------------------------

    def merge_in(self, partition: Partition, cmd: MergeInCommand, out: Outcome) -> None:
        topic = self._topics.commands
        self.auth.verify(out.key, out.value, out.headers, "merge_in")
        check_merge_in(topic, cmd)
        member = member_shard(partition, cmd.index)
        marker = marker_key(
            topic, partition.number, cmd.merge_id, None if member is None else member[1]
        )
        seen = _read_marker(marker, self._wait(self._get(marker)))
        if seen is not None and int(seen["offset"]) < out.offset:
            out.skipped = 1
            log.info("merge %s: duplicate merge_in skipped", cmd.merge_id)
            return
        entry = partition.catalog.get(cmd.index)
        if entry is not None:
            self._merge_in_home(partition, cmd, out, entry, marker)
            return
        data = self._wait(self._get(cmd.export))
        if data is None:
            self._wait(self._writes.gone(partition, out.offset, cmd.export))
            out.skipped = 1
            log.warning(
                "merge %s: export %s is gone; the merge completed earlier (duplicate skipped)",
                cmd.merge_id,
                cmd.export,
            )
            return
        done = receive_export(partition, cmd, out, data)
        key, value = done.encode()
        body = {"offset": out.offset, "key": key.decode(), "value": value.decode()}
        self._wait(self._put(marker, orjson.dumps(body)))
        failpoints.hit("merge_in_applied")
        name = marker.rsplit("/", 1)[-1].removesuffix(".json")
        self._writes.after_checkpoint(
            partition, out.offset, lambda: self._send_done(name, key, value, first=True)
        )

    def _merge_in_home(
        self,
        partition: Partition,
        cmd: MergeInCommand,
        out: Outcome,
        entry: CatalogEntry,
        marker: str,
    ) -> None:
        """`merge_in` at the home of a sharded destination (or an alias): forward it to
        every member (`home_merge_in`), or send the refusal back as `merge_done`. The
        marker dedups a `merge_in` produced again by a source that replayed its merge
        (the members dedup forwarded ones by origin); kept until the merge completes."""
        if cmd.dim is None or cmd.space is None:
            data = self._wait(self._get(cmd.export))
            if data is None:
                self._wait(self._writes.gone(partition, out.offset, cmd.export))
            params = None if data is None else export_params(data)
        else:
            params = (cmd.dim, cmd.space)
        done = home_merge_in(
            partition,
            cmd,
            out,
            entry,
            auth=self.auth,
            num_partitions=self._registry.num_partitions,
            max_record_bytes=self._max_record_bytes,
            source_params=lambda: params,
        )
        if done is None:
            if out.forwards:
                forwarded = {
                    "offset": out.offset,
                    "forwarded": len(out.forwards),
                    "export": cmd.export,
                }
                self._wait(self._put(marker, orjson.dumps(forwarded)))
            return
        key, value = done.encode()
        body = {"offset": out.offset, "key": key.decode(), "value": value.decode()}
        self._wait(self._put(marker, orjson.dumps(body)))
        self._writes.after_checkpoint(
            partition, out.offset, lambda: self._send_done(cmd.merge_id, key, value, first=True)
        )

    async def _send_done(self, merge_id: str, key: bytes, value: bytes, *, first: bool) -> None:
        """`merge_id`: the marker's name (a merge id, with `-s<shard>` for a member)."""
        if first:
            failpoints.hit("merge_done_pending")
        await self._produce(key, value)
        self._produced[merge_id] = time.monotonic()
        log.info("merge %s: merge_done produced", merge_id)

    # -- sweeper --------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # S3 or Kafka trouble: the next sweep tries again
                log.warning("merge sweep failed: %s", exc)

    async def sweep(self) -> int:
        """Produce `merge_done` for markers of serving partitions that a checkpoint covers
        and that this process has not produced lately; returns how many were produced."""
        sent = 0
        now = time.monotonic()
        blobs = self._blobs
        for p, partition in list(self._registry.partitions.items()):
            if partition.status is not PartitionStatus.SERVING:
                continue
            prefix = f"merges/{self._topics.commands}/applied/{p:05d}/"
            for key in await blobs.list(prefix):
                merge_id = key[len(prefix) :].removesuffix(".json")
                if now - self._produced.get(merge_id, -RESEND_AFTER_S) < RESEND_AFTER_S:
                    continue
                try:
                    data, _ = await blobs.get(key)
                except BlobNotFound:
                    continue
                body = _read_marker(key, data)
                if body is None:
                    continue
                if "key" not in body:  # a sharded destination's home: its members answer
                    await self._forgotten_home_marker(key, body)
                    continue
                if int(body["offset"]) > partition.checkpoint_offset:
                    continue  # the partition's own after-checkpoint step sends it
                with log_context(partition=p):
                    log.info("merge %s: producing merge_done again (sweeper)", merge_id)
                    await self._send_done(
                        merge_id, str(body["key"]).encode(), _marker_value(body), first=False
                    )
                sent += 1
        return sent

    async def _forgotten_home_marker(self, key: str, body: Mapping[str, Any]) -> None:
        """Remove the marker of a sharded destination's home whose merge completed: the
        source removes it, but a home that replayed the `merge_in` after that (its
        checkpoint did not cover it yet) wrote it again."""
        export = body.get("export")
        if not isinstance(export, str):
            return
        try:
            await self._blobs.head(export)
        except BlobNotFound:
            log.info("%s: its merge completed, marker removed", key)
            await self._writes.delete(key)

    # -- import ---------------------------------------------------------------------------

    def import_(self, partition: Partition, cmd: ImportCommand, out: Outcome) -> None:
        def missing(field: str) -> None:
            self._wait(self._writes.gone(partition, out.offset, f"import {field}"))

        fetch = import_fetcher(self._sources, self._wait, on_missing=missing)
        apply_import(partition, cmd, out, fetch, self._imports)

    def check_import(self, cmd: ImportCommand, index: Index, offset: int) -> None:
        fetch = import_fetcher(self._sources, self._wait)
        validate_import(cmd, index, fetch, self._imports, offset=offset)

    # -- S3 and Kafka steps (on the worker's loop) ----------------------------------------

    # The worker's long-lived store: a new S3 client per step (the sweeper takes one every
    # 3 s) cost about 6% of the event loop's time under search load.

    async def _get(self, key: str) -> bytes | None:
        try:
            data, _ = await get_verified(self._blobs, key)
        except BlobNotFound:
            return None
        except ValueError as exc:  # an unclean key
            raise InvalidRequest(f"bad object key {key!r}: {exc}") from exc
        return data

    async def _put(self, key: str, data: bytes) -> None:
        await self._writes.put(key, data)

    async def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(LhvError):
            await self._writes.delete(key)

    async def _produce(self, key: bytes, value: bytes) -> None:
        """Produce a protocol record, signed (`worker/service/protocol_auth.py`)."""
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await self._writes.send(
                self._topics.commands,
                key=key,
                value=value,
                partition=home_partition(key, self._registry.num_partitions),
                headers=[self.auth.header(key, value)],
            )

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop the protocol was started on, from the apply thread, and
        wait for its result (at most `STEP_TIMEOUT_S`); the one way back to the loop."""
        if self._loop is None:
            coro.close()
            raise Internal("merge protocol not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(STEP_TIMEOUT_S)


# -- helpers (apply thread) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ShardDone:
    """What `_shard_done` needs of one shard's `merge_done`, taken at its apply."""

    partition: int
    cmd: MergeDoneCommand
    marker: str
    """the member's marker"""
    home_marker: str
    """the marker of the destination's home (dedup of `merge_in` there)"""
    info: ExportInfo | None = None
    result: MergeResult | None = None


def _shards_failed(cmd: MergeDoneCommand, errors: Sequence[ErrorInfo]) -> LhvError:
    """The requester's error when members refused their shard (the others applied)."""
    first = errors[0].to_error()
    return type(first)(
        f"merge into {cmd.dest!r}: {len(errors)} of {cmd.dest_shards} shards failed "
        f"(the others applied): {first.message}"
    )


def _read_marker(key: str, data: bytes | None) -> dict[str, Any] | None:
    """A marker's body; None when there is none, or when its bytes are not a marker
    (logged). Such bytes are what a write cut short leaves on some S3 servers (SeaweedFS
    keeps an empty object when the writer is killed mid-PutObject): the step that wrote
    it did not finish, no checkpoint covers it, so it runs again on replay and writes
    the marker anew; until then the marker counts as absent."""
    if data is None:
        return None
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("offset"), int):
        return body
    log.warning(
        "%s: not a merge marker (%d bytes: a write cut short?); taken as absent until its "
        "step runs again",
        key,
        len(data),
    )
    return None


def _marker_value(body: Mapping[str, Any]) -> bytes:
    """The `merge_done` value a marker holds (as text; older markers: a JSON object)."""
    value = body["value"]
    return value.encode("utf-8") if isinstance(value, str) else orjson.dumps(value)


def _checkpoint_soon(partition: Partition, every_records: int) -> None:
    """Make the runner checkpoint right after this batch: a protocol step waits on it."""
    partition.records_since_checkpoint = max(partition.records_since_checkpoint, every_records)


def _sorted_live(index: Index) -> list[Item]:
    """Live items sorted by id: positions in clocks must not depend on storage order."""
    items = list(index.live_items())
    items.sort(key=lambda it: it.id)
    return items


def _vector(item: Item) -> np.ndarray:
    assert item.vector is not None, "live_items() returns vectors"
    return item.vector


def _check_compatible(src: Index, dest: Index) -> None:
    if src.params.dim != dest.params.dim:
        raise DimMismatch(
            f"merge: {src.name!r} has dim {src.params.dim}, {dest.name!r} has {dest.params.dim}"
        )
    if src.params.space is not dest.params.space:
        raise InvalidRequest(
            f"merge: {src.name!r} has space {src.params.space.value}, {dest.name!r} has "
            f"{dest.params.space.value}"
        )


def _chunks(writes: Sequence[Write], size: int) -> Iterator[Sequence[Write]]:
    for start in range(0, len(writes), size):
        yield writes[start : start + size]


def _apply_all(index: Index, writes: Sequence[Write]) -> int:
    """Validate every chunk, then apply them; returns the ids changed."""
    checked = [index.validate(part) for part in _chunks(writes, index.limits.max_batch_items)]
    return sum(index.apply(part).applied for part in checked)


def _merge_into(dest: Index, items: list[Item], offset: int) -> int:
    """Upsert `items` not live in `dest` with clock (version, offset, position)."""
    live = {
        it.id
        for it in dest.get([it.id for it in items], include_vectors=False, include_metadata=False)
    }
    writes: list[Write] = [
        Upsert(
            id=it.id,
            vector=_vector(it),
            metadata=it.metadata if it.metadata is not None else {},
            clock=Clock(it.clock.version, offset, pos),
        )
        for pos, it in enumerate(items)
        if it.id not in live
    ]
    return _apply_all(dest, writes)


def _clear(src: Index, items: list[Item], offset: int) -> int:
    """Delete the items of `src` whose clock still equals the exported one."""
    stored = {
        it.id: tuple(it.clock)
        for it in src.get([it.id for it in items], include_vectors=False, include_metadata=False)
    }
    writes: list[Write] = [
        Delete(id=it.id, clock=Clock(it.clock.version, offset, pos))
        for pos, it in enumerate(items)
        if stored.get(it.id) == tuple(it.clock)
    ]
    return _apply_all(src, writes)


def _export_bytes(src: Index, items: list[Item], source: dict[str, Any]) -> bytes:
    """An LHV1 snapshot of an exact-engine index holding `items` with their clocks."""
    params = replace(src.params, engine=EngineKind.EXACT, max_elements_hint=len(items))
    export = Index(src.name, params, limits=src.limits)
    writes: list[Write] = [
        Upsert(id=it.id, vector=_vector(it), metadata=it.metadata, clock=it.clock) for it in items
    ]
    for part in _chunks(writes, src.limits.max_batch_items):
        export.apply(part)
    buf = io.BytesIO()
    write_snapshot(export, buf, source=source)
    return buf.getvalue()


def _read_export(data: bytes, *, dest: Index | None = None, name: str = "") -> list[Item]:
    """The exported items, sorted by id; with `dest` checks it exists and is compatible.

    Raises:
        IndexNotFound, DimMismatch, InvalidRequest: dest is missing or incompatible.
        Internal: the export object is unreadable.
    """
    try:
        export, _ = read_snapshot(data)
    except LhvError as exc:
        raise Internal(f"merge: unreadable export object: {exc.message}") from exc
    if dest is None and name:
        raise IndexNotFound(f"merge: destination index {name!r} does not exist")
    if dest is not None:
        _check_compatible(export, dest)
    return _sorted_live(export)


# -- import decoding --------------------------------------------------------------------------


class _Rows:
    """The rows of an import: vectors (n, dim) plus optional ids, metadata, versions."""

    def __init__(
        self,
        *,
        vectors: np.ndarray,
        ids: list[str] | None = None,
        metadata: list[dict[str, Any] | None] | None = None,
        versions: list[int] | None = None,
    ) -> None:
        self.vectors = vectors
        self.ids = ids
        self.metadata = metadata
        self.versions = versions

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def of_shard(self, shard: int, shards: int) -> _Rows:
        """The rows whose id belongs to `shard` of `shards` (in order)."""
        ids = self.ids if self.ids is not None else [str(pos) for pos in range(self.n)]
        keep = [pos for pos, id_ in enumerate(ids) if shard_of(id_, shards) == shard]
        return _Rows(
            vectors=self.vectors[keep],
            ids=[ids[pos] for pos in keep],
            metadata=None if self.metadata is None else [self.metadata[pos] for pos in keep],
            versions=None if self.versions is None else [self.versions[pos] for pos in keep],
        )

    def check(self) -> None:
        for field, values in (("ids", self.ids), ("metadata rows", self.metadata)):
            if values is not None and len(values) != self.n:
                raise InvalidRequest(f"import: the source's rows and its {field} differ in number")

    def writes(self, start: int, stop: int, offset: int, version: int | None) -> list[Write]:
        stop = min(stop, self.n)
        ids = self.ids
        meta = self.metadata
        versions = self.versions
        out: list[Write] = []
        for pos in range(start, stop):
            v = version if version is not None else (versions[pos] if versions else 0)
            out.append(
                Upsert(
                    id=ids[pos] if ids is not None else str(pos),
                    vector=self.vectors[pos],
                    metadata=meta[pos] if meta is not None else None,
                    clock=Clock(v, offset, pos),
                )
            )
        return out


def _format_of(uri: str) -> str:
    for ext in ("npy", "npz", "lhv"):
        if uri.lower().endswith("." + ext):
            return ext
    raise InvalidRequest(f"import: cannot tell the format of {uri!r}: name it with 'format'")


def _decode_arrays(
    data: bytes, fmt: str, policy: ImportPolicy
) -> tuple[np.ndarray, list[str] | None]:
    ids: list[str] | None = None
    if fmt == "npy":
        vectors = decode_npy(
            data,
            "source",
            kinds=VECTOR_KINDS,
            max_bytes=policy.max_object_bytes,
            setting="LHV_MAX_IMPORT_BYTES",
        )
    else:
        arrays = decode_npz(data, "source", policy)
        found = [a for name, a in arrays.items() if name != "ids"]
        if not found:
            raise InvalidRequest(
                f"import: source has no array 'vectors' (or {', '.join(VECTOR_MEMBERS[1:])})"
            )
        vectors = found[0]
        if "ids" in arrays:
            ids = _ids_of(arrays["ids"], "source")
    if vectors.ndim != 2:
        raise InvalidRequest("import: source must hold a 2-D numeric array")
    return np.ascontiguousarray(vectors, dtype=np.float32), ids


def _ids_of(arr: np.ndarray, field: str) -> list[str]:
    try:
        return ids_of(arr, field)
    except ArrayFileError as exc:
        raise as_import_error(exc) from None


def _decode_ids(data: bytes, source: str, policy: ImportPolicy) -> list[str]:
    if source.lower().endswith(".npy"):
        arr = decode_npy(
            data,
            "ids_source",
            kinds=ID_KINDS,
            max_bytes=policy.max_object_bytes,
            setting="LHV_MAX_IMPORT_BYTES",
        )
        return _ids_of(arr, "ids_source")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row = row_of(data, exc.start)
        raise InvalidRequest(
            f"import: row {row}: ids_source is not UTF-8 there", item=row
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _decode_metadata(data: bytes) -> list[dict[str, Any] | None]:
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    out: list[dict[str, Any] | None] = []
    for row, line in enumerate(lines):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                f"import: row {row}: metadata_source has no JSON value there", item=row
            ) from None
        if value is not None and not isinstance(value, dict):
            raise InvalidRequest(
                f"import: row {row}: metadata_source has neither an object nor null there",
                item=row,
            )
        out.append(value)
    return out
