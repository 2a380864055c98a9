"""The public LHV1 frame reader: envelope and section bounds of any frame, checksums
checked, damage described."""

from __future__ import annotations

import io

import numpy as np
import pytest

from lhv_index import (
    Clock,
    Delete,
    Index,
    IndexParams,
    Upsert,
    read_frame,
    write_delta,
    write_snapshot,
)
from lhv_index.errors import SnapshotError

DIM = 4


def _index() -> Index:
    idx = Index("docs", IndexParams(dim=DIM, space="l2", engine="exact"))
    rng = np.random.default_rng(3)
    idx.apply(
        [
            Upsert(f"d{i}", rng.normal(size=DIM).astype(np.float32), None, Clock(0, 1, i))
            for i in range(5)
        ]
    )
    return idx


def _snapshot(idx: Index) -> bytes:
    buf = io.BytesIO()
    write_snapshot(idx, buf, source={"topic": "t", "partition": 0, "offset": 1})
    return buf.getvalue()


def test_a_sound_snapshot_reads_with_its_envelope_and_contiguous_sections() -> None:
    data = _snapshot(_index())
    frame = read_frame(data)
    assert frame.format == 3 and frame.kind == "base" and frame.envelope["count"] == 5
    assert frame.size == len(data) == frame.end
    first = frame.sections[0]
    assert first.start == 8 + frame.envelope_bytes
    for a, b in zip(frame.sections, frame.sections[1:], strict=False):
        assert b.start == a.end
    ids = frame.section("ids.utf8")
    assert ids is not None and data[ids.start : ids.end] == b"d0d1d2d3d4"
    assert frame.problems(data) == []


def test_a_delta_frame_reads_as_a_delta() -> None:
    idx = _index()
    idx.capture_base().close()
    idx.apply([Delete("d1", Clock(0, 2, 0))])
    buf = io.BytesIO()
    write_delta(idx.capture_delta(), buf, source={"offset": 2})
    frame = read_frame(buf.getvalue())
    assert frame.kind == "delta" and frame.envelope["tombstones"] == 1
    assert [s.name for s in frame.sections if s.name.startswith("tombs")] == [
        "tombs.len",
        "tombs.utf8",
        "tombs.clocks",
    ]


def test_a_truncated_frame_is_refused_and_its_damage_described() -> None:
    data = _snapshot(_index())
    cut = data[:-3]
    with pytest.raises(SnapshotError, match="truncated in section 'engine'"):
        read_frame(cut)
    frame = read_frame(cut, verify=False)  # the envelope still reads
    assert frame.envelope["name"] == "docs"
    assert frame.problems(cut) == ["snapshot is truncated in section 'engine'"]
    for short in (data[:5], data[: 8 + frame.envelope_bytes - 1]):
        with pytest.raises(SnapshotError, match=r"truncated in the (header|envelope)"):
            read_frame(short, verify=False)


def test_a_corrupted_frame_is_refused_naming_the_section() -> None:
    data = bytearray(_snapshot(_index()))
    clocks = read_frame(data).section("clocks")
    assert clocks is not None
    data[clocks.start] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum mismatch in section 'clocks'"):
        read_frame(data)
    trailing = bytes(_snapshot(_index())) + b"xx"
    assert read_frame(trailing, verify=False).problems(trailing) == [
        "snapshot has 2 bytes after its last section"
    ]
    with pytest.raises(SnapshotError, match="not an LHV1 snapshot"):
        read_frame(b"LHV2" + bytes(data[4:]))
