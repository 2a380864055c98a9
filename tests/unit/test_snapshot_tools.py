"""`lhv snapshot` reading the ids a snapshot declares."""

from __future__ import annotations

import io

import numpy as np

from lhv_index import Clock, Index, IndexParams, Upsert, read_frame, write_snapshot
from worker.ops.tools import envelope_ids


def _snapshot(idx: Index) -> bytes:
    buf = io.BytesIO()
    write_snapshot(idx, buf, source={"topic": "t", "partition": 0, "offset": 1})
    return buf.getvalue()


def test_the_ids_of_a_snapshot_are_read_in_order() -> None:
    idx = Index("docs", IndexParams(dim=4, space="l2", engine="exact"))
    vec = np.ones(4, dtype=np.float32)
    idx.apply([Upsert(i, vec, None, Clock(0, 1, n)) for n, i in enumerate(["b", "a", "é"])])
    data = _snapshot(idx)
    assert sorted(envelope_ids(data, read_frame(data))) == ["a", "b", "é"]


def test_an_empty_index_declares_no_ids() -> None:
    data = _snapshot(Index("empty", IndexParams(dim=4, space="l2", engine="exact")))
    assert envelope_ids(data, read_frame(data)) == []
