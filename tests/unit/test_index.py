"""Behaviour of `lhv_index.Index`: last-write-wins, metadata rules, validation, search."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from lhv_index import (
    ApplyResult,
    Clock,
    Delete,
    EngineKind,
    Index,
    IndexParams,
    Limits,
    MetadataJson,
    Space,
    Upsert,
)
from lhv_index._params import EF_MAX, ELEMENTS_HINT_MAX, M_MAX, N_TREES_MAX, SEARCH_K_MAX
from lhv_index.errors import DimMismatch, EngineError, InvalidRequest, TooLarge

DIM = 8


def vec(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def make(engine: str = "hnsw", space: str = "cosine", **kw: object) -> Index:
    return Index("t", IndexParams(dim=DIM, space=Space(space), engine=EngineKind(engine), **kw))


def up(id_: str, seed: int, meta: dict | None = None, v: int = 0, o: int = 0, p: int = 0):
    return Upsert(id=id_, vector=vec(seed), metadata=meta, clock=Clock(v, o, p))


def rm(id_: str, v: int = 0, o: int = 0, p: int = 0) -> Delete:
    return Delete(id=id_, clock=Clock(v, o, p))


@pytest.fixture(params=["hnsw", "exact", "annoy"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- last-write-wins ------------------------------------------------------------------------


def test_later_record_replaces_vector_and_metadata(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"x": 1}, o=1)])
    idx.apply([up("a", 2, {"x": 2}, o=2)])
    (item,) = idx.get(["a"])
    np.testing.assert_allclose(item.vector, vec(2), rtol=1e-6)
    assert item.metadata == {"x": 2}
    assert item.clock == Clock(0, 2, 0)


def test_older_add_after_delete_is_ignored(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, o=1)])
    idx.apply([rm("a", o=5)])
    res = idx.apply([up("a", 2, o=3)])
    assert res == ApplyResult(applied=0, skipped=1)
    assert idx.get(["a"]) == []
    assert idx.clock_of("a") == Clock(0, 5, 0)


def test_delete_of_unknown_id_leaves_tombstone_that_blocks_older_add(engine: str) -> None:
    idx = make(engine)
    idx.apply([rm("ghost", o=4)])
    idx.apply([up("ghost", 1, o=2)])
    assert len(idx) == 0
    assert idx.stats()["deleted"] == 1


def test_newer_add_after_delete_resurrects_with_fresh_metadata(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"x": 1}, o=1), rm("a", o=2)])
    idx.apply([up("a", 1, o=1)])
    assert len(idx) == 0
    idx.apply([rm("a", o=2), up("a", 3, None, o=3)])
    (item,) = idx.get(["a"])
    assert item.metadata is None
    assert idx.stats()["deleted"] == 0


def test_higher_client_version_wins_whatever_the_arrival_order(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"v": 5}, v=5, o=1)])
    res = idx.apply([up("a", 2, {"v": 3}, v=3, o=9)])
    assert res.applied == 0
    assert idx.get(["a"])[0].metadata == {"v": 5}
    idx.apply([rm("a", v=2, o=10)])
    assert len(idx) == 1


def test_reapplied_record_changes_nothing(engine: str) -> None:
    idx = make(engine)
    batch = [up("a", 1, {"x": 1}, o=1), up("b", 2, o=1, p=1), rm("c", o=1, p=2)]
    assert idx.apply(batch) == ApplyResult(3, 0)
    before = idx.logical_state()
    assert idx.apply(batch) == ApplyResult(0, 3)
    assert idx.logical_state() == before


def test_later_duplicate_in_one_record_wins(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"n": 1}, o=1, p=0), up("a", 2, {"n": 2}, o=1, p=1)])
    assert idx.get(["a"])[0].metadata == {"n": 2}
    np.testing.assert_allclose(idx.get(["a"])[0].vector, vec(2), rtol=1e-6)


def test_batch_keeps_winner_per_id_with_adds_and_deletes_mixed(engine: str) -> None:
    idx = make(engine)
    res = idx.apply([up("a", 1, o=1), rm("a", o=3), up("a", 2, o=2), up("b", 3, o=2), rm("b", o=1)])
    assert res == ApplyResult(applied=2, skipped=3)
    assert [i.id for i in idx.get(["a", "b"])] == ["b"]
    assert idx.clock_of("a") == Clock(0, 3, 0)


# -- metadata --------------------------------------------------------------------------------


def test_add_with_null_metadata_keeps_metadata(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"keep": True}, o=1)])
    idx.apply([up("a", 2, None, o=2)])
    item = idx.get(["a"])[0]
    assert item.metadata == {"keep": True}
    np.testing.assert_allclose(item.vector, vec(2), rtol=1e-6)


def test_add_with_empty_metadata_clears_it(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"x": 1}, o=1)])
    idx.apply([up("a", 1, {}, o=2)])
    assert idx.get(["a"])[0].metadata is None


def test_metadata_object_replaces_whole(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"x": 1, "y": 2}, o=1)])
    idx.apply([up("a", 1, {"z": 3}, o=2)])
    assert idx.get(["a"])[0].metadata == {"z": 3}


def test_metadata_given_as_its_json_is_stored_as_the_object_would_be(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"x": 1}, o=1), up("b", 2, {"x": 1}, o=1, p=1)])
    idx.apply([Upsert("a", vec(1), MetadataJson.of({"z": [3, {}]}), Clock(0, 2, 0))])
    idx.apply([Upsert("b", vec(2), MetadataJson(b"{}"), Clock(0, 2, 1))])  # clears, as {}
    a, b = idx.get(["a", "b"])
    assert a.metadata == {"z": [3, {}]} and b.metadata is None


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (Upsert("bad", np.ones(DIM + 1, np.float32), None, Clock(0, 0, 1)), DimMismatch),
        (Upsert("bad", np.full(DIM, np.nan, np.float32), None, Clock(0, 0, 1)), InvalidRequest),
        (Upsert("bad", np.full(DIM, np.inf, np.float32), None, Clock(0, 0, 1)), InvalidRequest),
        (Upsert("bad", np.zeros(DIM, np.float32), None, Clock(0, 0, 1)), InvalidRequest),
        (Upsert("", np.ones(DIM, np.float32), None, Clock(0, 0, 1)), InvalidRequest),
        (Upsert("bad", np.ones(DIM, np.float32), {"m": "x" * 200}, Clock(0, 0, 1)), InvalidRequest),
        (Upsert("bad", np.ones(DIM, np.float32), [1, 2], Clock(0, 0, 1)), InvalidRequest),  # type: ignore[arg-type]
        (
            Upsert("bad", np.ones(DIM, np.float32), MetadataJson(b"[1,2]"), Clock(0, 0, 1)),
            InvalidRequest,
        ),
        (
            Upsert(
                "bad", np.ones(DIM, np.float32), MetadataJson.of({"m": "x" * 200}), Clock(0, 0, 1)
            ),
            InvalidRequest,
        ),
        (Upsert("bad", np.ones(DIM, np.float32), None, Clock(0, 2**64, 1)), InvalidRequest),
        (Delete("x" * 65, Clock(0, 0, 1)), InvalidRequest),
    ],
)
def test_batch_with_one_bad_item_changes_nothing(engine: str, bad: object, error: type) -> None:
    idx = Index(
        "t",
        IndexParams(dim=DIM, engine=EngineKind(engine)),
        limits=Limits(max_id_bytes=64, max_metadata_bytes=100),
    )
    idx.apply([up("keep", 9, {"k": 1}, o=0)])
    before = idx.logical_state()
    batch = [up("new", 1, o=1), rm("keep", o=1, p=1), bad, up("other", 2, o=1, p=3)]
    with pytest.raises(error) as info:
        idx.apply(batch)  # type: ignore[list-item]
    assert info.value.item == 2
    assert "item 2" in info.value.message
    assert idx.logical_state() == before


def test_zero_vector_is_fine_outside_cosine() -> None:
    idx = make(space="l2")
    idx.apply([Upsert("z", np.zeros(DIM, np.float32), None, Clock(0, 0, 0))])
    assert idx.search(np.zeros(DIM, np.float32), 1)[0][0].id == "z"


def test_validate_names_the_item_without_applying() -> None:
    idx = make()
    with pytest.raises(DimMismatch) as info:
        idx.validate([up("a", 1), Upsert("b", [1.0, 2.0], None, Clock(0, 0, 1))])
    assert info.value.item == 1 and "'b'" in info.value.message
    assert len(idx) == 0


def test_oversize_batch_is_rejected() -> None:
    idx = Index("t", IndexParams(dim=DIM), limits=Limits(max_batch_items=2))
    with pytest.raises(InvalidRequest):
        idx.apply([up("a", 1), up("b", 2), up("c", 3)])


def test_params_round_trip_and_reject_unknown_keys() -> None:
    params = IndexParams(dim=4, space=Space.L2, M=8)
    assert IndexParams.from_dict(params.to_dict()) == params
    with pytest.raises(InvalidRequest):
        IndexParams.from_dict({"dim": 4, "bogus": 1})
    with pytest.raises(InvalidRequest):
        IndexParams.from_dict({"dim": 0})
    with pytest.raises(InvalidRequest):
        IndexParams.from_dict({"dim": 4, "space": "hamming"})


CREATE_SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "schemas" / "create.schema.json").read_text()
)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("dim", 1, 65_536),
        ("M", 2, M_MAX),
        ("ef_construction", 1, EF_MAX),
        ("ef_search", 1, EF_MAX),
        ("n_trees", 1, N_TREES_MAX),
        ("search_k", -1, SEARCH_K_MAX),
        ("max_elements_hint", 0, ELEMENTS_HINT_MAX),
    ],
)
def test_every_create_parameter_is_bounded_as_the_published_schema_says(
    name: str, low: int, high: int
) -> None:
    prop = CREATE_SCHEMA["properties"][name]
    assert prop["minimum"] == low and prop["maximum"] == high
    base = {"dim": 4}
    assert getattr(IndexParams.from_dict({**base, name: high}), name) == high
    for bad in (low - 1, high + 1, str(high), 2.5, True):
        with pytest.raises(InvalidRequest, match=f"{name} must be an integer in") as err:
            IndexParams.from_dict({**base, name: bad})
        assert err.value.code == "invalid_request"


def test_a_new_index_is_refused_a_capacity_hint_over_the_limit() -> None:
    limits = Limits(max_elements_hint=5_000)
    params = {"dim": 4, "max_elements_hint": 5_001}
    with pytest.raises(InvalidRequest, match="max_elements_hint 5001 is over the limit of 5000"):
        IndexParams.from_dict(params, limits=limits)
    with pytest.raises(InvalidRequest, match="max_elements_hint 5001 is over the limit of 5000"):
        Index("t", IndexParams.from_dict(params), limits=limits)
    with pytest.raises(InvalidRequest, match="over the limit of 1000000"):
        Index("t", IndexParams(dim=4, max_elements_hint=2**32))
    # parameters read back (a snapshot's) are not held to today's limits for new indexes
    assert IndexParams.from_dict(params).max_elements_hint == 5_001
    assert (
        Index("t", IndexParams(dim=4, max_elements_hint=5_000), limits=limits).stats()["capacity"]
        >= 5_000
    )


def test_a_capacity_hint_that_cannot_be_allocated_is_invalid_request() -> None:
    limits = Limits(max_elements_hint=ELEMENTS_HINT_MAX, max_dim=65_536)
    params = IndexParams(
        dim=65_536, space=Space.L2, engine=EngineKind.EXACT, max_elements_hint=ELEMENTS_HINT_MAX
    )
    with pytest.raises(InvalidRequest, match="cannot allocate"):  # 1 PiB: past any address space
        Index("t", params, limits=limits)


def test_a_rebuild_allocates_no_more_than_todays_hint_limit() -> None:
    old = Index("t", IndexParams(dim=DIM, max_elements_hint=50_000), limits=Limits())
    restored = Index._with_engine("t", old.params, Limits(max_elements_hint=2_000), old._engine)
    restored.apply([up(f"id{i}", i) for i in range(1_100)])
    restored.apply([rm(f"id{i}", o=1) for i in range(600)])  # past the rebuild threshold
    assert restored.stats()["capacity"] <= 2_000


# -- search ----------------------------------------------------------------------------------


def fill(idx: Index, n: int, seed: int = 0, meta=None) -> np.ndarray:
    X = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    idx.apply([Upsert(f"id{i}", X[i], meta(i) if meta else None, Clock(0, 0, i)) for i in range(n)])
    return X


def test_k_larger_than_live_count_returns_what_there_is(engine: str) -> None:
    idx = make(engine)
    X = fill(idx, 5)
    idx.apply([rm("id0", o=1)])
    hits = idx.search(X[:2], 50)
    assert [len(h) for h in hits] == [4, 4]
    assert make(engine).search(X[:1], 3) == [[]]


def test_search_after_heavy_deletes_never_crashes(engine: str) -> None:
    idx = make(engine)
    X = fill(idx, 600)
    idx.apply([rm(f"id{i}", o=1, p=i) for i in range(590)])
    hits = idx.search(X[:20], 10)
    assert all(len(h) == 10 for h in hits)
    assert {h.id for h in hits[0]} == {f"id{i}" for i in range(590, 600)}


@pytest.mark.parametrize("space", ["cosine", "l2", "ip"])
def test_hnsw_matches_exact_top_k_on_small_index(space: str) -> None:
    a, b = make("hnsw", space), make("exact", space)
    X = fill(a, 500, seed=3)
    fill(b, 500, seed=3)
    Q = np.random.default_rng(4).normal(size=(20, DIM)).astype(np.float32)
    ha, hb = a.search(Q, 10, ef=200), b.search(Q, 10)
    recall = np.mean(
        [len({h.id for h in x} & {h.id for h in y}) / 10 for x, y in zip(ha, hb, strict=True)]
    )
    assert recall >= 0.98
    for x, y in zip(ha, hb, strict=True):
        np.testing.assert_allclose(
            [h.distance for h in x[:3]], [h.distance for h in y[:3]], rtol=1e-3, atol=1e-4
        )
    del X


def test_distances_follow_one_convention(engine: str) -> None:
    for space, expect in [
        ("cosine", 1 - 0.6),
        ("l2", 1.0 + 4.0),
        ("ip", 1 - (3.0 * 1.0 + 4.0 * 0)),
    ]:
        idx = Index("t", IndexParams(dim=2, space=Space(space), engine=EngineKind(engine)))
        idx.apply([Upsert("a", np.array([3.0, 4.0], np.float32), None, Clock(0, 0, 0))])
        q = np.array([1.0, 0.0], np.float32) if space != "l2" else np.array([2.0, 2.0], np.float32)
        (hit,) = idx.search(q, 1)[0]
        assert hit.distance == pytest.approx(expect if space != "cosine" else 1 - 3 / 5, abs=1e-5)


def test_filter_matching_one_percent_returns_k_hits(engine: str) -> None:
    idx = make(engine)
    X = fill(idx, 3000, meta=lambda i: {"group": i % 100, "even": i % 2 == 0})
    hits = idx.search(X[:5], 10, filter={"group": 7}, include_metadata=True)
    for row in hits:
        assert len(row) == 10
        assert all(h.metadata is not None and h.metadata["group"] == 7 for h in row)
    exact = make("exact")
    fill(exact, 3000, meta=lambda i: {"group": i % 100, "even": i % 2 == 0})
    want = exact.search(X[:5], 10, filter={"group": 7})
    assert [[h.id for h in r] for r in hits] == [[h.id for h in r] for r in want]


def test_filter_distinguishes_bool_from_number_and_needs_every_field() -> None:
    idx = make("exact")
    fill(idx, 4, meta=lambda i: [{"f": 1}, {"f": True}, {"f": 1.0, "g": "x"}, {"g": "x"}][i])
    q = vec(0)
    assert sorted(h.id for h in idx.search(q, 10, filter={"f": 1})[0]) == ["id0", "id2"]
    assert [h.id for h in idx.search(q, 10, filter={"f": True})[0]] == ["id1"]
    assert [h.id for h in idx.search(q, 10, filter={"f": 1, "g": "x"})[0]] == ["id2"]
    assert idx.search(q, 10, filter={"nope": 1}) == [[]]


def test_unselective_filter_on_large_hnsw_index_returns_k_hits() -> None:
    import lhv_index._index as mod

    idx = make()
    X = fill(idx, 4000, meta=lambda i: {"g": i % 10})
    old = mod.FILTER_BRUTE_MAX
    mod.FILTER_BRUTE_MAX = 10  # force the over-fetch path
    try:
        hits = idx.search(X[:10], 20, filter={"g": 3})
    finally:
        mod.FILTER_BRUTE_MAX = old
    assert all(len(r) == 20 for r in hits)
    assert all(int(h.id[2:]) % 10 == 3 for r in hits for h in r)


def test_filtered_results_follow_writes() -> None:
    idx = make()
    X = fill(idx, 50, meta=lambda i: {"g": i % 5})
    assert len(idx.search(X[0], 50, filter={"g": 0})[0]) == 10
    idx.apply([up("id1", 1, {"g": 0}, o=1)])
    assert len(idx.search(X[0], 50, filter={"g": 0})[0]) == 11


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"k": 10_001},
        {"k": 5, "ef": 0},
        {"k": 5, "ef": EF_MAX + 1},
        {"k": 5, "filter": ["x"]},
    ],
)
def test_bad_search_arguments_are_invalid_requests(kwargs: dict) -> None:
    idx = make()
    fill(idx, 5)
    with pytest.raises(InvalidRequest):
        idx.search(vec(0), **kwargs)


def test_bad_query_vectors_are_rejected() -> None:
    idx = make()
    fill(idx, 5)
    with pytest.raises(DimMismatch):
        idx.search(np.ones(DIM + 1, np.float32), 1)
    with pytest.raises(InvalidRequest):
        idx.search(np.full(DIM, np.nan, np.float32), 1)
    with pytest.raises(InvalidRequest):
        idx.search(np.zeros(DIM, np.float32), 1)


# -- reads -----------------------------------------------------------------------------------


def test_get_returns_copies_of_live_items_in_order_asked(engine: str) -> None:
    idx = make(engine)
    fill(idx, 5, meta=lambda i: {"i": i})
    idx.apply([rm("id2", o=1)])
    items = idx.get(["id3", "missing", "id2", "id0"])
    assert [i.id for i in items] == ["id3", "id0"]
    items[0].vector[:] = 0  # type: ignore[index]
    assert idx.get(["id3"])[0].vector.any()  # type: ignore[union-attr]
    bare = idx.get(["id3"], include_vectors=False, include_metadata=False)[0]
    assert bare.vector is None and bare.metadata is None


def test_cosine_get_returns_vector_as_given() -> None:
    idx = make()
    v = np.array([30.0, -4.0, 0.5, 0, 0, 0, 0, 1e-3], np.float32)
    idx.apply([Upsert("a", v, None, Clock(0, 0, 0))])
    np.testing.assert_allclose(idx.get(["a"])[0].vector, v, rtol=1e-6)


def test_stats_counts_live_and_tombstones(engine: str) -> None:
    idx = make(engine)
    fill(idx, 10)
    idx.apply([rm("id1", o=1), rm("id2", o=1, p=1), rm("never", o=1, p=2)])
    st = idx.stats()
    assert (st["count"], st["deleted"], st["dim"], st["space"], st["engine"]) == (
        8,
        3,
        DIM,
        "cosine",
        engine,
    )
    assert st["params"] == idx.params.to_dict()
    assert len(idx) == 8


def test_live_items_yields_every_live_item(engine: str) -> None:
    idx = make(engine)
    fill(idx, 30, meta=lambda i: {"i": i})
    idx.apply([rm("id4", o=1)])
    items = {i.id: i for i in idx.live_items()}
    assert len(items) == 29 and items["id5"].metadata == {"i": 5}
    assert items["id5"].clock == Clock(0, 0, 5)


# -- slots and capacity ----------------------------------------------------------------------


def test_deleted_slots_are_reused_by_new_ids(engine: str) -> None:
    idx = make(engine)
    fill(idx, 100)
    for round_ in range(1, 20):
        idx.apply([rm(f"id{i}", o=round_, p=i) for i in range(10)])
        idx.apply([up(f"id{i}", 1000 + round_ * 10 + i, o=round_, p=100 + i) for i in range(10)])
    st = idx.stats()
    assert st["count"] == 100 and st["slots"] <= 110


def test_churned_index_is_compacted_and_still_correct(engine: str) -> None:
    idx = make(engine)
    X = fill(idx, 3000)
    idx.apply([rm(f"id{i}", o=1, p=i) for i in range(0, 3000, 2)])
    st = idx.stats()
    assert st["count"] == 1500 and st["slots"] == 1500
    hits = idx.search(X[1], 1)[0]
    assert hits[0].id == "id1"
    np.testing.assert_allclose(idx.get(["id2999"])[0].vector, X[2999], rtol=1e-6)
    idx.apply([up("id0", 5, o=2)])
    assert len(idx) == 1501 and idx.clock_of("id2") == Clock(0, 1, 2)


def test_capacity_grows_past_hint_in_one_batch() -> None:
    idx = Index("t", IndexParams(dim=DIM, max_elements_hint=10))
    fill(idx, 5000)
    assert len(idx) == 5000 and idx.stats()["capacity"] >= 5000


@pytest.mark.parametrize("n", [1, 512])
def test_engine_failure_makes_index_refuse_use(n: int) -> None:
    idx = make()
    fill(idx, 10)

    def boom(*_: object) -> None:
        raise RuntimeError("simulated")

    idx._engine.add = boom  # type: ignore[method-assign]
    with pytest.raises(EngineError, match="simulated"):
        idx.apply([up(f"n{i}", i, o=1, p=i) for i in range(n)])
    with pytest.raises(EngineError):
        idx.search(vec(0), 1)


def test_a_large_batch_of_upserts_updates_and_deletes_leaves_what_one_by_one_would() -> None:
    n = 1024
    batched, single = make(), make()
    first = [up(f"id{i}", i, o=1, p=i) for i in range(n)]
    second = [
        up(f"id{i}", i + 1, o=2, p=i) if i % 3 else rm(f"id{i}", o=2, p=i) for i in range(n)
    ] + [up(f"new{i}", 10 * n + i, o=2, p=n + i) for i in range(n)]
    for writes in (first, second):
        batched.apply(writes)
        for w in writes:
            single.apply([w])
    assert len(batched) == len(single) == n - len(range(0, n, 3)) + n
    ids = [f"id{i}" for i in range(n)] + [f"new{i}" for i in range(n)]
    for a, b in zip(batched.get(ids), single.get(ids), strict=True):
        assert a.id == b.id
        np.testing.assert_array_equal(a.vector, b.vector)
    for i in (1, 2, n - 1):
        assert batched.search(vec(i + 1), 1)[0][0].id == single.search(vec(i + 1), 1)[0][0].id


def test_every_engine_kind_makes_an_index() -> None:
    for kind in EngineKind:
        assert Index("t", IndexParams(dim=DIM, engine=kind)).stats()["engine"] == kind.value


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_search_and_apply_from_threads_do_not_crash(engine: str) -> None:
    idx = make(engine)
    X = fill(idx, 500)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = rng.normal(size=(4, DIM)).astype(np.float32)
                idx.search(q, 10, ef=int(rng.integers(10, 100)))
                idx.search(q[0], 5, filter={"g": 1})
                idx.get(["id1", "id7"])
                idx.stats()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for r in range(1, 40):
            batch = [Upsert(f"n{r}-{i}", X[i], {"g": i % 3}, Clock(0, r, i)) for i in range(100)]
            batch += [Delete(f"n{r - 1}-{i}", Clock(0, r, 100 + i)) for i in range(50)]
            idx.apply(batch)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(idx) == 500 + 39 * 100 - 38 * 50


def test_null_metadata_in_one_batch_keeps_metadata_of_earlier_write(engine: str) -> None:
    idx = make(engine)
    idx.apply([up("a", 1, {"x": 1}, o=1), up("a", 2, None, o=2)])
    assert idx.get(["a"])[0].metadata == {"x": 1}
    idx.apply([rm("a", o=3), up("a", 3, None, o=4)])
    assert idx.get(["a"])[0].metadata is None


def test_batch_equals_one_by_one_when_versions_arrive_out_of_order(engine: str) -> None:
    writes = [
        up("a", 1, {"s": 1}, v=1, o=1),
        up("a", 2, None, v=5, o=2),
        up("a", 3, {"s": 3}, v=3, o=3),
        rm("b", v=2, o=4),
        up("b", 4, {"b": 1}, v=1, o=5),
    ]
    one, many = make(engine), make(engine)
    one.apply(writes)
    for w in writes:
        many.apply([w])
    assert one.logical_state() == many.logical_state()
    assert one.get(["a"])[0].metadata == {"s": 1}


def test_metadata_churn_keeps_latest_values(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lhv_index._packed as packed

    idx = make(engine)
    fill(idx, 200, meta=lambda i: {"i": i})
    monkeypatch.setattr(packed, "_COMPACT_MIN_BYTES", 100)  # compact the arenas often
    for r in range(1, 30):
        idx.apply(
            [
                up(f"id{i}", i, {"i": i, "r": r, "pad": "x" * (r % 7)}, o=r, p=i)
                for i in range(0, 200, 3)
            ]
        )
        idx.apply([up(f"id{i}", i, {}, o=r, p=1000 + i) for i in range(1, 200, 5)])
    items = {i.id: i.metadata for i in idx.live_items()}
    assert items["id0"] == {"i": 0, "r": 29, "pad": "x" * (29 % 7)}
    assert items["id1"] is None and items["id2"] == {"i": 2}
    expect = set(range(0, 200, 3)) - set(range(1, 200, 5))
    assert {h.id for h in idx.search(vec(0), 100, filter={"r": 29})[0]} == {
        f"id{i}" for i in expect
    }


def test_many_ids_survive_id_table_growth_and_deletes() -> None:
    idx = make("exact")
    n = 5000
    fill(idx, n)
    idx.apply([rm(f"id{i}", o=1, p=i) for i in range(0, n, 2)])
    assert len(idx) == n // 2
    assert [i.id for i in idx.get([f"id{i}" for i in range(6)])] == ["id1", "id3", "id5"]
    idx.apply([up(f"id{i}", i, o=2, p=i) for i in range(0, n, 4)])
    assert len(idx) == n // 2 + n // 4
    assert idx.clock_of("id4") == Clock(0, 2, 4) and idx.clock_of("id2") == Clock(0, 1, 2)


def test_metadata_json_reads_stored_metadata_as_its_json_in_the_order_asked() -> None:
    idx = make()
    idx.apply([up("a", 1, {"lang": "en", "n": [1, 2]}), up("b", 2), up("c", 3, {"x": None})])
    got = idx.metadata_json(["c", "nope", "b", "a", 7])  # type: ignore[list-item]
    assert [None if m is None else json.loads(m.json) for m in got] == [
        {"x": None},
        None,  # not live
        None,  # no metadata
        {"lang": "en", "n": [1, 2]},
        None,  # not an id
    ]
    assert all(m is None or isinstance(m, MetadataJson) for m in got)


def test_metadata_json_over_max_bytes_is_refused_with_its_size_before_any_copy() -> None:
    idx = make()
    meta = {"t": "x" * 1000}  # 1008 bytes as compact JSON
    idx.apply([up(f"i{n}", n, meta) for n in range(10)])
    assert len(idx.metadata_json([f"i{n}" for n in range(10)], max_bytes=10_080)) == 10
    with pytest.raises(TooLarge) as err:
        idx.metadata_json([f"i{n}" for n in range(10)], max_bytes=10_079)
    assert (err.value.size, err.value.limit) == (10_080, 10_079)
    assert err.value.code == "invalid_request" and "10080 bytes" in err.value.message
