"""Synthetic data for the benchmarks: clustered vectors, like real embeddings.

Uniform random vectors make every ANN index look bad and every neighbour list look alike;
clusters (Gaussian blobs around random centres) give realistic recall and search cost.
Everything is deterministic in `seed`, and large sets can be made in chunks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["chunks", "clustered", "queries"]


def _centres(dim: int, n_clusters: int, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng([seed, 0])
    return rng.normal(size=(n_clusters, dim)).astype(np.float32)


def clustered(
    n: int,
    dim: int,
    n_clusters: int = 100,
    seed: int = 0,
    *,
    spread: float = 0.35,
    start: int = 0,
) -> npt.NDArray[np.float32]:
    """`n` float32 vectors of `dim` around `n_clusters` centres.

    Deterministic in all arguments; `start` names a piece of a larger set (see `chunks`),
    and every piece shares the same centres.
    """
    centres = _centres(dim, n_clusters, seed)
    rng = np.random.default_rng([seed, 1, start])
    assign = rng.integers(0, n_clusters, size=n)
    noise = rng.normal(scale=spread, size=(n, dim)).astype(np.float32)
    noise += centres[assign]
    return noise


def chunks(
    n: int, dim: int, n_clusters: int = 100, seed: int = 0, *, size: int = 50_000
) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    """`(start, vectors)` pieces of a clustered set of `n` vectors, `size` rows each."""
    for start in range(0, n, size):
        yield start, clustered(min(size, n - start), dim, n_clusters, seed, start=start)


def queries(n: int, dim: int, n_clusters: int = 100, seed: int = 0) -> npt.NDArray[np.float32]:
    """Query vectors from the same clusters as the data, but not in it."""
    return clustered(n, dim, n_clusters, seed, start=2**40)
