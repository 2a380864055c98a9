"""Merge and import: the barrier steps that move many items at once (DESIGN section 6).

`MergeProtocol` is the worker's `barrier`: `worker/apply.py` calls it in the apply thread
for `merge`, `merge_in`, `merge_done` and `import` records, after flushing the pending
writes of the indexes they touch, so nothing is reordered across them.

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

The protocol records name their objects only as `merge_id_of`/`export_key` derive them
from the merge record's place; a `merge_in` or `merge_done` naming anything else is
rejected (`invalid_request`), so a forged record cannot make a worker read or delete
other objects.

Errors (the record is rejected, nothing changes): merging an index into itself
(`invalid_request`), unknown source or destination (`index_not_found`), another dim
(`dim_mismatch`) or space (`invalid_request`). Across partitions, the destination's
errors come back in `merge_done`, which is then rejected with that error (dead-letter
queue, and the error ack to the merge's requester).

Import (`import` record keyed by the index) loads `s3://bucket/key` with the worker's S3
endpoint and credentials and the bucket named by the URI:

- `.npy`: a 2-D float array (no pickles), one row per item; ids from `ids_source` (a
  `.npy` of strings or integers, or a text file with one id per line) or else the row
  number in decimal;
- `.npz`: arrays `vectors` and optionally `ids`;
- `.lhv`: an LHV1 snapshot (ids, vectors, metadata and client versions);
- `metadata_source`: JSON Lines, one object (or null: keep the stored metadata) per row.

Every row becomes an upsert with clock `(version, import offset, row)` through the same
`Index.validate`/`Index.apply` path as `add`. The whole import is validated before
anything is applied, so an invalid row (its number is the error's `item`) rejects the
import with nothing applied; it is then applied `chunk_items` rows per engine call, each
chunk whole-or-nothing. A replay reads the objects again: keep them unchanged until a
checkpoint covers the import record.

Failpoints (`worker.failpoints`): `merge_exported` (src: export written, `merge_in` not
produced), `merge_in_produced` (src: `merge_in` produced, merge record not
checkpointed), `merge_in_applied` (dest: items applied and marker written, not
checkpointed), `merge_done_pending` (dest: checkpoint covers `merge_in`, `merge_done` not
produced), `merge_done_applied` (src: source cleared in memory, not checkpointed),
`merge_cleanup_pending` (src: checkpoint covers `merge_done`, objects not deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from lhv_index import (
    Clock,
    Delete,
    EngineKind,
    Index,
    Item,
    Upsert,
    Write,
    read_snapshot,
    write_snapshot,
)
from lhv_index.errors import DimMismatch, IndexNotFound, Internal, InvalidRequest, LhvError
from worker import failpoints
from worker.apply import Outcome, home_partition
from worker.blobstore import (
    BlobNotFound,
    BlobStoreError,
    S3BlobStore,
    S3Config,
    StoreUnavailable,
    get_verified,
    put_unless_same,
)
from worker.logs import log_context
from worker.messages import (
    ErrorInfo,
    ImportCommand,
    MergeCommand,
    MergeDoneCommand,
    MergeInCommand,
)
from worker.partition import Partition, PartitionStatus

if TYPE_CHECKING:
    from worker.service import Worker

__all__ = [
    "MergeProtocol",
    "apply_import",
    "check_merge_done",
    "check_merge_in",
    "clear_exported",
    "export_key",
    "export_source",
    "marker_key",
    "merge_id_of",
    "merge_locally",
    "parse_s3_uri",
    "read_s3_uri",
    "receive_export",
]

log = logging.getLogger(__name__)

#: how often the sweeper looks for `merge_done` records to (re-)produce
SWEEP_INTERVAL_S = 3.0
#: a marker still present this long after its `merge_done` was produced is produced again
RESEND_AFTER_S = 300.0
_MERGE_ID = re.compile(r"m(\d+)-(\d+)")
#: bound of one S3 transfer or Kafka send made from the apply thread
STEP_TIMEOUT_S = 600.0


def merge_id_of(partition: int, offset: int) -> str:
    """The merge id of the `merge` record at (`partition`, `offset`)."""
    return f"m{partition}-{offset}"


def export_key(topic: str, partition: int, offset: int) -> str:
    """Key (under the workers' prefix) of the export of the merge record at that place."""
    return f"merges/{topic}/exports/{partition:05d}/{offset:020d}.lhv"


def marker_key(topic: str, dest_partition: int, merge_id: str) -> str:
    """Key of the marker saying that dest's partition applied `merge_in` of `merge_id`."""
    return f"merges/{topic}/applied/{dest_partition:05d}/{merge_id}.json"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key).

    Raises:
        InvalidRequest: not an S3 URI with a bucket and a key.
    """
    if not uri.startswith("s3://"):
        raise InvalidRequest(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise InvalidRequest(f"an S3 URI needs a bucket and a key: {uri!r}")
    return bucket, key


def _merge_source(partition: Partition, cmd: MergeCommand) -> tuple[Index, list[Item]]:
    """The source index of a merge and its live items (sorted by id), or the error."""
    src = partition.indexes.get(cmd.index)
    if src is None:
        raise IndexNotFound(f"merge: source index {cmd.index!r} does not exist")
    if cmd.dest == cmd.index:
        raise InvalidRequest(f"merge: index {cmd.index!r} cannot be merged into itself")
    return src, _sorted_live(src)


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


def export_source(partition: Partition, cmd: MergeCommand, topic: str) -> tuple[bytes, int]:
    """Source side of `merge`: the export object of `cmd.index`'s live items (an LHV1
    snapshot, see `_export_bytes`) and how many items it holds.

    Raises:
        LhvError: unknown source, or a merge into itself (nothing exported).
    """
    src, items = _merge_source(partition, cmd)
    return _export_bytes(src, items, {"topic": topic, "partition": partition.number}), len(items)


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
    return int(origin[2])


def receive_export(
    partition: Partition, cmd: MergeInCommand, out: Outcome, data: bytes
) -> MergeDoneCommand:
    """Destination side of `merge_in`: apply the exported items (`data`) not live in the
    destination, in one step; returns the `merge_done` to send back, which carries the
    destination's error instead when nothing was applied (missing or incompatible index)."""
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
        items = _read_export(data, dest=partition.indexes.get(cmd.index), name=cmd.index)
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


