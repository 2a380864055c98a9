"""Deferred inserts (`Index.defer_inserts` / `settle`): what a restore relies on while its
delta segments and replayed tail are searchable before they are inserted into HNSW."""

from __future__ import annotations

import io
import tracemalloc

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
from lhv_index._engines import deferred as deferred_engine

DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _upserts(ids: range, vecs: np.ndarray, offset: int) -> list[Upsert]:
    return [
        Upsert(
            id=f"i{k}", vector=vecs[n], metadata={"k": k, "o": offset}, clock=Clock(0, offset, n)
        )
        for n, k in enumerate(ids)
    ]


def _writes(step: int) -> list[Upsert | Delete]:
    """Round `step` of a workload: new ids, rewritten ids and deletes (of base ids, of ids
    written in earlier rounds, and of unknown ids)."""
    offset = 10 + step
    new = _upserts(range(2000 + 300 * step, 2300 + 300 * step), _vectors(300, 100 + step), offset)
    rewritten = _upserts(range(step * 97, step * 97 + 150), _vectors(150, 200 + step), offset)
    deletes: list[Upsert | Delete] = [
        Delete(id=f"i{k}", clock=Clock(0, offset, 10_000 + k))
        for k in [*range(1500 + step * 40, 1540 + step * 40), 2000 + 300 * (step - 1), 999_999]
    ]
    return [*new, *rewritten, *deletes]


@pytest.fixture(autouse=True, params=["one block", "small blocks"])
def _blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with the buffer in one block and in blocks of 64 rows, so that
    adds, rewrites, deletes and settles cross block boundaries."""
    if request.param == "small blocks":
        monkeypatch.setattr(deferred_engine, "BLOCK_BYTES", 64 * 4 * DIM)


def _index(space: Space) -> Index:
    index = Index("d", IndexParams(dim=DIM, space=space, ef_search=200))
    index.apply(_upserts(range(2000), _vectors(2000, 1), 1))
    return index


@pytest.mark.parametrize("space", [Space.COSINE, Space.L2, Space.IP])
def test_deferred_writes_give_the_same_state_before_and_after_settling(space: Space) -> None:
    plain, deferred = _index(space), _index(space)
    deferred.defer_inserts()
    for step in range(1, 5):
        plain.apply(_writes(step))
        deferred.apply(_writes(step))
    assert deferred.pending_inserts > 0
    assert deferred.logical_state() == plain.logical_state()
    deferred.defer_inserts(False)
    deferred.apply(_writes(5))  # straight to the engine, some over buffered ids
    plain.apply(_writes(5))
    assert deferred.logical_state() == plain.logical_state()
    while deferred.settle(333):
        pass
    assert deferred.pending_inserts == 0 and deferred.stats()["pending_inserts"] == 0
    assert deferred.logical_state() == plain.logical_state()


@pytest.mark.parametrize("space", [Space.COSINE, Space.L2])
def test_searches_see_deferred_items_and_never_their_old_vectors(space: Space) -> None:
    index = _index(space)
    exact = Index("e", IndexParams(dim=DIM, space=space, engine=EngineKind.EXACT))
    exact.apply(_upserts(range(2000), _vectors(2000, 1), 1))
    index.defer_inserts()
    for step in range(1, 4):
        index.apply(_writes(step))
        exact.apply(_writes(step))
    assert index.pending_inserts > 0
    queries = _vectors(50, 7)
    for settle in (False, True):
        if settle:
            index.defer_inserts(False)
            index.settle(400)  # part of the buffer moved into the engine
            assert index.pending_inserts > 0
        got = index.search(queries, 10)
        want = exact.search(queries, 10)
        recall = np.mean(
            [
                len({h.id for h in g} & {h.id for h in w}) / 10
                for g, w in zip(got, want, strict=True)
            ]
        )
        assert recall >= 0.95
        live = exact.logical_state()["live"]
        for hits in got:
            assert len({h.id for h in hits}) == len(hits) == 10
            assert all(h.id in live for h in hits)
    # a buffered item (new or rewritten) is its own nearest neighbour, with its new vector
    rewritten = _vectors(150, 203)
    for n in (0, 75, 149):
        hit = index.search(rewritten[n], 1, include_metadata=True)[0][0]
        assert hit.id == f"i{3 * 97 + n}" and hit.metadata == {"k": 3 * 97 + n, "o": 13}


def test_a_base_captured_while_inserts_are_deferred_holds_them_all() -> None:
    index = _index(Space.COSINE)
    index.defer_inserts()
    index.apply(_writes(1))
    want = index.logical_state()
    out = io.BytesIO()
    write_snapshot(index, out, source={})
    assert index.pending_inserts == 0  # the capture inserted them first
    restored, _ = read_snapshot(out.getvalue())
    assert restored.logical_state() == want


@pytest.mark.parametrize("path", ["writes", "deltas"])
def test_a_base_after_deferred_items_left_the_buffer_unsettled_restores(path: str) -> None:
    """A restore's replay (writes) or delta chain (deltas) adds ids on fresh labels while
    inserts are deferred, then deletes some of them, or rewrites them (a delta moves a
    rewritten id to a fresh label), before they were settled. Their labels were handed
    out, so the engine must hold them, deleted: a base captured then once lacked them,
    its engine short of its envelope's slots, and could not be read back."""
    source = Index("d", IndexParams(dim=DIM, space=Space.L2))
    source.apply(_upserts(range(200), _vectors(200, 1), 1))
    index = Index("d", IndexParams(dim=DIM, space=Space.L2))
    index.apply(_upserts(range(200), _vectors(200, 1), 1))
    index.defer_inserts()
    source.capture_delta()  # deltas from here on
    rounds: list[list[Upsert | Delete]] = [
        _upserts(range(200, 260), _vectors(60, 2), 2),  # fresh labels 200..259, buffered
        [Delete(id=f"i{k}", clock=Clock(0, 3, k)) for k in range(240, 250)],
        _upserts(range(250, 260), _vectors(10, 4), 4),  # rewritten while buffered
    ]
    for writes in rounds:
        source.apply(writes)
        if path == "writes":
            index.apply(writes)
        else:
            apply_delta(index, source.capture_delta())
    assert index.pending_inserts > 0
    want = source.logical_state()
    assert index.logical_state() == want
    restored, _ = read_snapshot(_snapshot(index))
    assert restored.logical_state() == want
    index.defer_inserts(False)
    more = _upserts(range(300, 320), _vectors(20, 5), 5)  # the freed labels are reused
    for target in (index, restored, source):
        target.apply(more)
    again, _ = read_snapshot(_snapshot(index))
    assert again.logical_state() == restored.logical_state() == source.logical_state()


