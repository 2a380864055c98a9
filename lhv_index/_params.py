"""Index parameters and library limits: frozen, validated, with their defaults in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from lhv_index.errors import InvalidRequest

__all__ = ["EngineKind", "IndexParams", "Limits", "Space"]


class Space(StrEnum):
    """Distance space. Distances: cosine `1 - cos`, l2 squared euclidean, ip `1 - dot`."""

    COSINE = "cosine"
    L2 = "l2"
    IP = "ip"


class EngineKind(StrEnum):
    """The engine behind an index: `hnsw` (hnswlib, default), `exact` (numpy), `annoy`."""

    HNSW = "hnsw"
    EXACT = "exact"
    ANNOY = "annoy"


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexParams:
    """Parameters fixed at `create`; `to_dict()` is their JSON form (snapshots, `create`)."""

    dim: int
    space: Space = Space.COSINE
    engine: EngineKind = EngineKind.HNSW
    M: int = 16
    """hnsw: graph degree"""
    ef_construction: int = 200
    """hnsw: candidate list size while building"""
    ef_search: int = 64
    """hnsw: default candidate list size while searching (a query may pass its own `ef`)"""
    n_trees: int = 16
    """annoy: number of trees"""
    search_k: int = -1
    """annoy: nodes inspected per query (-1: n_trees * k)"""
    max_elements_hint: int = 0
    """initial capacity in items; the index grows past it by itself"""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "space", Space(self.space))
        except ValueError:
            raise InvalidRequest(
                f"space must be one of {[s.value for s in Space]}, got {self.space!r}"
            ) from None
        try:
            object.__setattr__(self, "engine", EngineKind(self.engine))
        except ValueError:
            raise InvalidRequest(
                f"engine must be one of {[e.value for e in EngineKind]}, got {self.engine!r}"
            ) from None
        _check_int("dim", self.dim, 1, 65_536)
        _check_int("M", self.M, 2, 2048)
        _check_int("ef_construction", self.ef_construction, 1, 1_000_000)
        _check_int("ef_search", self.ef_search, 1, 1_000_000)
        _check_int("n_trees", self.n_trees, 1, 100_000)
        _check_int("search_k", self.search_k, -1, 2**62)
        _check_int("max_elements_hint", self.max_elements_hint, 0, 2**32)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexParams:
        """Build from the JSON form; unknown keys and bad values raise `InvalidRequest`."""
        if not isinstance(data, dict):
            raise InvalidRequest(f"index params must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown index parameters: {unknown}")
        if "dim" not in data:
            raise InvalidRequest("index params need 'dim'")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidRequest(f"bad index params: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: plain str/int values, every field present."""
        out = asdict(self)
        out["space"] = self.space.value
        out["engine"] = self.engine.value
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-index limits checked by `Index.validate` and `Index.search`."""

    max_dim: int = 4096
    max_id_bytes: int = 512
    """UTF-8 bytes of one id"""
    max_metadata_bytes: int = 65_536
    """bytes of one item's metadata serialized as compact JSON"""
    max_batch_items: int = 100_000
    """writes in one `apply`"""
    max_k: int = 10_000

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_int(f.name, getattr(self, f.name), 1, 2**62)
