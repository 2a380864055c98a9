"""Property tests: delta segments and the tombstone horizon.

Random add/delete streams (with and without client versions, metadata kept, replaced or
cleared) get consecutive offsets; captures happen at random points. A restore of the
base plus every delta must hold exactly the index's logical state at the last capture,
and compacting tombstones below a covered offset must change no later write's outcome.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lhv_index import (
    Clock,
    Delete,
    EngineKind,
    Index,
    IndexParams,
    Space,
    Upsert,
    Write,
    apply_delta,
    read_delta,
    read_snapshot,
    write_delta,
    write_snapshot,
)
from lhv_index.errors import InvalidRequest, SnapshotError

DIM = 4
IDS = [f"id-{i}" for i in range(10)]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# (op, id number, version, metadata choice, vector seed); metadata choice: 0 keep,
# 1 clear, 2+ replace
_write = st.tuples(
    st.sampled_from(["add", "add", "delete"]),
    st.integers(0, len(IDS) - 1),
    st.integers(0, 3),
    st.integers(0, 4),
    st.integers(0, 1000),
)
# records of one or a few writes; `capture` marks a checkpoint after the record
_record = st.tuples(st.lists(_write, min_size=1, max_size=3), st.booleans())


def _writes(
    record: list[tuple[str, int, int, int, int]], offset: int, versioned: bool
) -> list[Write]:
    out: list[Write] = []
    for pos, (op, n, version, meta, seed) in enumerate(record):
        clock = Clock(version if versioned else 0, offset, pos)
        if op == "delete":
            out.append(Delete(id=IDS[n], clock=clock))
        else:
            vec = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
            md: dict[str, Any] | None = None if meta == 0 else {} if meta == 1 else {"m": meta}
            out.append(Upsert(id=IDS[n], vector=vec, metadata=md, clock=clock))
    return out


def _apply(index: Index, writes: list[Write]) -> str:
    try:
        index.apply(writes)
    except InvalidRequest as exc:
        return f"refused: {exc}"
    return "ok"


@pytest.mark.parametrize("space", ["l2", "cosine"])
@SETTINGS
@given(records=st.lists(_record, min_size=1, max_size=25), versioned=st.booleans(), data=st.data())
def test_base_plus_deltas_equals_state_at_last_capture(
    space: str, records: list[tuple[list[Any], bool]], versioned: bool, data: st.DataObject
) -> None:
    index = Index("d", IndexParams(dim=DIM, space=Space(space)))
    base_at = data.draw(st.integers(0, len(records) - 1), label="base_at")
    base = io.BytesIO()
    deltas: list[bytes] = []
    for offset, (record, capture) in enumerate(records):
        if offset == base_at:  # the base restarts change tracking: deltas follow it
            write_snapshot(index, base, source={"offset": offset - 1})
            deltas = []  # restore starts from the newest base
            state, floor = index.logical_state(), index.version_floor
        _apply(index, _writes(record, offset, versioned))
        if data.draw(st.booleans(), label="compact"):
            index.compact_tombstones(data.draw(st.integers(0, offset + 1), label="before"))
        if capture:
            out = io.BytesIO()
            write_delta(index.capture_delta(), out, source={"offset": offset})
            deltas.append(out.getvalue())
            state, floor = index.logical_state(), index.version_floor
    restored, _ = read_snapshot(base.getvalue())
    for blob in deltas:
        apply_delta(restored, blob)
    assert restored.logical_state() == state
    assert restored.version_floor == floor
    # any delta applied again (the last one: earlier ones would roll back later changes)
    if deltas:
        assert apply_delta(restored, deltas[-1]) == 0
        assert restored.logical_state() == state


@SETTINGS
@given(records=st.lists(_record, min_size=1, max_size=20))
def test_applying_a_delta_twice_is_a_no_op(records: list[tuple[list[Any], bool]]) -> None:
    index = Index("d", IndexParams(dim=DIM, space=Space.COSINE))
    restored = Index("d", IndexParams(dim=DIM, space=Space.COSINE))
    for offset, (record, _) in enumerate(records):
        _apply(index, _writes(record, offset, versioned=True))
    delta = index.capture_delta()
    apply_delta(restored, delta)
    once = restored.logical_state()
    assert apply_delta(restored, delta) == 0
    assert restored.logical_state() == once == index.logical_state()


@SETTINGS
@given(
    history=st.lists(_record, min_size=1, max_size=20),
    future=st.lists(_record, min_size=1, max_size=20),
    data=st.data(),
)
def test_compacting_version_zero_tombstones_changes_no_later_write(
    history: list[tuple[list[Any], bool]], future: list[tuple[list[Any], bool]], data: st.DataObject
) -> None:
    twin = Index("c", IndexParams(dim=DIM))
    compacted = Index("c", IndexParams(dim=DIM))
    for offset, (record, _) in enumerate(history):
        for index in (twin, compacted):
            _apply(index, _writes(record, offset, versioned=False))
    # a checkpoint covers every offset so far: later records have higher offsets
    before = data.draw(st.integers(0, len(history)), label="before")
    compacted.compact_tombstones(before)
    assert compacted.version_floor == 0
    for n, (record, _) in enumerate(future):
        offset = len(history) + n
        writes = _writes(record, offset, versioned=False)
        assert _apply(compacted, writes) == _apply(twin, writes) == "ok"
        assert compacted.logical_state()["live"] == twin.logical_state()["live"]
    kept = compacted.logical_state()["tombstones"]
    assert all(twin.logical_state()["tombstones"][i] == c for i, c in kept.items())


@SETTINGS
@given(floor=st.integers(1, 50), version=st.integers(1, 60))
def test_versioned_write_for_unknown_id_is_refused_at_or_below_the_floor(
    floor: int, version: int
) -> None:
    index = Index("f", IndexParams(dim=DIM))
    index.apply([Delete(id="gone", clock=Clock(floor, 1, 0))])
    assert index.compact_tombstones(2) == 1
    assert index.stats()["version_floor"] == floor and index.stats()["deleted"] == 0
    write = Upsert(id="new", vector=[1.0, 0, 0, 0], metadata=None, clock=Clock(version, 5, 0))
    if version <= floor:
        with pytest.raises(InvalidRequest, match="older than the tombstone horizon") as err:
            index.apply([write])
        assert err.value.item == 0 and len(index) == 0
    else:
        assert index.apply([write]).applied == 1
    # version 0 for an unknown id is applied as before; stored ids compare clocks
    assert (
        index.apply(
            [Upsert(id="v0", vector=[0, 1.0, 0, 0], metadata=None, clock=Clock(0, 6, 0))]
        ).applied
        == 1
    )
    assert (
        index.apply(
            [Upsert(id="v0", vector=[0, 1.0, 0, 0], metadata=None, clock=Clock(1, 7, 0))]
        ).applied
        == 1
    )


@SETTINGS
@given(
    records=st.lists(_record, min_size=1, max_size=15),
    cut=st.integers(0, 10_000),
    flip=st.integers(0, 255),
)
def test_corrupted_or_truncated_delta_is_never_applied(
    records: list[tuple[list[Any], bool]], cut: int, flip: int
) -> None:
    index = Index("x", IndexParams(dim=DIM, space=Space.COSINE))
    for offset, (record, _) in enumerate(records):
        _apply(index, _writes(record, offset, versioned=True))
    out = io.BytesIO()
    write_delta(index.capture_delta(), out, source={"offset": 9})
    blob = out.getvalue()
    target = Index("x", IndexParams(dim=DIM, space=Space.COSINE))
    before = target.logical_state()
    truncated = blob[: cut % len(blob)]
    corrupted = bytearray(blob)
    corrupted[cut % len(blob)] ^= flip or 1
    for bad in (truncated, bytes(corrupted)):
        try:
            delta, _ = read_delta(bad)
        except SnapshotError:
            pass
        else:  # a flip inside the envelope that leaves it valid and the same (e.g. a space)
            assert bad is not truncated
            apply_delta(target, delta)
            assert target.logical_state() == index.logical_state()
            target = Index("x", IndexParams(dim=DIM, space=Space.COSINE))
            continue
        with pytest.raises(SnapshotError):
            apply_delta(target, bad)
        assert target.logical_state() == before


# per id in a round: 0 untouched, 1 new vector, 2 metadata only, 3 same vector scaled
# (under cosine the engine's vector is unchanged, its norm is not), 4 new vector and metadata
_rewrite = st.lists(st.integers(0, 4), min_size=len(IDS), max_size=len(IDS))


@pytest.mark.parametrize("engine", ["hnsw", "exact"])
@pytest.mark.parametrize("space", ["l2", "cosine"])
@SETTINGS
@given(rounds=st.lists(_rewrite, min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_deltas_rewriting_live_ids_restore_the_state_and_the_new_vectors(
    engine: str, space: str, rounds: list[list[int]], seed: int
) -> None:
    params = IndexParams(dim=DIM, space=Space(space), engine=EngineKind(engine))
    rng = np.random.default_rng(seed)
    vectors = {i: rng.normal(size=DIM).astype(np.float32) for i in IDS}
    index = Index("r", params)
    index.apply(
        [
            Upsert(id=i, vector=v, metadata={"r": 0}, clock=Clock(0, 0, 0))
            for i, v in vectors.items()
        ]
    )
    base = io.BytesIO()
    write_snapshot(index, base, source={"offset": 0})
    replaced: list[np.ndarray] = []
    deltas: list[bytes] = []
    for offset, choice in enumerate(rounds, start=1):
        writes: list[Write] = []
        for pos, (id_, what) in enumerate(zip(IDS, choice, strict=True)):
            if what == 0:
                continue
            vec = vectors[id_]
            if what in (1, 4):
                replaced.append(vec)
                vec = rng.normal(size=DIM).astype(np.float32)
            elif what == 3:
                vec = vec * np.float32(2.5)
                if space == "l2":
                    replaced.append(vectors[id_])
            vectors[id_] = vec
            md = {"r": offset} if what in (2, 4) else None
            writes.append(Upsert(id=id_, vector=vec, metadata=md, clock=Clock(0, offset, pos)))
        index.apply(writes)
        out = io.BytesIO()
        write_delta(index.capture_delta(), out, source={"offset": offset})
        deltas.append(out.getvalue())
    restored, _ = read_snapshot(base.getvalue())
    for blob in deltas:
        apply_delta(restored, blob)
    assert restored.logical_state() == index.logical_state()
    stats = restored.stats()
    assert stats["count"] == len(IDS) == stats["slots"] - stats["free_slots"]
    assert restored._engine.slots() == stats["slots"]
    # every id is found at its rewritten vector, and no replaced vector is found any more
    for id_, vec in vectors.items():
        hits = restored.search(vec, len(IDS))[0]
        assert any(h.id == id_ and h.distance < 1e-4 for h in hits)
    for vec in replaced:
        assert restored.search(vec, 1)[0][0].distance > 1e-4
    assert apply_delta(restored, deltas[-1]) == 0
