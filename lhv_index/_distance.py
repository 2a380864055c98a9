"""Brute-force distances and top-k in numpy: the exact engine, filtered search, fallbacks.

Engines see two metrics only: `l2` (squared euclidean) and `ip` (`1 - dot`). Cosine is
`ip` over vectors the index normalized itself, so `1 - cos` for every engine.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from lhv_index._types import Labels, Vectors

__all__ = ["Metric", "TopK", "distances", "merge_topk", "topk"]

Metric: TypeAlias = Literal["l2", "ip"]
TopK: TypeAlias = tuple[Labels, npt.NDArray[np.float32]]
"""(labels uint64 (n, k), distances float32 (n, k)), rows sorted by distance"""


def distances(
    metric: Metric, queries: Vectors, vectors: Vectors | npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """Distances (n_queries, n_vectors), computed in float64 and returned as float32."""
    q = queries.astype(np.float64, copy=False)
    v = vectors.astype(np.float64, copy=False)
    dots = q @ v.T
    if metric == "ip":
        out = 1.0 - dots
    else:
        qq = np.einsum("ij,ij->i", q, q)
        vv = np.einsum("ij,ij->i", v, v)
        out = np.maximum(qq[:, None] + vv[None, :] - 2.0 * dots, 0.0)
    return out.astype(np.float32)


def topk(
    metric: Metric,
    queries: Vectors,
    vectors: Vectors | npt.NDArray[np.float64],
    labels: Labels,
    k: int,
) -> TopK:
    """The k nearest of `vectors` (named by `labels`) to each query; k <= len(labels).
    `vectors` may be float64 already (the annoy delta keeps them so, to convert once)."""
    n = queries.shape[0]
    if k <= 0 or labels.size == 0:
        return np.empty((n, 0), dtype=np.uint64), np.empty((n, 0), dtype=np.float32)
    d = distances(metric, queries, vectors)
    return _select(d, labels, k)


def _select(d: npt.NDArray[np.float32], labels: Labels, k: int) -> TopK:
    k = min(k, d.shape[1])
    if k < d.shape[1]:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(d.shape[1]), d.shape).copy()
    part_d = np.take_along_axis(d, part, axis=1)
    part_l = labels[part]
    # sort by (distance, label) so ties break the same way every time
    order = np.lexsort((part_l, part_d), axis=1)
    return np.take_along_axis(part_l, order, axis=1), np.take_along_axis(part_d, order, axis=1)


def merge_topk(a: TopK, b: TopK, k: int) -> TopK:
    """Merge two per-query top-k results (same number of rows) into one top-k."""
    labels = np.concatenate([a[0], b[0]], axis=1)
    dists = np.concatenate([a[1], b[1]], axis=1)
    if labels.shape[1] == 0:
        return labels, dists
    k = min(k, labels.shape[1])
    order = np.lexsort((labels, dists), axis=1)[:, :k]
    return np.take_along_axis(labels, order, axis=1), np.take_along_axis(dists, order, axis=1)
