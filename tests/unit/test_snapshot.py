"""The LHV1 snapshot frame: round trips, the older envelopes, and rejected input."""

from __future__ import annotations

import errno
import gc
import io
import os
import warnings
import zlib
from pathlib import Path

import hnswlib
import numpy as np
import orjson
import pytest

from lhv_index import (
    Clock,
    Delete,
    EngineKind,
    Index,
    IndexParams,
    Space,
    Upsert,
    read_frame,
    read_snapshot,
    write_snapshot,
)
from lhv_index import _capture as capture_module
from lhv_index._capture import FilePiece
from lhv_index._crc import PARALLEL_BYTES, crc32, crc32_combine
from lhv_index._engines import HnswEngine
from lhv_index._frame import ENVELOPE_VERSION, HEADER, MAGIC
from lhv_index.errors import SnapshotError

DIM = 6


def build(engine: str = "hnsw", space: str = "cosine", n: int = 200) -> Index:
    idx = Index("docs", IndexParams(dim=DIM, space=Space(space), engine=EngineKind(engine)))
    X = np.random.default_rng(1).normal(size=(n, DIM)).astype(np.float32) * 3
    idx.apply(
        [
            Upsert(f"doc-{i}", X[i], {"n": i, "tag": "é"} if i % 3 else None, Clock(i % 4, 1, i))
            for i in range(n)
        ]
    )
    idx.apply([Delete(f"doc-{i}", Clock(9, 2, i)) for i in range(0, n, 7)])
    idx.apply([Delete("never-added", Clock(0, 3, 0))])
    return idx


def encode(idx: Index, source: dict | None = None) -> bytes:
    buf = io.BytesIO()
    size = write_snapshot(idx, buf, source=source or {"topic": "lhv.commands", "offset": 3})
    data = buf.getvalue()
    assert size == len(data)
    return data


@pytest.mark.parametrize("engine", ["hnsw", "exact", "annoy"])
@pytest.mark.parametrize("space", ["cosine", "l2", "ip"])
def test_snapshot_round_trip_preserves_logical_state(engine: str, space: str) -> None:
    idx = build(engine, space)
    data = encode(idx)
    assert data[:4] == MAGIC
    back, source = read_snapshot(data, expect=idx.params)
    assert source == {"topic": "lhv.commands", "offset": 3}
    assert back.name == "docs" and back.params == idx.params
    assert back.logical_state() == idx.logical_state()
    q = np.random.default_rng(2).normal(size=(5, DIM)).astype(np.float32)
    assert back.search(q, 5, ef=100) == idx.search(q, 5, ef=100)
    strip = lambda st: {k: v for k, v in st.items() if k != "capacity"}  # noqa: E731
    assert strip(back.stats()) == strip(idx.stats())


def test_restored_index_keeps_applying_writes_with_lww() -> None:
    idx = build()
    back, _ = read_snapshot(io.BytesIO(encode(idx)))
    assert (
        back.apply([Upsert("doc-0", np.ones(DIM, np.float32), None, Clock(0, 1, 0))]).applied == 0
    )
    res = back.apply(
        [
            Upsert(f"new-{i}", np.full(DIM, i + 1, np.float32), None, Clock(0, 5, i))
            for i in range(50)
        ]
    )
    assert res.applied == 50 and len(back) == len(idx) + 50
    assert back.search(np.ones(DIM, np.float32), 1)[0][0].distance == pytest.approx(0, abs=1e-5)


def test_empty_index_round_trips() -> None:
    idx = Index("e", IndexParams(dim=3, space=Space.L2))
    back, _ = read_snapshot(encode(idx))
    assert len(back) == 0 and back.logical_state() == {"live": {}, "tombstones": {}}


def test_snapshot_streams_to_a_real_file(tmp_path: Path) -> None:
    idx = build()
    path = tmp_path / "snap.lhv"
    with path.open("wb") as f:
        size = write_snapshot(idx, f, source={})
    assert path.stat().st_size == size
    with path.open("rb") as f:
        back, _ = read_snapshot(f)
    assert back.logical_state() == idx.logical_state()


