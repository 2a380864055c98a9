"""Delta segments: the ids written since the previous capture, in an LHV1 frame.

A delta is written with the same frame, checksums and section encodings as a full
snapshot (`_snapshot`), under envelope v3 with ``"kind": "delta"`` (a full snapshot has
``"kind": "base"``, or no kind). `read_snapshot` refuses a delta and `read_delta` a base,
so one is never loaded as the other. Its size follows the number of changed ids::

    {"format": 3, "kind": "delta", "name": str, "engine": str, "params": {...},
     "count": live entries, "tombstones": tombstoned entries, "gone": dropped entries,
     "version_floor": int, "source": {...}, "checksum": "crc32", "sections": [...]}

Sections, in this order (n = count, t = tombstones, g = gone):

- `ids.len`, `ids.utf8`, `clocks`, `meta.len`, `meta.json`, `norms` (cosine only): as in
  a full snapshot, for the n live entries
- `vectors`: f32[n, dim], the vectors as the engine holds them (normalized under cosine)
- `tombs.len`, `tombs.utf8`, `tombs.clocks`: the t tombstoned entries
- `gone.len`, `gone.utf8`: the g ids with no state (their tombstones were compacted away)

Restore is base, then each delta in capture order (`apply_delta`); a delta sets its ids to
their captured state, so applying one twice changes nothing.
"""

from __future__ import annotations

from typing import IO, Any, BinaryIO

import numpy as np

from lhv_index._capture import Delta
from lhv_index._frame import (
    ENVELOPE_VERSION,
    KIND_DELTA,
    Section,
    SectionReader,
    frame_reader,
    read_envelope,
    section_specs,
    write_frame,
)
from lhv_index._index import Index
from lhv_index._params import IndexParams, Limits, Space
from lhv_index._snapshot import (
    _clock_bytes,
    _decode_strings,
    _snapshot_errors,
    _strings,
    envelope_basics,
)
from lhv_index.errors import InvalidRequest, SnapshotError

__all__ = ["apply_delta", "read_delta", "write_delta"]

Source = BinaryIO | IO[bytes] | bytes | bytearray | memoryview


def write_delta(delta: Delta, out: BinaryIO | IO[bytes], *, source: dict[str, Any]) -> int:
    """Write a captured delta (`Index.capture_delta`) as one LHV1 frame to `out`; returns
    the bytes written. `source` is stored as in `write_snapshot`.

    Raises:
        InvalidRequest: `source` is not a JSON object.
    """
    if not isinstance(source, dict):
        raise InvalidRequest("source must be a JSON object")
    ids_len, ids_utf8 = _strings(delta.ids)
    tomb_len, tomb_utf8 = _strings(delta.tomb_ids)
    gone_len, gone_utf8 = _strings(delta.gone)
    sections: list[Section] = [
        ("ids.len", [ids_len]),
        ("ids.utf8", [ids_utf8]),
        ("clocks", [_clock_bytes(delta.clocks)]),
        ("meta.len", [delta.meta_lens.astype("<u4")]),
        ("meta.json", [delta.meta_json]),
    ]
    if delta.norms is not None:
        sections.append(("norms", [delta.norms.astype("<f4")]))
    sections += [
        ("vectors", [np.ascontiguousarray(delta.vectors, dtype="<f4")]),
        ("tombs.len", [tomb_len]),
        ("tombs.utf8", [tomb_utf8]),
        ("tombs.clocks", [_clock_bytes(delta.tomb_clocks)]),
        ("gone.len", [gone_len]),
        ("gone.utf8", [gone_utf8]),
    ]
    envelope: dict[str, Any] = {
        "format": ENVELOPE_VERSION,
        "kind": KIND_DELTA,
        "name": delta.name,
        "engine": delta.params.engine.value,
        "params": delta.params.to_dict(),
        "count": len(delta.ids),
        "tombstones": len(delta.tomb_ids),
        "gone": len(delta.gone),
        "version_floor": delta.version_floor,
        "source": source,
    }
    return write_frame(out, envelope, sections)


def read_delta(
    src: Source, *, expect: IndexParams | None = None, limits: Limits | None = None
) -> tuple[Delta, dict[str, Any]]:
    """Decode one delta segment; returns it and its `source`. A file object is read one
    section at a time. Every section is checked (length, checksum, counts, ids) before
    anything is returned.

    Raises:
        SnapshotError: truncated, corrupted or mismatched input, or not a delta.
    """
    with frame_reader(src) as reader:
        envelope = read_envelope(reader)
        with _snapshot_errors():
            return _read_delta(reader, envelope, expect, limits)