def _snapshot(index: Index) -> bytes:
    out = io.BytesIO()
    write_snapshot(index, out, source={})
    return out.getvalue()


def test_deltas_applied_while_deferred_restore_the_same_state() -> None:
    source = _index(Space.COSINE)
    base = io.BytesIO()
    write_snapshot(source, base, source={})
    deltas = []
    for step in range(1, 4):
        source.apply(_writes(step))
        out = io.BytesIO()
        write_delta(source.capture_delta(), out, source={})
        deltas.append(out.getvalue())
    restored, _ = read_snapshot(base.getvalue())
    restored.defer_inserts()
    for blob in deltas:
        apply_delta(restored, read_delta(blob)[0])
    assert restored.pending_inserts > 0
    assert restored.logical_state() == source.logical_state()
    restored.defer_inserts(False)
    while restored.settle(500):
        pass
    assert restored.logical_state() == source.logical_state()
    q = _vectors(20, 9)
    got, want = restored.search(q, 5), source.search(q, 5)
    same = [len({h.id for h in g} & {h.id for h in w}) for g, w in zip(got, want, strict=True)]
    assert sum(same) >= 0.95 * 5 * len(q)


def test_items_settled_while_deferring_are_hidden_when_written_again() -> None:
    # new ids are buffered, part of them inserted while deferral is still on, then
    # rewritten (buffered again): the engine's copy must never answer beside the new one
    plain, index = _index(Space.L2), _index(Space.L2)
    index.defer_inserts()
    first = _upserts(range(5000, 5600), _vectors(600, 50), 20)
    again = _upserts(range(5000, 5600), _vectors(600, 51), 21)
    for target in (plain, index):
        target.apply(first)
    assert index.settle(400) == 200  # 400 of them in the engine now, deferral still on
    for target in (plain, index):
        target.apply(again)
    assert index.logical_state() == plain.logical_state()
    newer = _vectors(600, 51)
    for n in (0, 150, 599):
        hits = index.search(newer[n], 5)[0]
        assert hits[0].id == f"i{5000 + n}"
        assert len({h.id for h in hits}) == 5
    old = _vectors(600, 50)
    for n in (0, 150, 599):  # the first vectors are gone from every answer
        hit = index.search(old[n], 1)[0][0]
        assert hit.id != f"i{5000 + n}" or hit.distance > 1e-3


def test_the_buffer_gives_its_memory_back_as_it_settles(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore's buffer shrinks while it is inserted (so the engine's growth and the
    buffer never peak together): half settled, about half its memory is gone."""
    monkeypatch.setattr(deferred_engine, "BLOCK_BYTES", 256 * 4 * DIM)
    index = _index(Space.L2)
    index.defer_inserts()
    vecs = _vectors(20_000, 5)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index.apply(_upserts(range(10_000, 30_000), vecs, 2))
        held = tracemalloc.get_traced_memory()[0] - before
        index.defer_inserts(False)
        engine_before = tracemalloc.get_traced_memory()[0]
        index.settle(10_000)
        assert index.pending_inserts == 10_000
        half = tracemalloc.get_traced_memory()[0]
        while index.settle(1000):
            pass
        done = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    vector_bytes = vecs.nbytes
    assert held >= vector_bytes  # the buffer held the vectors ...
    # ... and settling half of them freed about half (hnswlib's own memory is not traced)
    assert engine_before - half >= 0.4 * vector_bytes
    assert engine_before - done >= 0.9 * vector_bytes
    assert index.logical_state()["live"].keys() >= {f"i{k}" for k in range(10_000, 30_000)}