def clear_exported(partition: Partition, cmd: MergeDoneCommand, out: Outcome, data: bytes) -> None:
    """Source side of `merge_done` with `clear_source`: delete exactly the exported items
    (`data`) whose clock is still the exported one."""
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
        cmd.applied,
        cmd.dest,
        cleared,
        len(exported),
        cmd.index,
    )


async def read_s3_uri(s3: S3Config, uri: str) -> bytes | None:
    """The object at `s3://bucket/key`, read with the endpoint and credentials of `s3`;
    None when it does not exist. Shared by the worker's imports and `lhv replay`.

    Raises:
        InvalidRequest: not an S3 URI, an unclean key, or the store refused the read
            (credentials, policy): the import's fault.
        StoreUnavailable: the store did not answer.
    """
    bucket, key = parse_s3_uri(uri)
    try:
        async with S3BlobStore(replace(s3, bucket=bucket, prefix="")) as blobs:
            data, _ = await blobs.get(key)
    except BlobNotFound:
        return None
    except ValueError as exc:  # an unclean key
        raise InvalidRequest(f"bad object key {key!r}: {exc}") from exc
    except StoreUnavailable:
        raise
    except BlobStoreError as exc:
        raise InvalidRequest(f"import: {uri}: {exc.message}") from exc
    return data


