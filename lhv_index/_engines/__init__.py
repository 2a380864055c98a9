"""Engines behind the `Engine` protocol: hnsw (hnswlib), annoy (annoy) and exact (numpy)."""

from __future__ import annotations

from lhv_index._distance import Metric
from lhv_index._engines.annoy import AnnoyEngine
from lhv_index._engines.base import Engine, ShortResult
from lhv_index._engines.deferred import DeferredEngine
from lhv_index._engines.exact import ExactEngine
from lhv_index._engines.hnsw import HnswEngine
from lhv_index._params import EngineKind, IndexParams, Space
from lhv_index.errors import InvalidRequest

__all__ = [
    "AnnoyEngine",
    "DeferredEngine",
    "Engine",
    "ExactEngine",
    "HnswEngine",
    "ShortResult",
    "make_engine",
    "metric_of",
]


def metric_of(space: Space) -> Metric:
    """The engine metric of a space: cosine is `ip` over normalized vectors."""
    return "l2" if space is Space.L2 else "ip"


def make_engine(params: IndexParams, capacity: int) -> Engine:
    """An empty engine for `params` with room for `capacity` labels."""
    metric = metric_of(params.space)
    if params.engine is EngineKind.HNSW:
        return HnswEngine(
            metric=metric,
            dim=params.dim,
            M=params.M,
            ef_construction=params.ef_construction,
            ef_search=params.ef_search,
            capacity=capacity,
        )
    if params.engine is EngineKind.EXACT:
        return ExactEngine(metric=metric, dim=params.dim, capacity=capacity)
    if params.engine is EngineKind.ANNOY:
        return AnnoyEngine(
            metric=metric,
            dim=params.dim,
            capacity=capacity,
            n_trees=params.n_trees,
            search_k=params.search_k,
            ef_search=params.ef_search,
            normalized=params.space is Space.COSINE,
        )
    raise InvalidRequest(f"engine {params.engine.value!r} is not available in this version")