class PlainStream(io.RawIOBase):
    """A readable stream with no buffer and no file behind it (like a socket)."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        chunk = self._src.read(min(len(buf), 4096))
        buf[: len(chunk)] = chunk
        return len(chunk)


def test_snapshot_reads_the_same_from_bytes_streams_and_files(tmp_path: Path) -> None:
    idx = build("hnsw", "l2")
    data = encode(idx)
    want = idx.logical_state()
    assert read_snapshot(PlainStream(data))[0].logical_state() == want
    assert read_snapshot(bytearray(data))[0].logical_state() == want
    prefixed = io.BytesIO(b"xyz" + data)
    prefixed.seek(3)
    assert read_snapshot(prefixed)[0].logical_state() == want
    # a frame written at a file's current position, read back from there
    path = tmp_path / "frames.bin"
    with path.open("wb") as f:
        f.write(b"head")
        size = write_snapshot(idx, f, source={})
        assert f.tell() == 4 + size
    with path.open("rb") as f:
        assert f.read(4) == b"head"
        assert read_snapshot(f)[0].logical_state() == want
        assert f.tell() == 4 + size


@pytest.mark.parametrize("damage", ["flipped", "cut", "trailing"])
def test_damaged_engine_section_in_a_file_is_never_loaded(tmp_path: Path, damage: str) -> None:
    """A downloaded snapshot is read from its file: the engine's section is copied to
    its own file by the kernel and checksummed from the page cache; a flipped byte in
    it, a file cut inside it, or bytes after the frame are all refused."""
    data = encode(build("hnsw", "l2"))
    section = next(s for s in read_frame(data).sections if s.name == "engine")
    bad = bytearray(data)
    if damage == "flipped":
        bad[section.start + section.length // 2] ^= 0x01
    elif damage == "cut":
        del bad[section.start + section.length // 2 :]
    else:
        bad += b"x"
    path = tmp_path / "snap.lhv"
    path.write_bytes(bad)
    with path.open("rb") as f, pytest.raises(SnapshotError) as err:
        read_snapshot(f)
    want = {"flipped": "checksum mismatch", "cut": "truncated", "trailing": "after its last"}
    assert want[damage] in str(err.value)


@pytest.mark.parametrize("copy", ["missing", "failing"])
def test_a_file_snapshot_reads_where_the_kernel_cannot_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: str
) -> None:
    """Without `os.copy_file_range` (not Linux), or where it fails between two files,
    the engine's section is copied through user space."""
    if copy == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:

        def refuse(*_args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    idx = build("hnsw", "l2")
    path = tmp_path / "snap.lhv"
    path.write_bytes(encode(idx))
    with path.open("rb") as f:
        assert read_snapshot(f)[0].logical_state() == idx.logical_state()


def test_damaged_snapshot_from_a_plain_stream_is_never_loaded() -> None:
    data = encode(build())
    bad = bytearray(data)
    bad[-10] ^= 0x10
    with pytest.raises(SnapshotError):
        read_snapshot(PlainStream(bytes(bad)))
    with pytest.raises(SnapshotError):
        read_snapshot(PlainStream(data[:-3]))


def test_checksums_of_large_buffers_match_zlib() -> None:
    blob = np.random.default_rng(0).integers(0, 256, size=PARALLEL_BYTES + 12345, dtype=np.uint8)
    data = blob.tobytes()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])
    for a, b in [(b"", b"x"), (b"abc", b""), (data[:1000], data[1000:5000])]:
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("cut", [0, 3, 7, 8, 40, -1, -100, -5000])
def test_truncated_snapshot_is_never_loaded(cut: int) -> None:
    data = encode(build())
    with pytest.raises(SnapshotError):
        read_snapshot(data[:cut])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(SnapshotError):
        read_snapshot(encode(build()) + b"\0")