def apply_import(
    partition: Partition, cmd: ImportCommand, out: Outcome, fetch: Callable[[str], bytes]
) -> None:
    """Apply one `import` record: read its objects with `fetch(uri)` (which raises
    `InvalidRequest` for a missing one), validate every chunk, then apply them; shared by
    the worker and `lhv replay --verify`.

    Raises:
        LhvError: nothing applied (bad source, dim mismatch, an invalid row).
    """
    index = partition.indexes.get(cmd.index)
    if index is None:
        raise IndexNotFound(f"import: index {cmd.index!r} does not exist")
    started = time.monotonic()
    rows = _load_rows(cmd, fetch)
    if rows.n and rows.vectors.shape[1] != index.params.dim:
        raise DimMismatch(
            f"import: {cmd.source} holds vectors of dim {rows.vectors.shape[1]}, index "
            f"{cmd.index!r} has dim {index.params.dim}"
        )
    chunk = max(1, min(cmd.chunk_items, index.limits.max_batch_items))
    for start in range(0, rows.n, chunk):
        try:
            index.validate(rows.writes(start, start + chunk, out.offset, cmd.version))
        except LhvError as exc:
            if exc.item is not None:
                exc.item += start  # the row in the import, not in the chunk
            raise
    loaded = time.monotonic()
    applied = 0
    for start in range(0, rows.n, chunk):
        writes = rows.writes(start, start + chunk, out.offset, cmd.version)
        applied += index.apply(writes).applied
        partition.dirty.add(cmd.index)
    out.applied, out.skipped = applied, rows.n - applied
    log.info(
        "import of %d rows from %s: %d applied, %.2fs to load and validate, %.2fs to apply",
        rows.n,
        cmd.source,
        applied,
        loaded - started,
        time.monotonic() - loaded,
    )


def _load_rows(cmd: ImportCommand, fetch: Callable[[str], bytes]) -> _Rows:
    fmt = cmd.format or _format_of(cmd.source)
    data = fetch(cmd.source)
    if fmt == "lhv":
        try:
            snap, _ = read_snapshot(data)
        except LhvError as exc:
            raise InvalidRequest(
                f"import: {cmd.source} is not a readable LHV1 snapshot: {exc.message}"
            ) from exc
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
        vectors, ids = _decode_arrays(data, fmt, cmd.source)
        rows = _Rows(vectors=vectors, ids=ids)
    if cmd.ids_source is not None:
        rows.ids = _decode_ids(fetch(cmd.ids_source), cmd.ids_source)
    if cmd.metadata_source is not None:
        rows.metadata = _decode_metadata(fetch(cmd.metadata_source), cmd.metadata_source)
    rows.check(cmd.source)
    return rows


