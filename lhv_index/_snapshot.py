"""Full snapshots: one self-contained LHV1 frame per index.

Frame (written and read by `_frame`, which also gives the public `read_frame`)::

    MAGIC (4 bytes, b"LHV1") | envelope length (u32, big-endian) | envelope (JSON) | sections

All integers inside sections are little-endian. A reader checks the magic, the envelope,
every section's length and checksum, that nothing follows the last section, and the
parameters against `expect`, before it builds anything: a truncated, corrupted or
mismatched object raises `SnapshotError` and is never loaded.

Envelope v3 (written by this version)::

    {"format": 3, "name": str, "engine": "hnsw" | "exact" | "annoy",
     "params": IndexParams.to_dict(),
     "engine_state": {...},          # what the engine's bytes do not record (hnsw: metric,
                                     # allow_replace_deleted; exact: slots; annoy: slots,
                                     # annoy_metric, n_trees, parts)
     "kind": "base",                 # absent in older v3 frames; "delta": see `_delta`
     "count": live items, "tombstones": tombstones, "slots": labels handed out,
     "version_floor": int,           # absent (0) in older v3 frames; see `Index`
     "source": {...},                # e.g. {"topic", "partition", "offset"}
     "checksum": "crc32",
     "sections": [{"name": str, "length": int, "crc32": int}, ...]}   # in frame order

v3 sections, in this order (n = count, t = tombstones):

- `labels`: u64[n], the label of each live item, ascending
- `ids.len`: u32[n] UTF-8 byte lengths of the ids; `ids.utf8`: the ids, concatenated
- `clocks`: i64[n, 3] (version, offset, position)
- `meta.len`: u32[n] (0: no metadata); `meta.json`: compact JSON objects, concatenated
- `norms`: f32[n], cosine only: the norm of each vector as given (the engine holds the
  normalized vector)
- `tombs.len`, `tombs.utf8`, `tombs.clocks`: the tombstones, encoded like ids and clocks
- `engine`: the engine's bytes (hnsw: hnswlib `save_index` output over metric `ip` for
  cosine and ip, `l2` for l2; exact and annoy: the f32[slots, dim] matrix)
- `engine.<part>`, one per name in `engine_state.parts`, in that order (annoy only):
  `engine.forest`, annoy's saved forest (empty when there is none); `engine.forest_labels`,
  u64[m], the label of each forest item; `engine.delta`, u64[d], the live labels written
  after the forest was cut (searched exactly). A forest item whose label is not live or is
  in the delta is a tombstone. The delta and tombstones are stored as they are, not folded
  into a new forest, so a snapshot never waits for a forest build.

Older envelopes, read but no longer written. Both are followed by exactly one section,
hnswlib `save_index` bytes (engine `hnsw` only), whose length and crc32 sit in the
envelope as `length` and `crc32`. Their `params` hold at least `dim` and `space`; under
cosine the engine holds normalized vectors and no norms were kept, so `get` returns unit
vectors for these items (a documented limitation). Neither recorded clocks reliably; an
item without one gets `(0, source.offset, 2**63-1)` (source offset -1 when unknown): a
replay of records up to the snapshot's offset changes nothing, and any later record wins.

- v1: ``{"format": 1, "name"?, "engine": "hnsw", "params": {...}, "source": {...},
  "metadata": {"<id>": {"label": int, "metadata": {...}}}, "length", "crc32"}``. Ids are
  known only from the keys of `metadata`, and v1 writers left out ids that had no
  metadata: such items cannot be recovered. Their labels are deleted on load (the count is
  logged as a warning); everything else survives. No tombstones.
- v2: ``{"format": 2, "name"?, "engine": "hnsw", "params": {...}, "source": {...},
  "IDs": [id | null, ...], "metadata": {"<id>": {...}}, "clocks": {"<id>": [v, o, p]},
  "tombstones": {"<id>": [v, o, p]}, "length", "crc32"}``. `IDs[label]` names the item of
  each engine label (null: deleted), so no id is lost; `clocks` and `tombstones` may be
  absent.

In both, the engine's labels must be exactly `0 .. element_count-1`.

How the bytes move:

- Encoding: `Index.capture_base` takes everything under the index's exclusive lock: ids,
  clocks, metadata and norms are copied; the engine writes its own bytes (hnsw: hnswlib's
  `save_index`; exact and annoy: their dumped files) to unlinked temporary files (`FilePiece`), a
  write to the page cache that takes about as long as a copy would. The lock is then
  released: ids are encoded, sections checksummed (large buffers in two threads, see
  `_crc`) and written to `out` while the index takes writes again; the engine's files are
  read back in chunks (8 MiB, `os.pread`), once for the checksum and once to write, and
  never whole in memory. Why: a copy of the engine in process memory would double the
  peak of a large index while it is checkpointed; page cache is not process memory, and
  the kernel reclaims it. The base is closed (its files released) once written.
- Decoding: a frame given as bytes or a `BytesIO` is read in place: small sections are
  checked and copied out, and each engine section is written to its temporary file and
  checksummed in two background threads while the ids are decoded. Any other binary file
  (a snapshot downloaded to disk, a pipe) is read one section at a time, the engine's in
  chunks to its temporary file, so the frame is never whole in memory next to the
  decoded index. The engine is loaded only after every checksum has matched.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, BinaryIO

import numpy as np
import numpy.typing as npt
import orjson

from lhv_index._capture import Base
from lhv_index._clock import CLOCK_MAX, Clock
from lhv_index._engines import AnnoyEngine, Engine, ExactEngine, HnswEngine, metric_of
from lhv_index._engines.annoy import PARTS as ANNOY_PARTS
from lhv_index._frame import (
    ENVELOPE_VERSION,
    KIND_BASE,
    Section,
    SectionReader,
    Written,
    frame_reader,
    read_envelope,
    section_specs,
    write_frame,
)
from lhv_index._ids import LabelMap
from lhv_index._index import Index
from lhv_index._packed import Strings, pack_strings, unpack_strings
from lhv_index._params import EngineKind, IndexParams, Limits, Space
from lhv_index._validate import check_id
from lhv_index.errors import InvalidRequest, LhvError, SnapshotError

__all__ = ["read_snapshot", "write_snapshot"]

log = logging.getLogger(__name__)

#: names of the engine's extra parts (sections `engine.<part>`, files `<engine>.<part>`)
_PART_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


# -- encoding ---------------------------------------------------------------------------


def _strings(values: list[str] | Strings) -> tuple[bytes, bytes]:
    """The `.len` and `.utf8` sections of a list of strings."""
    packed = values if isinstance(values, Strings) else pack_strings(values)
    return packed.lens.astype("<u4").tobytes(), packed.blob


def _clock_bytes(clocks: npt.NDArray[np.int64]) -> bytes:
    return np.ascontiguousarray(clocks, dtype="<i8").tobytes()


def _base_sections(base: Base) -> list[Section]:
    """The v3 sections of a captured base, in frame order."""
    ids_len, ids_utf8 = _strings(base.ids)
    tomb_len, tomb_utf8 = _strings(base.tomb_ids)
    sections: list[Section] = [
        ("labels", [base.labels.astype("<u8")]),
        ("ids.len", [ids_len]),
        ("ids.utf8", [ids_utf8]),
        ("clocks", [_clock_bytes(base.clocks)]),
        ("meta.len", [base.meta_lens.astype("<u4")]),
        ("meta.json", [base.meta_json]),
    ]
    if base.norms is not None:
        sections.append(("norms", [base.norms.astype("<f4")]))
    sections += [
        ("tombs.len", [tomb_len]),
        ("tombs.utf8", [tomb_utf8]),
        ("tombs.clocks", [_clock_bytes(base.tomb_clocks)]),
    ]
    return sections + base.engine


def write_snapshot(
    index: Index | Base, out: BinaryIO | IO[bytes], *, source: dict[str, Any]
) -> int:
    """Write an index, or a base captured from one (`Index.capture_base`), as one LHV1
    frame (envelope v3) to `out`; returns the bytes written.

    Given an `Index`, captures it first (which restarts its change tracking) and closes
    the capture once written; a given base stays open (its caller closes it). Only the
    capture holds the index's lock; encoding and writing happen outside it.

    `source` (e.g. `{"topic": "lhv.commands", "partition": 3, "offset": 1234}`) is stored
    in the envelope and returned by `read_snapshot`.

    Raises:
        InvalidRequest: `source` is not a JSON object.
        EngineError: the index is unusable, or the engine failed to serialize.
    """
    if not isinstance(source, dict):
        raise InvalidRequest("source must be a JSON object")
    if isinstance(index, Index):
        with index.capture_base() as base:
            return write_snapshot(base, out, source=source)
    base = index
    envelope: dict[str, Any] = {
        "format": ENVELOPE_VERSION,
        "kind": KIND_BASE,
        "name": base.name,
        "engine": base.params.engine.value,
        "params": base.params.to_dict(),
        "engine_state": base.engine_state,
        "count": int(base.labels.size),
        "tombstones": len(base.tomb_ids),
        "slots": base.slots,
        "version_floor": base.version_floor,
        "source": source,
    }
    return write_frame(out, envelope, _base_sections(base))


@contextmanager
def _snapshot_errors() -> Iterator[None]:
    """Anything unexpected while decoding means a bad snapshot."""
    try:
        yield
    except SnapshotError:
        raise
    except (LhvError, ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
        raise SnapshotError(f"snapshot is malformed: {exc}") from exc


def read_snapshot(
    src: BinaryIO | IO[bytes] | bytes | bytearray | memoryview,
    *,
    expect: IndexParams | None = None,
    limits: Limits | None = None,
) -> tuple[Index, dict[str, Any]]:
    """Decode one LHV1 frame (envelope v1, v2 or v3); returns the index and its `source`.

    `expect`: the parameters the caller believes the index has; a different dim, space or
    engine is refused. `limits`: the new index's limits (default `Limits()`).

    Raises:
        SnapshotError: truncated, corrupted or mismatched input; nothing is loaded.
    """
    with frame_reader(src) as reader:
        return _read_frame(reader, expect, limits)


def envelope_basics(
    envelope: dict[str, Any], expect: IndexParams | None, kind: str
) -> tuple[IndexParams, str, dict[str, Any]]:
    """The params, name and source of an envelope of `kind`, checked against `expect`.

    Raises:
        SnapshotError: another kind of frame, malformed fields, or params not as expected.
    """
    got = envelope.get("kind", KIND_BASE)
    if got != kind:
        raise SnapshotError(f"frame is a {got!r} segment, expected {kind!r}")
    params = IndexParams.from_dict(envelope.get("params"))  # type: ignore[arg-type]
    if envelope.get("engine", params.engine.value) != params.engine.value:
        raise SnapshotError("envelope engine and params engine differ")
    if expect is not None:
        _check_expected(params, expect)
    source = envelope.get("source", {})
    if not isinstance(source, dict):
        raise SnapshotError("envelope source is not an object")
    name = envelope.get("name", "")
    if not isinstance(name, str):
        raise SnapshotError("envelope name is not a string")
    return params, name, source


def _read_frame(
    reader: SectionReader, expect: IndexParams | None, limits: Limits | None
) -> tuple[Index, dict[str, Any]]:
    envelope = read_envelope(reader)
    fmt = envelope.get("format")
    with _snapshot_errors():
        params, name, source = envelope_basics(envelope, expect, KIND_BASE)
        with tempfile.TemporaryDirectory(prefix="lhv-load-") as tmpdir:
            engine_path = os.path.join(tmpdir, "engine")
            if fmt == 3:
                index = _read_v3(reader, envelope, params, name, engine_path, limits)
            elif fmt in (1, 2):
                index = _read_legacy(reader, envelope, params, name, engine_path, limits, fmt)
            else:
                raise SnapshotError(f"unknown envelope format {fmt!r}")
    return index, source


def _check_expected(params: IndexParams, expect: IndexParams) -> None:
    for field in ("dim", "space", "engine"):
        got, want = getattr(params, field), getattr(expect, field)
        if got != want:
            raise SnapshotError(f"snapshot holds {field}={got}, expected {want}")


def _decode_strings(lengths: bytes, blob: bytes, n: int, what: str) -> list[str]:
    lens = np.frombuffer(lengths, dtype="<u4")
    if lens.size != n or int(lens.sum(dtype=np.int64)) != len(blob):
        raise SnapshotError(f"section {what} does not match its lengths")
    return unpack_strings(lens, blob)


def _read_v3(
    reader: SectionReader,
    envelope: dict[str, Any],
    params: IndexParams,
    name: str,
    engine_path: str,
    limits: Limits | None,
) -> Index:
    data: dict[str, bytes] = {}
    # the engine's bytes go to their files (and are checksummed) in the background while
    # the ids are decoded; nothing is loaded before every checksum has matched
    writes: list[Written] = []
    for spec in section_specs(envelope):
        sec_name = spec[0]
        if sec_name in data:
            raise SnapshotError(f"section {sec_name!r} appears twice")
        if sec_name == "engine":
            writes.append(reader.section_to_file(spec, engine_path))
            data["engine"] = b""
        elif sec_name.startswith("engine."):
            part = sec_name.removeprefix("engine.")
            if not _PART_NAME.fullmatch(part):
                raise SnapshotError(f"bad engine part name {part!r}")
            writes.append(reader.section_to_file(spec, f"{engine_path}.{part}"))
            data[sec_name] = b""
        else:
            data[sec_name] = reader.section(spec)
    reader.expect_end()
    need = ["labels", "ids.len", "ids.utf8", "clocks", "meta.len", "meta.json", "engine"]
    need += ["tombs.len", "tombs.utf8", "tombs.clocks"]
    if params.space is Space.COSINE:
        need.append("norms")
    missing = [s for s in need if s not in data]
    if missing:
        raise SnapshotError(f"snapshot lacks sections {missing}")
    n, t, slots = envelope["count"], envelope["tombstones"], envelope["slots"]
    if not all(type(x) is int and x >= 0 for x in (n, t, slots)):
        raise SnapshotError("envelope counts are malformed")
    labels = np.frombuffer(data["labels"], dtype="<u8").astype(np.uint64)
    if labels.size != n:
        raise SnapshotError("labels section does not match count")
    ids = _decode_strings(data["ids.len"], data["ids.utf8"], n, "ids")
    id_bytes = np.frombuffer(data["ids.len"], dtype="<u4").astype(np.uint32)
    clocks = np.frombuffer(data["clocks"], dtype="<i8").astype(np.int64)
    if clocks.size != 3 * n:
        raise SnapshotError("clocks section does not match count")
    meta_lens = np.frombuffer(data["meta.len"], dtype="<u4").astype(np.uint32)
    if meta_lens.size != n:
        raise SnapshotError("metadata sections do not match")
    norms = None
    if params.space is Space.COSINE:
        norms = np.frombuffer(data["norms"], dtype="<f4").astype(np.float32)
        if norms.size != n:
            raise SnapshotError("norms section does not match count")
    tomb_ids = _decode_strings(data["tombs.len"], data["tombs.utf8"], t, "tombs")
    tomb_clocks = np.frombuffer(data["tombs.clocks"], dtype="<i8").astype(np.int64)
    if tomb_clocks.size != 3 * t:
        raise SnapshotError("tombstone clocks do not match count")
    tombs = {
        i: Clock(*c) for i, c in zip(tomb_ids, tomb_clocks.reshape(t, 3).tolist(), strict=True)
    }
    if len(tombs) != t:
        raise SnapshotError("tombstone ids repeat")
    state = envelope.get("engine_state") or {}
    if not isinstance(state, dict):
        raise SnapshotError("engine_state is not an object")
    parts = state.get("parts", [])
    if not isinstance(parts, list) or any(f"engine.{p}" not in data for p in parts):
        raise SnapshotError(f"engine parts {parts!r} are not all in the snapshot")
    floor = envelope.get("version_floor", 0)
    if type(floor) is not int or floor < 0:
        raise SnapshotError("envelope version_floor is malformed")
    label_map = _label_map((ids, id_bytes, data.pop("ids.utf8")), labels, slots, tombs, limits)
    del ids  # the map keeps the ids packed: the strings go before the engine is loaded
    for written in writes:
        written.wait()
    engine = _load_engine(params, engine_path, slots=slots, live=labels, state=state)
    index = _build(
        name,
        params,
        limits,
        engine,
        label_map,
        labels,
        clocks.reshape(n, 3),
        (meta_lens, data["meta.json"]),
        norms,
        tombs,
        slots,
    )
    index._version_floor = floor
    return index


def _load_engine(
    params: IndexParams,
    path: str,
    *,
    slots: int,
    live: npt.NDArray[np.uint64],
    state: dict[str, Any],
) -> Engine:
    metric = metric_of(params.space)
    if params.engine is EngineKind.HNSW:
        space = state.get("hnswlib_space", metric)
        if space not in (metric, "cosine") or state.get("allow_replace_deleted", False):
            raise SnapshotError(f"hnsw engine state {state!r} does not fit space {params.space}")
        engine = HnswEngine.load(
            path,
            metric=metric,
            dim=params.dim,
            M=params.M,
            ef_construction=params.ef_construction,
            ef_search=params.ef_search,
        )
        if engine.slots() != slots:
            raise SnapshotError(f"engine holds {engine.slots()} slots, envelope says {slots}")
        return engine
    if params.engine is EngineKind.EXACT:
        if live.size and int(live.max()) >= slots:
            raise SnapshotError("a label is beyond the engine's slots")
        deleted = np.setdiff1d(np.arange(slots, dtype=np.uint64), live)
        return ExactEngine.load(path, metric=metric, dim=params.dim, slots=slots, deleted=deleted)
    if params.engine is EngineKind.ANNOY:
        if state.get("parts") != list(ANNOY_PARTS):
            raise SnapshotError(f"annoy engine state {state!r} lacks its parts")
        return AnnoyEngine.load(
            path,
            metric=metric,
            dim=params.dim,
            slots=slots,
            live=live,
            n_trees=params.n_trees,
            search_k=params.search_k,
            ef_search=params.ef_search,
            normalized=params.space is Space.COSINE,
            state=state,
        )
    raise SnapshotError(f"engine {params.engine.value!r} is not available in this version")


def _label_map(
    ids: tuple[list[str], npt.NDArray[np.uint32], bytes],
    labels: npt.NDArray[np.uint64],
    slots: int,
    tombs: dict[str, Clock],
    limits: Limits | None,
) -> LabelMap:
    """The id <-> label map of the live items (built before the engine is loaded, while
    its bytes are still being written); every cross-check fails as SnapshotError.

    `ids`: the ids, their UTF-8 byte lengths and their bytes, in the order of `labels`.
    """
    id_list, id_bytes = ids[0], ids[1]
    n = len(id_list)
    max_id_bytes = (limits if limits is not None else Limits()).max_id_bytes
    if not labels.size == n == id_bytes.size:
        raise SnapshotError("live item sections disagree in length")
    if n and (int(labels.max()) >= slots or np.bincount(labels.astype(np.intp)).max() > 1):
        raise SnapshotError("labels repeat or lie beyond the engine's slots")
    if n and (int(id_bytes.min()) < 1 or int(id_bytes.max()) > max_id_bytes):
        raise SnapshotError("an id is empty or over the id size limit")
    hashes = np.fromiter(map(hash, id_list), dtype=np.int64, count=n)
    ordered = np.sort(hashes)
    if (ordered[1:] == ordered[:-1]).any() and len(set(id_list)) != n:
        raise SnapshotError("ids repeat")
    if tombs and not tombs.keys().isdisjoint(id_list):
        raise SnapshotError("an id is both live and tombstoned")
    return LabelMap.load(ids, labels.astype(np.intp), slots, hashes)


def _build(
    name: str,
    params: IndexParams,
    limits: Limits | None,
    engine: Engine,
    label_map: LabelMap,
    labels: npt.NDArray[np.uint64],
    clocks: npt.NDArray[np.int64],
    metas: tuple[npt.NDArray[np.uint32], bytes],
    norms: npt.NDArray[np.float32] | None,
    tombs: dict[str, Clock],
    slots: int,
) -> Index:
    """A new Index holding this state (`label_map` from `_label_map`); every cross-check
    fails as SnapshotError.

    `metas`: byte lengths (0: none) and the concatenated compact JSON objects, in the order
    of `labels`.
    """
    index = Index._with_engine(name, params, limits, engine)
    meta_lens, meta_blob = metas
    if not labels.size == clocks.shape[0] == meta_lens.size:
        raise SnapshotError("live item sections disagree in length")
    if slots > engine.capacity:
        raise SnapshotError("engine capacity is below its slots")
    label_arr = labels.astype(np.intp)
    try:
        index._meta.load(label_arr, meta_lens, meta_blob)
    except ValueError as exc:
        raise SnapshotError(str(exc)) from exc
    index._clocks.version[label_arr] = clocks[:, 0]
    index._clocks.offset[label_arr] = clocks[:, 1]
    index._clocks.position[label_arr] = clocks[:, 2]
    if norms is not None:
        index._norms[label_arr] = norms
    index._map = label_map
    index._tombs = tombs
    return index


def _read_legacy(
    reader: SectionReader,
    envelope: dict[str, Any],
    params: IndexParams,
    name: str,
    engine_path: str,
    limits: Limits | None,
    fmt: int,
) -> Index:
    if params.engine is not EngineKind.HNSW:
        raise SnapshotError(f"format {fmt} snapshots hold hnsw indexes only")
    (spec,) = section_specs(envelope)
    written = reader.section_to_file(spec, engine_path)
    reader.expect_end()
    written.wait()
    source = envelope.get("source") or {}
    offset = source.get("offset") if isinstance(source, dict) else None
    default = Clock(0, offset if type(offset) is int else -1, CLOCK_MAX)
    engine = HnswEngine.load(
        engine_path,
        metric=metric_of(params.space),
        dim=params.dim,
        M=params.M,
        ef_construction=params.ef_construction,
        ef_search=params.ef_search,
    )
    slots = engine.slots()
    present = np.sort(np.array(engine.raw.get_ids_list(), dtype=np.uint64))
    if not np.array_equal(present, np.arange(slots, dtype=np.uint64)):
        raise SnapshotError("engine labels are not 0 .. count-1")
    by_label: dict[int, str] = {}
    metas: dict[str, bytes | None] = {}
    clocks: dict[str, Clock] = {}
    tombs: dict[str, Clock] = {}
    if fmt == 1:
        for id_, entry in envelope["metadata"].items():
            label = entry["label"]
            if type(label) is not int or not 0 <= label < slots or label in by_label:
                raise SnapshotError(f"bad label for id {id_!r}")
            by_label[label] = id_
            metas[id_] = _legacy_meta(entry.get("metadata"))
    else:
        id_list = envelope["IDs"]
        if not isinstance(id_list, list) or len(id_list) != slots:
            raise SnapshotError("IDs does not name every engine label")
        meta_in = envelope.get("metadata") or {}
        for label, id_ in enumerate(id_list):
            if id_ is not None:
                by_label[label] = id_
                metas[id_] = _legacy_meta(meta_in.get(id_))
        for id_, c in (envelope.get("clocks") or {}).items():
            clocks[id_] = _legacy_clock(c)
        for id_, c in (envelope.get("tombstones") or {}).items():
            tombs[id_] = _legacy_clock(c)
    # labels no id names are deleted: free slots (in v1, items lost with their ids)
    unnamed = [lb for lb in range(slots) if lb not in by_label]
    lost = 0
    for label in unnamed:
        try:
            engine.raw.mark_deleted(label)
            lost += 1
        except RuntimeError:
            pass  # already deleted
    if lost and fmt == 1:
        log.warning(
            "snapshot v1 of index %s: %d items had no metadata, so no id: dropped", name, lost
        )
    order = sorted(by_label)
    ids = [by_label[lb] for lb in order]
    labels = np.array(order, dtype=np.uint64)
    clock_rows = np.array([clocks.get(i, default) for i in ids], dtype=np.int64).reshape(
        len(ids), 3
    )
    for id_ in ids:
        if not isinstance(id_, str) or check_id(id_, Limits(max_id_bytes=2**31)) is not None:
            raise SnapshotError(f"bad id {id_!r} in snapshot")
    blobs = [metas[i] or b"" for i in ids]
    packed = pack_strings(ids)
    return _build(
        name,
        params,
        limits,
        engine,
        _label_map((ids, packed.lens, packed.blob), labels, slots, tombs, limits),
        labels,
        clock_rows,
        (np.array([len(b) for b in blobs], dtype=np.uint32), b"".join(blobs)),
        None,
        tombs,
        slots,
    )


def _legacy_meta(meta: Any) -> bytes | None:
    if meta is None or meta == {}:
        return None
    if not isinstance(meta, dict):
        raise SnapshotError("metadata is not a JSON object")
    return bytes(memoryview(orjson.dumps(meta)))  # exact size: see _validate.encode_metadata


def _legacy_clock(value: Any) -> Clock:
    if not isinstance(value, list) or len(value) != 3 or any(type(x) is not int for x in value):
        raise SnapshotError(f"malformed clock {value!r}")
    return Clock(*value)