def test_bit_flipped_snapshot_is_never_loaded() -> None:
    data = encode(build())
    env_len = HEADER.unpack_from(data)[1]
    body = HEADER.size + env_len
    rng = np.random.default_rng(0)
    positions = [0, 5, HEADER.size + 2, body + 1, body + 100, len(data) - 1]
    positions += rng.integers(body, len(data), size=30).tolist()
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(SnapshotError):
            read_snapshot(bytes(bad))


def test_damaged_annoy_snapshot_is_never_loaded() -> None:
    idx = build("annoy")
    idx._engine.rebuild()  # type: ignore[attr-defined]
    idx.apply([Upsert("late", np.ones(DIM, np.float32), None, Clock(0, 9, 0))])
    data = encode(idx)
    back, _ = read_snapshot(data)
    assert back.logical_state() == idx.logical_state()
    rng = np.random.default_rng(1)
    body = HEADER.size + HEADER.unpack_from(data)[1]
    for pos in rng.integers(body, len(data), size=20).tolist():
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(SnapshotError):
            read_snapshot(bytes(bad))
    for cut in rng.integers(1, len(data), size=10).tolist():
        with pytest.raises(SnapshotError):
            read_snapshot(data[:cut])


def test_envelope_corruption_is_rejected() -> None:
    data = encode(build())
    env_len = HEADER.unpack_from(data)[1]
    env = orjson.loads(data[HEADER.size : HEADER.size + env_len])
    env["count"] += 1
    raw = orjson.dumps(env)
    with pytest.raises(SnapshotError):
        read_snapshot(HEADER.pack(MAGIC, len(raw)) + raw + data[HEADER.size + env_len :])
    with pytest.raises(SnapshotError):
        read_snapshot(b"LHV2" + data[4:])
    with pytest.raises(SnapshotError):
        read_snapshot(HEADER.pack(MAGIC, 2) + b"[]")


@pytest.mark.parametrize(
    "expect",
    [
        IndexParams(dim=DIM + 1),
        IndexParams(dim=DIM, space=Space.L2),
        IndexParams(dim=DIM, engine=EngineKind.EXACT),
    ],
)
def test_mismatched_snapshot_is_rejected(expect: IndexParams) -> None:
    with pytest.raises(SnapshotError):
        read_snapshot(encode(build()), expect=expect)


def test_envelope_records_format_params_and_section_checksums() -> None:
    data = encode(build())
    env_len = HEADER.unpack_from(data)[1]
    env = orjson.loads(data[HEADER.size : HEADER.size + env_len])
    assert env["format"] == ENVELOPE_VERSION == 3
    assert env["params"]["dim"] == DIM and env["engine"] == "hnsw"
    assert env["engine_state"]["allow_replace_deleted"] is False
    pos = HEADER.size + env_len
    for sec in env["sections"]:
        chunk = data[pos : pos + sec["length"]]
        assert zlib.crc32(chunk) == sec["crc32"]
        pos += sec["length"]
    assert pos == len(data)


# -- hand-written older envelopes ----------------------------------------------------------------


def raw_hnsw(tmp_path: Path, space: str, X: np.ndarray, deleted: list[int] = ()) -> bytes:
    index = hnswlib.Index(space=space, dim=X.shape[1])
    index.init_index(max_elements=len(X), M=16, ef_construction=100)
    index.add_items(X, np.arange(len(X), dtype=np.uint64))
    for label in deleted:
        index.mark_deleted(label)
    path = tmp_path / "raw.bin"
    index.save_index(str(path))
    return path.read_bytes()


def frame(envelope: dict, engine: bytes) -> bytes:
    envelope = {**envelope, "length": len(engine), "crc32": zlib.crc32(engine)}
    env = orjson.dumps(envelope)
    return HEADER.pack(MAGIC, len(env)) + env + engine


