"""The annoy engine: a forest plus an exact delta and tombstones, rebuilt in the background."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest

import lhv_index._engines.annoy as annoy_mod
from lhv_index import (
    Clock,
    Delete,
    EngineKind,
    Index,
    IndexParams,
    Space,
    Upsert,
    read_snapshot,
    write_snapshot,
)
from lhv_index._engines import AnnoyEngine
from lhv_index.errors import SnapshotError

DIM = 8


@pytest.fixture(autouse=True)
def small_rebuilds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(annoy_mod, "REBUILD_MIN_CHANGES", 64)


def make(space: str = "cosine", engine: str = "annoy", **kw: object) -> Index:
    return Index("t", IndexParams(dim=DIM, space=Space(space), engine=EngineKind(engine), **kw))


def engine_of(idx: Index) -> AnnoyEngine:
    eng = idx._engine
    assert isinstance(eng, AnnoyEngine)
    return eng


def data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def upserts(X: np.ndarray, offset: int, first: int = 0, prefix: str = "id") -> list[Upsert]:
    return [
        Upsert(f"{prefix}{first + i}", X[i], {"g": (first + i) % 5}, Clock(0, offset, i))
        for i in range(len(X))
    ]


def pair(space: str = "cosine") -> tuple[Index, Index]:
    return make(space), make(space, "exact")


def both(indexes: tuple[Index, Index], writes: list) -> None:
    for idx in indexes:
        idx.apply(writes)


def assert_same_hits(a: Index, b: Index, Q: np.ndarray, k: int, ef: int = 2000) -> None:
    got, want = a.search(Q, k, ef=ef), b.search(Q, k)
    for g, w in zip(got, want, strict=True):
        assert [h.id for h in g] == [h.id for h in w]
        np.testing.assert_allclose(
            [h.distance for h in g], [h.distance for h in w], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("space", ["cosine", "l2", "ip"])
def test_forest_delta_and_tombstones_together_match_exact_search(space: str) -> None:
    idxs = pair(space)
    X = data(600)
    both(idxs, upserts(X, 0))
    eng = engine_of(idxs[0])
    eng.rebuild()
    assert eng.forest_size == 600 and eng.delta_size == 0
    # below the rebuild threshold: deletes and overwrites are tombstones over the forest,
    # new and rewritten items live in the delta
    both(idxs, [Delete(f"id{i}", Clock(0, 1, i)) for i in range(0, 40)])
    both(idxs, upserts(-X[40:50], 2, first=40))
    both(idxs, upserts(data(10, 1), 3, prefix="new"))
    assert eng.forest_size == 600 and eng.delta_size == 20
    Q = np.concatenate([X[:5], -X[40:45], data(10, 2)])
    assert_same_hits(idxs[0], idxs[1], Q, 10)
    assert {h.id for row in idxs[0].search(X[:40], 5) for h in row}.isdisjoint(
        {f"id{i}" for i in range(40)}
    )


def test_distances_from_the_forest_follow_the_index_convention() -> None:
    for space, q, expect in [
        ("cosine", [1.0, 0.0], 1 - 3 / 5),
        ("l2", [2.0, 2.0], 1.0 + 4.0),
        ("ip", [1.0, 0.0], 1 - 3.0),
    ]:
        idx = Index("t", IndexParams(dim=2, space=Space(space), engine=EngineKind.ANNOY))
        idx.apply([Upsert("a", np.array([3.0, 4.0], np.float32), None, Clock(0, 0, 0))])
        engine_of(idx).rebuild()
        assert engine_of(idx).forest_size == 1
        (hit,) = idx.search(np.array(q, np.float32), 1)[0]
        assert hit.distance == pytest.approx(expect, abs=1e-6)


def test_passing_the_rebuild_threshold_folds_the_delta_into_a_new_forest() -> None:
    idx = make()
    idx.apply(upserts(data(100), 0))
    eng = engine_of(idx)
    assert eng.join(30)
    assert eng.forest_size == 100 and eng.delta_size == 0
    idx.apply(upserts(data(30, 1), 1, prefix="b"))
    assert eng.delta_size == 30  # under the threshold: no rebuild
    idx.apply(upserts(data(40, 2), 2, prefix="c"))
    assert eng.join(30)
    assert eng.forest_size == 170 and eng.delta_size == 0


@pytest.fixture
def held_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Builds wait for the returned event before they start."""
    release = threading.Event()
    build = AnnoyEngine._build

    def held(self: AnnoyEngine, *args: object) -> object:
        assert release.wait(30)
        return build(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(AnnoyEngine, "_build", held)
    yield release
    release.set()


def test_queries_and_writes_during_a_rebuild_see_every_write(held_build: threading.Event) -> None:
    idxs = pair()
    X = data(300)
    both(idxs, upserts(X, 0))  # starts a build, held
    eng = engine_of(idxs[0])
    assert eng.forest_size == 0
    both(idxs, [Delete(f"id{i}", Clock(0, 1, i)) for i in range(10)])
    both(idxs, upserts(-X[10:20], 2, first=10))
    both(idxs, upserts(data(5, 1), 3, prefix="late"))
    Q = np.concatenate([X[:20], data(10, 2)])
    assert_same_hits(idxs[0], idxs[1], Q, 10)
    held_build.set()
    assert eng.join(30)
    # the forest was cut at the first write; the writes made while it was built are its
    # delta (rewritten and new items) and its tombstones (deleted ones)
    assert eng.forest_size == 300 and eng.delta_size == 15
    assert_same_hits(idxs[0], idxs[1], Q, 10)
    assert idxs[0].logical_state() == idxs[1].logical_state()


def test_concurrent_queries_across_forest_swaps_return_k_hits() -> None:
    idx = make()
    X = data(2000)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                hits = idx.search(rng.normal(size=(3, DIM)).astype(np.float32), 10)
                assert all(len(row) == min(10, len(idx)) for row in hits)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    try:
        for r in range(20):
            idx.apply(upserts(X[r * 100 : (r + 1) * 100], r, first=r * 100))
            idx.apply([Delete(f"id{r * 100 + i}", Clock(0, r, 100 + i)) for i in range(30)])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert engine_of(idx).join(30)
    assert len(idx) == 2000 - 20 * 30


def test_explicit_ef_widens_the_forest_search() -> None:
    idxs = make("l2", search_k=1), make("l2", "exact")
    X = data(1000)
    both(idxs, upserts(X, 0))
    engine_of(idxs[0]).rebuild()
    Q = data(20, 3)
    # search_k=1 barely looks at the forest; an explicit ef means n_trees * ef nodes
    assert_same_hits(idxs[0], idxs[1], Q, 5, ef=5000)


def test_failed_build_is_logged_and_queries_stay_exact(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(self: AnnoyEngine, *args: object) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(AnnoyEngine, "_build", boom)
    idxs = pair()
    with caplog.at_level(logging.ERROR, logger=annoy_mod.__name__):
        both(idxs, upserts(data(200), 0))
        assert engine_of(idxs[0]).join(30)
    assert any("failed to build" in r.getMessage() for r in caplog.records)
    assert engine_of(idxs[0]).forest_size == 0
    assert_same_hits(idxs[0], idxs[1], data(5, 1), 10)


# -- snapshots -------------------------------------------------------------------------------


def test_snapshot_keeps_forest_delta_and_tombstones() -> None:
    idx = make("l2")
    X = data(400)
    idx.apply(upserts(X, 0))
    engine_of(idx).rebuild()
    idx.apply([Delete(f"id{i}", Clock(0, 1, i)) for i in range(20)])
    idx.apply(upserts(data(10, 1), 2, prefix="new"))
    buf = io.BytesIO()
    write_snapshot(idx, buf, source={"offset": 2})
    back, source = read_snapshot(buf.getvalue(), expect=idx.params)
    assert source == {"offset": 2}
    eng = engine_of(back)
    assert (eng.forest_size, eng.delta_size) == (400, 10)
    assert back.logical_state() == idx.logical_state()
    Q = np.concatenate([X[:30], data(10, 2)])
    assert back.search(Q, 10) == idx.search(Q, 10)
    # and it keeps taking writes, rebuilding past the threshold
    back.apply(upserts(data(100, 3), 3, prefix="more"))
    assert eng.join(30)
    assert (eng.forest_size, eng.delta_size) == (490, 0)


def test_snapshot_whose_live_labels_are_not_all_served_is_rejected(tmp_path) -> None:
    idx = make()
    idx.apply(upserts(data(100), 0))
    engine_of(idx).rebuild()
    idx.apply(upserts(data(5, 1), 1, prefix="new"))
    path = str(tmp_path / "engine")
    state = engine_of(idx).dump(path)
    np.array([], dtype="<u8").tofile(f"{path}.delta")  # drop the delta
    live = np.arange(105, dtype=np.uint64)
    with pytest.raises(SnapshotError):
        AnnoyEngine.load(
            path,
            metric="ip",
            dim=DIM,
            slots=105,
            live=live,
            n_trees=16,
            search_k=-1,
            ef_search=64,
            normalized=True,
            state=state,
        )
