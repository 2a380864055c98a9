"""The id <-> label map (`LabelMap`): ids packed by label, looked up through `IdTable`."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

import lhv_index._packed as packed
from lhv_index._ids import LabelMap


def _check(m: LabelMap, want: dict[str, int]) -> None:
    assert len(m) == len(want)
    assert dict(m.labels.items()) == want
    for id_, label in want.items():
        assert m.labels[id_] == label and m.labels.get(id_) == label and id_ in m.labels
        assert m.ids.id(label) == id_ == m.ids.live_id(label)
    live = set(want.values())
    assert all(m.ids.id(lb) is None for lb in range(m.next_label) if lb not in live)
    assert sorted(m.free) == sorted(set(range(m.next_label)) - live)
    assert list(m.labels.values()) == sorted(live)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_binds_moves_and_releases_match_a_dict(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random writes (new ids on fresh and free labels, moves, deletes; ASCII and not,
    of every length) keep the map equal to a plain dict, through arena compactions and
    table growth."""
    monkeypatch.setattr(packed, "_COMPACT_MIN_BYTES", 64)
    rng = random.Random(seed)
    m, want = LabelMap(), {}
    names = [f"doc-{i}" for i in range(300)] + [f"é{i}-ключ-🙂" * (1 + i % 5) for i in range(300)]
    for _ in range(200):
        absent = [n for n in names if n not in want]
        new = rng.sample(absent, min(len(absent), rng.randint(0, 20)))
        labels, fresh = m.allocate(len(new))
        m.bind(new, labels, fresh)
        want.update(zip(new, labels, strict=True))
        present = list(want)
        moved = rng.sample(present, min(len(present), rng.randint(0, 5)))
        old, new_labels = m.move(moved)
        assert old == [want[i] for i in moved]
        want.update(zip(moved, new_labels, strict=True))
        gone = rng.sample(list(want), min(len(want), rng.randint(0, 15)))
        assert m.release(gone) == [want.pop(i) for i in gone]
        _check(m, want)
    assert "nope" not in m.labels and m.labels.get("\ud800") is None


def test_a_loaded_map_equals_the_one_it_was_saved_from() -> None:
    m = LabelMap()
    ids = [f"id-{i}" for i in range(1000)] + ["ü", "日本語"]
    labels, fresh = m.allocate(len(ids))
    m.bind(ids, labels, fresh)
    m.release(ids[10:500:7])
    live = m.ids.labels()
    lens, blob = m.ids.take(live)
    names = m.ids.strings(live)
    hashes = np.fromiter(map(hash, names), dtype=np.int64, count=len(names))
    loaded = LabelMap.load((names, lens, blob), live, m.next_label, hashes)
    assert dict(loaded.labels.items()) == dict(m.labels.items())
    assert sorted(loaded.free) == sorted(m.free) and loaded.next_label == m.next_label
    for id_, label in m.labels.items():
        assert loaded.ids.id(label) == id_


def test_ids_cost_their_bytes_not_an_object_each() -> None:
    """200 000 ids of 12 characters: the map costs well under the ~90 bytes an id that a
    list of str (about 70) and the int32 table took."""
    n = 200_000
    ids = [f"doc-{i:08d}" for i in range(n)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        m = LabelMap()
        for start in range(0, n, 10_000):
            part = ids[start : start + 10_000]
            labels, fresh = m.allocate(len(part))
            m.bind(part, labels, fresh)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(m) == n and m.labels["doc-00123456"] == 123_456
    assert held / n < 60  # 12 bytes, an offset, a length, table slots, growth headroom


@pytest.mark.parametrize("gather", [1 << 16, 100])
def test_packed_bytes_are_taken_back_in_any_order_after_churn(
    gather: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`take` of labels scattered over an arena rewritten many times (more runs than it
    copies one by one, so it gathers bytes, `gather` pieces at a time) gives each label's
    latest bytes, in the order asked."""
    monkeypatch.setattr(packed, "_GATHER_PIECES", gather)
    rng = random.Random(7)
    store, want = packed.PackedBytes(5000), {}
    for _ in range(20_000):
        label = rng.randrange(5000)
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 9)))
        store.set(label, blob)
        want[label] = blob
    labels = np.array(rng.sample(range(5000), 3000), dtype=np.intp)
    lens, blob = store.take(labels)
    expected = [want.get(lb, b"") for lb in labels.tolist()]
    assert lens.tolist() == [len(e) for e in expected]
    assert blob == b"".join(expected)
