"""Delta segments, base captures and the tombstone horizon through files and frames."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lhv_index import (
    Clock,
    Delete,
    EngineKind,
    Index,
    IndexParams,
    Space,
    Upsert,
    apply_delta,
    read_delta,
    read_snapshot,
    write_delta,
    write_snapshot,
)
from lhv_index._capture import FilePiece
from lhv_index._engines import HnswEngine
from lhv_index.errors import SnapshotError

DIM = 8


def _filled(n: int, *, engine: str = "hnsw", space: str = "cosine") -> Index:
    index = Index("u", IndexParams(dim=DIM, space=Space(space), engine=EngineKind(engine)))
    vecs = np.random.default_rng(1).normal(size=(n, DIM)).astype(np.float32)
    index.apply(
        [
            Upsert(id=f"i{k}", vector=vecs[k], metadata={"k": k}, clock=Clock(0, 1, k))
            for k in range(n)
        ]
    )
    return index


def test_hnsw_capture_gives_the_bytes_save_index_writes(tmp_path: Path) -> None:
    index = _filled(2000)
    index.apply([Delete(id=f"i{k}", clock=Clock(0, 2, k)) for k in range(0, 2000, 9)])
    engine = index._engine
    assert isinstance(engine, HnswEngine)
    _, sections = engine.capture()
    engine.raw.save_index(str(tmp_path / "raw"))
    ((name, (piece,)),) = sections
    assert name == "engine" and isinstance(piece, FilePiece)
    try:
        assert b"".join(piece.chunks(size=4096)) == (tmp_path / "raw").read_bytes()
    finally:
        piece.close()


@pytest.mark.parametrize("engine", ["hnsw", "exact", "annoy"])
def test_base_and_deltas_round_trip_through_files(engine: str, tmp_path: Path) -> None:
    index = _filled(300, engine=engine)
    with open(tmp_path / "base", "wb") as f, index.capture_base() as captured:
        write_snapshot(captured, f, source={"offset": 1})
    index.apply([Delete(id="i3", clock=Clock(4, 2, 0))])
    index.apply([Upsert(id="new", vector=np.ones(DIM), metadata=None, clock=Clock(0, 3, 0))])
    index.apply([Upsert(id="i5", vector=np.ones(DIM), metadata={}, clock=Clock(0, 3, 1))])
    with open(tmp_path / "d1", "wb") as f:
        write_delta(index.capture_delta(), f, source={"offset": 3})
    assert index.compact_tombstones(3) == 1
    with open(tmp_path / "d2", "wb") as f:
        write_delta(index.capture_delta(), f, source={"offset": 3})
    with open(tmp_path / "base", "rb") as f:
        restored, source = read_snapshot(f, expect=index.params)
    assert source == {"offset": 1}
    for name in ("d1", "d2"):
        with open(tmp_path / name, "rb") as f:
            apply_delta(restored, f)
    assert restored.logical_state() == index.logical_state()
    assert restored.stats()["version_floor"] == index.version_floor == 4


def test_delta_bytes_follow_the_changed_ids_not_the_index() -> None:
    index = _filled(5000)
    index.capture_base().close()
    index.apply([Upsert(id="i1", vector=np.ones(DIM), metadata=None, clock=Clock(0, 2, 0))])
    out = io.BytesIO()
    size = write_delta(index.capture_delta(), out, source={})
    assert size < 2000
    # nothing changed since: an empty delta
    assert len(index.capture_delta()) == 0


def test_version_floor_survives_a_snapshot() -> None:
    index = _filled(10)
    index.apply([Delete(id="i1", clock=Clock(9, 2, 0))])
    index.compact_tombstones(5)
    out = io.BytesIO()
    write_snapshot(index, out, source={})
    back, _ = read_snapshot(out.getvalue())
    assert back.version_floor == 9 and back.stats()["deleted"] == 0


def test_a_delta_is_not_read_as_a_snapshot_nor_a_snapshot_as_a_delta() -> None:
    index = _filled(10)
    snap = io.BytesIO()
    write_snapshot(index, snap, source={})
    index.apply([Delete(id="i1", clock=Clock(0, 2, 0))])
    delta = io.BytesIO()
    write_delta(index.capture_delta(), delta, source={})
    with pytest.raises(SnapshotError, match="delta"):
        read_snapshot(delta.getvalue())
    with pytest.raises(SnapshotError, match="base"):
        read_delta(snap.getvalue())


def test_delta_of_another_space_is_refused() -> None:
    index = _filled(10, space="l2")
    index.apply([Delete(id="i1", clock=Clock(0, 2, 0))])
    out = io.BytesIO()
    write_delta(index.capture_delta(), out, source={})
    other = Index("u", IndexParams(dim=DIM, space=Space.COSINE))
    with pytest.raises(SnapshotError):
        apply_delta(other, out.getvalue())


def test_snapshot_is_read_from_a_file_one_section_at_a_time() -> None:
    index = _filled(500)
    with tempfile.TemporaryFile() as f:
        write_snapshot(index, f, source={"offset": 7})
        f.seek(0)
        back, source = read_snapshot(f)
        assert source == {"offset": 7}
        assert f.tell() == os.fstat(f.fileno()).st_size
    assert back.logical_state() == index.logical_state()


def _stored(index: Index, ids: range) -> np.ndarray:
    """The stored vectors of `ids`, in order."""
    return np.stack([np.asarray(it.vector) for it in index.get([f"i{k}" for k in ids])])


def _rewrite(index: Index, ids: range, *, offset: int, vectors: bool) -> np.ndarray:
    """Upsert `ids` again at `offset`: new vectors (returned), or the stored ones with new
    metadata."""
    rng = np.random.default_rng(offset)
    fresh = rng.normal(size=(len(ids), DIM)).astype(np.float32)
    vecs = fresh if vectors else _stored(index, ids)
    index.apply(
        [
            Upsert(id=f"i{k}", vector=v, metadata={"at": offset}, clock=Clock(0, offset, n))
            for n, (k, v) in enumerate(zip(ids, vecs, strict=True))
        ]
    )
    return vecs


@pytest.mark.parametrize("engine", ["hnsw", "exact", "annoy"])
def test_delta_rewriting_existing_ids_restores_them_at_their_new_vectors(engine: str) -> None:
    index = _filled(2000, engine=engine, space="l2")
    old = _stored(index, range(300))
    base = io.BytesIO()
    write_snapshot(index, base, source={"offset": 1})
    new = _rewrite(index, range(300), offset=2, vectors=True)
    _rewrite(index, range(300, 400), offset=2, vectors=False)
    delta = io.BytesIO()
    write_delta(index.capture_delta(), delta, source={"offset": 2})
    restored, _ = read_snapshot(base.getvalue())
    assert apply_delta(restored, delta.getvalue()) == 400
    assert restored.logical_state() == index.logical_state()
    hits = restored.search(new, 1)
    assert [h[0].id for h in hits] == [f"i{k}" for k in range(300)]
    assert all(h[0].distance < 1e-4 for h in hits)
    assert all(h[0].distance > 1e-3 for h in restored.search(old, 1))
    stats = restored.stats()
    assert stats["count"] == 2000 == stats["slots"] - stats["free_slots"]
    assert restored._engine.slots() == stats["slots"]
    # hnswlib replaces a live label slowly: rewritten vectors go to fresh labels; the
    # metadata-only rewrites keep theirs; the other engines replace in place
    assert stats["free_slots"] == (300 if engine == "hnsw" else 0)
    assert apply_delta(restored, delta.getvalue()) == 0


@pytest.mark.parametrize("engine", ["hnsw", "exact"])
def test_delta_rewriting_most_ids_reclaims_the_freed_slots(engine: str) -> None:
    index = _filled(2000, engine=engine, space="l2")
    base = io.BytesIO()
    write_snapshot(index, base, source={"offset": 1})
    new = _rewrite(index, range(1200), offset=2, vectors=True)
    delta = io.BytesIO()
    write_delta(index.capture_delta(), delta, source={"offset": 2})
    restored, _ = read_snapshot(base.getvalue())
    apply_delta(restored, delta.getvalue())
    assert restored.logical_state() == index.logical_state()
    # past the compaction threshold the engine is rebuilt over the live items
    assert restored.stats()["free_slots"] == 0 and restored.stats()["slots"] == 2000
    hits = restored.search(new, 1)
    assert [h[0].id for h in hits] == [f"i{k}" for k in range(1200)]
