"""`RecentVectors`: the newest vector of each label written since the last capture, what
`Index.capture_delta` copies instead of reading hnswlib back."""

from __future__ import annotations

import numpy as np

from lhv_index import Clock, Delete, Index, IndexParams, Space, Upsert
from lhv_index._recent import RecentVectors


def test_the_newest_vector_of_each_label_wins_and_forgotten_ones_are_not_found() -> None:
    recent = RecentVectors(2, max_bytes=3 * 2 * 4 * 2)  # three chunks of two 2-d vectors
    for k in range(4):
        recent.record(np.array([k, 10 + k % 2], dtype=np.uint64), np.full((2, 2), k, np.float32))
    # the first chunk is forgotten: label 0 is not found; 10 and 11 have their newest rows
    found, vectors = recent.take(np.array([11, 0, 3, 10, 99], dtype=np.uint64))
    assert found.tolist() == [True, False, True, True, False]
    assert vectors[:, 0].tolist() == [3.0, 3.0, 2.0]


def test_take_finds_the_newest_row_of_each_label_across_many_chunks() -> None:
    rng = np.random.default_rng(11)
    recent = RecentVectors(3, max_bytes=1 << 20)
    newest: dict[int, np.ndarray] = {}
    for _ in range(40):  # chunks of 1 to 30 rows, labels written again across chunks
        labels = rng.choice(200, size=int(rng.integers(1, 31)), replace=False).astype(np.uint64)
        vectors = rng.normal(size=(labels.size, 3)).astype(np.float32)
        recent.record(labels, vectors)
        newest.update(zip(labels.tolist(), vectors, strict=True))
    asked = rng.permutation(260).astype(np.uint64)  # some were never written
    found, vectors = recent.take(asked)
    assert found.tolist() == [int(lb) in newest for lb in asked]
    want = np.array([newest[int(lb)] for lb in asked[found]], dtype=np.float32)
    assert np.array_equal(vectors, want)


def test_a_delta_holds_the_vectors_the_engine_holds_across_rewrites_deletes_and_reuse() -> None:
    rng = np.random.default_rng(3)
    index = Index("r", IndexParams(dim=8, space=Space.COSINE))
    index.apply(
        [
            Upsert(id=f"i{k}", vector=rng.normal(size=8), metadata=None, clock=Clock(0, 1, k))
            for k in range(500)
        ]
    )
    index.capture_delta()
    for step in range(2, 6):  # rewrites, deletes, and new ids on freed labels
        index.apply(
            [
                Upsert(
                    id=f"i{k}", vector=rng.normal(size=8), metadata=None, clock=Clock(0, step, k)
                )
                for k in range(step * 20, step * 20 + 60)
            ]
            + [
                Delete(id=f"i{k}", clock=Clock(0, step, 1000 + k))
                for k in range(300 + step * 10, 310 + step * 10)
            ]
            + [
                Upsert(
                    id=f"n{step}-{k}",
                    vector=rng.normal(size=8),
                    metadata=None,
                    clock=Clock(0, step, 2000 + k),
                )
                for k in range(8)
            ]
        )
    delta = index.capture_delta()
    engine = index._engine
    labels = np.array([index._map.labels[i] for i in delta.ids], dtype=np.uint64)
    assert np.array_equal(delta.vectors, engine.get(labels))
    assert index.capture_delta().vectors.shape == (0, 8)  # nothing since