class MergeProtocol:
    """The worker's barrier for `merge`, `merge_in`, `merge_done` and `import`.

    Called in a partition's apply thread; S3 and Kafka steps run on the worker's loop
    through `Worker.run_async`. `start()` launches the sweeper (see the module docstring).
    """

    def __init__(self, worker: Worker) -> None:
        self._w = worker
        self._produced: dict[str, float] = {}
        """merge id -> when this process produced its merge_done (monotonic)"""

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sweeper; it is cancelled with the worker's other background steps."""
        self._w.spawn(self._sweep_forever(), name="merge-sweeper")

    # -- dispatch -------------------------------------------------------------------------

    def __call__(self, partition: Partition, command: Any, outcome: Outcome) -> None:
        """Apply one barrier record; sets `outcome` or raises `LhvError` (nothing applied)."""
        with log_context(partition=partition.number, offset=outcome.offset, index=command.index):
            if isinstance(command, MergeCommand):
                self._merge(partition, command, outcome)
            elif isinstance(command, MergeInCommand):
                self._merge_in(partition, command, outcome)
            elif isinstance(command, MergeDoneCommand):
                self._merge_done(partition, command, outcome)
            elif isinstance(command, ImportCommand):
                self._import(partition, command, outcome)
            else:
                raise Internal(f"op {outcome.op!r} is not supported by this worker")

    # -- merge: the source's side ---------------------------------------------------------

    def _merge(self, partition: Partition, cmd: MergeCommand, out: Outcome) -> None:
        w = self._w
        dest_partition = home_partition(cmd.dest.encode(), w.num_partitions)
        if dest_partition == partition.number:
            merge_locally(partition, cmd, out)
            return
        topic = w.topics.commands
        merge_id = merge_id_of(partition.number, out.offset)
        key = export_key(topic, partition.number, out.offset)
        data, exported = export_source(partition, cmd, topic)
        w.run_async(self._put(key, data), timeout_s=STEP_TIMEOUT_S)
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
        )
        try:
            w.run_async(self._produce(*merge_in.encode()), timeout_s=STEP_TIMEOUT_S)
        except Exception as exc:
            w.run_async(self._delete_quietly(key), timeout_s=STEP_TIMEOUT_S)
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

    def _merge_done(self, partition: Partition, cmd: MergeDoneCommand, out: Outcome) -> None:
        w = self._w
        check_merge_done(w.topics.commands, partition.number, cmd)
        out.op = "merge"
        out.reply_to = cmd.reply
        dest_partition = home_partition(cmd.dest.encode(), w.num_partitions)
        marker = marker_key(w.topics.commands, dest_partition, cmd.merge_id)
        partition.after_checkpoint.append(
            (out.offset, lambda: self._cleanup(cmd.merge_id, cmd.export, marker))
        )
        _checkpoint_soon(w, partition)
        if cmd.error is not None:
            log.warning(
                "merge %s into %s failed at the destination: %s",
                cmd.merge_id,
                cmd.dest,
                cmd.error.message,
            )
            raise cmd.error.to_error()
        out.applied, out.skipped = cmd.applied, cmd.skipped
        if not cmd.clear_source:
            return
        data = w.run_async(self._get(cmd.export), timeout_s=STEP_TIMEOUT_S)
        if data is None:
            # Only deleted after a checkpoint covered an earlier merge_done: a duplicate.
            out.reply_to = None
            log.info("merge %s: already completed (export removed)", cmd.merge_id)
            return
        clear_exported(partition, cmd, out, data)
        failpoints.hit("merge_done_applied")

    async def _cleanup(self, merge_id: str, export: str, marker: str) -> None:
        failpoints.hit("merge_cleanup_pending")
        for key in (export, marker):
            with contextlib.suppress(BlobNotFound):
                await self._w.blobs.delete(key)
        log.info("merge %s complete: export and marker removed", merge_id)

    # -- merge: the destination's side ----------------------------------------------------

    def _merge_in(self, partition: Partition, cmd: MergeInCommand, out: Outcome) -> None:
        w = self._w
        check_merge_in(w.topics.commands, cmd)
        marker = marker_key(w.topics.commands, partition.number, cmd.merge_id)
        seen = w.run_async(self._get(marker), timeout_s=STEP_TIMEOUT_S)
        if seen is not None and int(orjson.loads(seen)["offset"]) < out.offset:
            out.skipped = 1
            log.info("merge %s: duplicate merge_in skipped", cmd.merge_id)
            return
        data = w.run_async(self._get(cmd.export), timeout_s=STEP_TIMEOUT_S)
        if data is None:
            out.skipped = 1
            log.warning(
                "merge %s: export %s is gone; the merge completed earlier (duplicate skipped)",
                cmd.merge_id,
                cmd.export,
            )
            return
        done = receive_export(partition, cmd, out, data)
        key, value = done.encode()
        body = {"offset": out.offset, "key": key.decode(), "value": orjson.loads(value)}
        w.run_async(self._put(marker, orjson.dumps(body)), timeout_s=STEP_TIMEOUT_S)
        failpoints.hit("merge_in_applied")
        partition.after_checkpoint.append(
            (out.offset, lambda: self._send_done(cmd.merge_id, key, value, first=True))
        )
        _checkpoint_soon(w, partition)

    async def _send_done(self, merge_id: str, key: bytes, value: bytes, *, first: bool) -> None:
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
        w = self._w
        sent = 0
        now = time.monotonic()
        blobs = w.blobs
        for p, partition in list(w.partitions.items()):
            if partition.status is not PartitionStatus.SERVING:
                continue
            prefix = f"merges/{w.topics.commands}/applied/{p:05d}/"
            for key in await blobs.list(prefix):
                merge_id = key[len(prefix) :].removesuffix(".json")
                if now - self._produced.get(merge_id, -RESEND_AFTER_S) < RESEND_AFTER_S:
                    continue
                try:
                    data, _ = await blobs.get(key)
                except BlobNotFound:
                    continue
                body = orjson.loads(data)
                if int(body["offset"]) > partition.checkpoint_offset:
                    continue  # the partition's own after-checkpoint step sends it
                with log_context(partition=p):
                    log.info("merge %s: producing merge_done again (sweeper)", merge_id)
                    await self._send_done(
                        merge_id,
                        str(body["key"]).encode(),
                        orjson.dumps(body["value"]),
                        first=False,
                    )
                sent += 1
        return sent

    # -- import ---------------------------------------------------------------------------

    def _import(self, partition: Partition, cmd: ImportCommand, out: Outcome) -> None:
        apply_import(partition, cmd, out, self._fetch)

    def _fetch(self, uri: str) -> bytes:
        data = self._w.run_async(read_s3_uri(self._w.config.s3, uri), timeout_s=STEP_TIMEOUT_S)
        if data is None:
            raise InvalidRequest(f"import: {uri} does not exist")
        return bytes(data)

    # -- S3 and Kafka steps (on the worker's loop) ----------------------------------------

    # The worker's long-lived store: a new S3 client per step (the sweeper takes one every
    # 3 s) cost about 6% of the event loop's time under search load.

    async def _get(self, key: str) -> bytes | None:
        try:
            data, _ = await get_verified(self._w.blobs, key)
        except BlobNotFound:
            return None
        except ValueError as exc:  # an unclean key
            raise InvalidRequest(f"bad object key {key!r}: {exc}") from exc
        return data

    async def _put(self, key: str, data: bytes) -> None:
        # A replayed step writes the same bytes again: never overwrite them while the
        # other side may be reading (`put_unless_same`).
        if not await put_unless_same(self._w.blobs, key, data):
            log.info("%s already holds these bytes (written by an earlier run)", key)

    async def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(LhvError):
            await self._w.blobs.delete(key)

    async def _produce(self, key: bytes, value: bytes) -> None:
        w = self._w
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await w.producer.send_and_wait(
                w.topics.commands,
                key=key,
                value=value,
                partition=home_partition(key, w.num_partitions),
            )