_NEED = [
    "ids.len",
    "ids.utf8",
    "clocks",
    "meta.len",
    "meta.json",
    "vectors",
    "tombs.len",
    "tombs.utf8",
    "tombs.clocks",
    "gone.len",
    "gone.utf8",
]


def _read_delta(
    reader: SectionReader,
    envelope: dict[str, Any],
    expect: IndexParams | None,
    limits: Limits | None,
) -> tuple[Delta, dict[str, Any]]:
    params, name, source = envelope_basics(envelope, expect, KIND_DELTA)
    if envelope.get("format") != ENVELOPE_VERSION:
        raise SnapshotError(f"unknown delta format {envelope.get('format')!r}")
    data: dict[str, bytes] = {}
    for spec in section_specs(envelope):
        sec = reader.section(spec)
        sec_name = spec[0]
        if sec_name in data:
            raise SnapshotError(f"section {sec_name!r} appears twice")
        data[sec_name] = sec
    reader.expect_end()
    cosine = params.space is Space.COSINE
    need = _NEED + (["norms"] if cosine else [])
    missing = [s for s in need if s not in data]
    if missing:
        raise SnapshotError(f"delta lacks sections {missing}")
    n, t, g, floor = (envelope[k] for k in ("count", "tombstones", "gone", "version_floor"))
    if not all(type(x) is int and x >= 0 for x in (n, t, g, floor)):
        raise SnapshotError("envelope counts are malformed")
    ids = _decode_strings(data["ids.len"], data["ids.utf8"], n, "ids")
    tomb_ids = _decode_strings(data["tombs.len"], data["tombs.utf8"], t, "tombs")
    gone = _decode_strings(data["gone.len"], data["gone.utf8"], g, "gone")
    max_id_bytes = (limits if limits is not None else Limits()).max_id_bytes
    for lens in (data["ids.len"], data["tombs.len"], data["gone.len"]):
        arr = np.frombuffer(lens, dtype="<u4")
        if arr.size and (int(arr.min()) < 1 or int(arr.max()) > max_id_bytes):
            raise SnapshotError("an id is empty or over the id size limit")
    if len(set(ids) | set(tomb_ids) | set(gone)) != n + t + g:
        raise SnapshotError("ids repeat")
    clocks = np.frombuffer(data["clocks"], dtype="<i8").astype(np.int64)
    tomb_clocks = np.frombuffer(data["tombs.clocks"], dtype="<i8").astype(np.int64)
    if clocks.size != 3 * n or tomb_clocks.size != 3 * t:
        raise SnapshotError("clocks do not match counts")
    vectors = np.frombuffer(data["vectors"], dtype="<f4").astype(np.float32)
    if vectors.size != n * params.dim:
        raise SnapshotError("vectors section does not match count and dim")
    norms = None
    if cosine:
        norms = np.frombuffer(data["norms"], dtype="<f4").astype(np.float32)
        if norms.size != n:
            raise SnapshotError("norms section does not match count")
    meta_lens = np.frombuffer(data["meta.len"], dtype="<u4").astype(np.uint32)
    meta_json = data["meta.json"]
    if meta_lens.size != n or int(meta_lens.sum(dtype=np.int64)) != len(meta_json):
        raise SnapshotError("metadata sections do not match")
    starts = (np.cumsum(meta_lens, dtype=np.int64) - meta_lens)[meta_lens > 0]
    if starts.size and not (np.frombuffer(meta_json, dtype=np.uint8)[starts] == ord("{")).all():
        raise SnapshotError("metadata is not a JSON object")
    delta = Delta(
        name=name,
        params=params,
        ids=ids,
        clocks=clocks.reshape(n, 3),
        vectors=vectors.reshape(n, params.dim),
        norms=norms,
        meta_lens=meta_lens,
        meta_json=meta_json,
        tomb_ids=tomb_ids,
        tomb_clocks=tomb_clocks.reshape(t, 3),
        gone=gone,
        version_floor=floor,
    )
    return delta, source


def apply_delta(index: Index, delta: Delta | Source) -> int:
    """Set every id of `delta` (captured, or a frame to read with `read_delta`) to its
    captured state in `index`, with one vectorized engine add; returns the ids whose
    state changed (0 when the delta was applied already).

    Applying base, delta 1, ..., delta N in capture order gives the logical state the
    index had at the last capture, `version_floor` included. A frame is read and checked
    whole before anything is applied.

    Raises:
        SnapshotError: a bad frame, or a delta of another dim, space or engine.
        EngineError: the engine failed; the index refuses further use (restore it).
    """
    if not isinstance(delta, Delta):
        delta, _ = read_delta(delta, expect=index.params, limits=index.limits)
    return index._apply_delta(delta)