def test_v1_envelope_decodes_and_loses_ids_without_metadata(tmp_path: Path) -> None:
    X = np.random.default_rng(5).normal(size=(20, DIM)).astype(np.float32)
    engine = raw_hnsw(tmp_path, "cosine", X)
    meta = {f"doc-{i}": {"label": i, "metadata": {"i": i}} for i in range(20) if i % 4}
    data = frame(
        {
            "format": 1,
            "name": "old",
            "engine": "hnsw",
            "params": {"dim": DIM, "space": "cosine", "M": 16, "ef_construction": 100},
            "source": {"topic": "lhv.commands", "partition": 0, "offset": 41},
            "metadata": meta,
        },
        engine,
    )
    idx, source = read_snapshot(data, expect=IndexParams(dim=DIM, M=16, ef_construction=100))
    assert source["offset"] == 41 and idx.name == "old"
    live = idx.logical_state()["live"]
    assert sorted(live) == sorted(meta)  # doc-0, doc-4, ... had no metadata: lost
    item = idx.get(["doc-5"])[0]
    assert item.metadata == {"i": 5}
    np.testing.assert_allclose(item.vector, X[5] / np.linalg.norm(X[5]), rtol=1e-5)
    assert item.clock == Clock(0, 41, 2**63 - 1)
    assert idx.search(X[5], 1)[0][0].id == "doc-5"
    # a replay of the records the snapshot covers changes nothing; later records win
    assert idx.apply([Upsert("doc-5", X[0], None, Clock(0, 41, 5))]).applied == 0
    assert idx.apply([Upsert("doc-5", X[0], None, Clock(0, 42, 0))]).applied == 1
    # the lost ids' slots are reused
    idx.apply([Upsert(f"n{i}", X[i], None, Clock(0, 43, i)) for i in range(5)])
    assert idx.stats()["slots"] == 20


def test_v2_envelope_decodes_with_explicit_ids(tmp_path: Path) -> None:
    X = np.random.default_rng(6).normal(size=(10, DIM)).astype(np.float32)
    engine = raw_hnsw(tmp_path, "l2", X, deleted=[3])
    ids = [f"v2-{i}" if i != 3 else None for i in range(10)]
    data = frame(
        {
            "format": 2,
            "name": "mid",
            "engine": "hnsw",
            "params": {"dim": DIM, "space": "l2", "M": 16, "ef_construction": 100},
            "source": {"offset": 7},
            "IDs": ids,
            "metadata": {"v2-1": {"a": 1}},
            "clocks": {"v2-2": [4, 5, 6]},
            "tombstones": {"v2-3": [0, 6, 0]},
        },
        engine,
    )
    idx, _ = read_snapshot(data)
    state = idx.logical_state()
    assert sorted(state["live"]) == sorted(i for i in ids if i)
    assert state["tombstones"] == {"v2-3": Clock(0, 6, 0)}
    assert idx.clock_of("v2-2") == Clock(4, 5, 6)
    assert idx.get(["v2-1"])[0].metadata == {"a": 1}
    np.testing.assert_array_equal(idx.get(["v2-9"])[0].vector, X[9])
    assert [h.id for h in idx.search(X[3], 1)[0]] != ["v2-3"]


def test_v2_envelope_with_bad_crc_is_rejected(tmp_path: Path) -> None:
    X = np.random.default_rng(6).normal(size=(4, DIM)).astype(np.float32)
    engine = raw_hnsw(tmp_path, "l2", X)
    env = {
        "format": 2,
        "engine": "hnsw",
        "params": {"dim": DIM, "space": "l2"},
        "IDs": ["a", "b", "c", "d"],
        "length": len(engine),
        "crc32": zlib.crc32(engine) ^ 1,
    }
    raw = orjson.dumps(env)
    with pytest.raises(SnapshotError):
        read_snapshot(HEADER.pack(MAGIC, len(raw)) + raw + engine)