# -- helpers (apply thread) -----------------------------------------------------------------


def _checkpoint_soon(worker: Worker, partition: Partition) -> None:
    """Make the runner checkpoint right after this batch: a protocol step waits on it."""
    partition.records_since_checkpoint = max(
        partition.records_since_checkpoint, worker.config.checkpoint.every_records
    )


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
    size = index.limits.max_batch_items
    for part in _chunks(writes, size):
        index.validate(part)
    return sum(index.apply(part).applied for part in _chunks(writes, size))


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

    def check(self, source: str) -> None:
        for what, values in (("ids", self.ids), ("metadata rows", self.metadata)):
            if values is not None and len(values) != self.n:
                raise InvalidRequest(f"import: {source} has {self.n} rows but {len(values)} {what}")

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


def _decode_arrays(data: bytes, fmt: str, source: str) -> tuple[np.ndarray, list[str] | None]:
    ids: list[str] | None = None
    try:
        if fmt == "npy":
            vectors = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                if "vectors" not in npz.files:
                    raise InvalidRequest(f"import: {source} has no array 'vectors' ({npz.files})")
                vectors = npz["vectors"]
                if "ids" in npz.files:
                    ids = _ids_of(npz["ids"], source)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidRequest(f"import: {source} is not a readable .{fmt} file: {exc}") from exc
    if vectors.ndim != 2 or vectors.dtype.kind not in "fiu":
        raise InvalidRequest(
            f"import: {source} must hold a 2-D numeric array, got {vectors.dtype} "
            f"of shape {vectors.shape}"
        )
    return np.ascontiguousarray(vectors, dtype=np.float32), ids


def _ids_of(arr: np.ndarray, source: str) -> list[str]:
    if arr.ndim != 1:
        raise InvalidRequest(f"import: ids in {source} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "U":
        return [str(x) for x in arr.tolist()]
    if arr.dtype.kind == "S":
        try:
            return [x.decode("utf-8") for x in arr.tolist()]
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"import: ids in {source} are not UTF-8: {exc}") from exc
    if arr.dtype.kind in "iu":
        return [str(int(x)) for x in arr.tolist()]
    raise InvalidRequest(f"import: ids in {source} must be strings or integers, not {arr.dtype}")


def _decode_ids(data: bytes, source: str) -> list[str]:
    if source.lower().endswith(".npy"):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidRequest(f"import: {source} is not a readable .npy file: {exc}") from exc
        return _ids_of(arr, source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"import: {source} is not UTF-8 text: {exc}") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _decode_metadata(data: bytes, source: str) -> list[dict[str, Any] | None]:
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    out: list[dict[str, Any] | None] = []
    for row, line in enumerate(lines):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"import: {source} row {row}: not JSON: {exc}", item=row) from exc
        if value is not None and not isinstance(value, dict):
            raise InvalidRequest(f"import: {source} row {row}: not an object or null", item=row)
        out.append(value)
    return out