def test_legacy_engine_of_other_dim_is_rejected(tmp_path: Path) -> None:
    X = np.random.default_rng(6).normal(size=(4, DIM + 2)).astype(np.float32)
    engine = raw_hnsw(tmp_path, "l2", X)
    data = frame(
        {"format": 2, "engine": "hnsw", "params": {"dim": DIM, "space": "l2"}, "IDs": list("abcd")},
        engine,
    )
    with pytest.raises(SnapshotError):
        read_snapshot(data)


# -- bases captured to files ----------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("space", ["cosine", "l2", "ip"])
def test_hnsw_base_holds_the_state_at_capture_not_later_writes(space: str) -> None:
    idx = build("hnsw", space)
    at_capture = idx.logical_state()
    q = np.random.default_rng(5).normal(size=(4, DIM)).astype(np.float32)
    hits_at_capture = idx.search(q, 5, ef=100)
    with idx.capture_base() as base:
        # written after the capture, before it is encoded: new ids (enough to grow the
        # engine), a delete, and a rewrite of a live id
        X = np.random.default_rng(6).normal(size=(500, DIM)).astype(np.float32)
        idx.apply([Upsert(f"late-{i}", X[i], None, Clock(0, 5, i)) for i in range(500)])
        idx.apply([Delete("doc-1", Clock(9, 6, 0))])
        idx.apply([Upsert("doc-2", -X[0], {"late": True}, Clock(9, 6, 1))])
        buf = io.BytesIO()
        write_snapshot(base, buf, source={"offset": 3})
    back, _ = read_snapshot(buf.getvalue(), expect=idx.params)
    assert back.logical_state() == at_capture
    assert back.search(q, 5, ef=100) == hits_at_capture
    assert idx.logical_state() != at_capture


def test_hnsw_base_engine_section_is_save_index_at_capture(tmp_path: Path) -> None:
    idx = build("hnsw", "l2")
    engine = idx._engine
    assert isinstance(engine, HnswEngine)
    with idx.capture_base() as base:
        engine.raw.save_index(str(tmp_path / "raw"))
        X = np.random.default_rng(7).normal(size=(300, DIM)).astype(np.float32)
        idx.apply([Upsert(f"late-{i}", X[i], None, Clock(0, 5, i)) for i in range(300)])
        data = encode(base)
    frame = read_frame(data)
    section = frame.section("engine")
    assert section is not None
    assert data[section.start : section.end] == (tmp_path / "raw").read_bytes()


@pytest.mark.parametrize("engine", ["hnsw", "exact", "annoy"])
def test_base_frame_does_not_depend_on_the_read_chunk_size(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = build(engine, "l2", n=400)
    with idx.capture_base() as base:
        whole = encode(base)
        monkeypatch.setattr(capture_module, "READ_CHUNK_BYTES", 1000)
        chunked = encode(base)
    assert chunked == whole
    read_frame(chunked)  # every section's crc32 matches


@pytest.mark.parametrize("engine", ["hnsw", "exact", "annoy"])
def test_a_closed_base_has_released_its_engine_files(engine: str) -> None:
    idx = build(engine, "l2")
    base = idx.capture_base()
    pieces = [p for _, ps in base.engine for p in ps]
    assert pieces and all(isinstance(p, FilePiece) and not p.closed for p in pieces)
    base.close()
    base.close()  # idempotent
    assert all(isinstance(p, FilePiece) and p.closed for p in pieces)
    with pytest.raises(ValueError, match="closed"):
        encode(base)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_capturing_and_writing_many_times_leaks_no_file_descriptors() -> None:
    idx = build("hnsw", "cosine")
    encode(idx)  # first use: imports and lazily opened files are not the capture's
    before = _fd_count()
    # a capture's file left to the garbage collector would warn as it is finalized
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for i in range(40):
            one = np.ones(DIM, dtype=np.float32)
            idx.apply([Upsert(f"more-{i}", one, None, Clock(0, 9, i))])
            if i % 2:
                encode(idx)  # captures and closes
            else:
                with idx.capture_base() as base:
                    encode(base)
        gc.collect()
    assert _fd_count() == before
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
