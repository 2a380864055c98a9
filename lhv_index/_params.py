"""Index parameters and library limits: frozen, validated, with their defaults in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from lhv_index.errors import InvalidRequest

__all__ = [
    "EF_MAX",
    "ELEMENTS_HINT_MAX",
    "M_MAX",
    "N_TREES_MAX",
    "SEARCH_K_MAX",
    "EngineKind",
    "IndexParams",
    "Limits",
    "Space",
]

#: hnsw graph degree: memory per item grows with it (8 * M bytes of links and more)
M_MAX = 512
#: hnsw candidate list size, while building (`ef_construction`) and searching
#: (`ef_search`, a query's `ef`): cost per insert or query grows with it
EF_MAX = 100_000
#: annoy trees: the forest's memory grows with it
N_TREES_MAX = 1_000
#: annoy nodes inspected per query
SEARCH_K_MAX = 10_000_000
#: what any `max_elements_hint` may be; `Limits.max_elements_hint` caps new indexes lower
ELEMENTS_HINT_MAX = 2**32


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
        raise InvalidRequest(f"{name} must be an integer in [{lo}, {hi}], got {_brief(value)}")


def _brief(value: object, limit: int = 64) -> str:
    """`repr(value)` cut to about `limit` characters, for error messages (a request's
    value is named, never echoed in full)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    # a string's own length, not its repr's (quotes and escapes are not the user's)
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}... ({size} characters)"


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
        _check_int("M", self.M, 2, M_MAX)
        _check_int("ef_construction", self.ef_construction, 1, EF_MAX)
        _check_int("ef_search", self.ef_search, 1, EF_MAX)
        _check_int("n_trees", self.n_trees, 1, N_TREES_MAX)
        _check_int("search_k", self.search_k, -1, SEARCH_K_MAX)
        _check_int("max_elements_hint", self.max_elements_hint, 0, ELEMENTS_HINT_MAX)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, limits: Limits | None = None) -> IndexParams:
        """Build from the JSON form; unknown keys and bad values raise `InvalidRequest`.

        `limits`: the parameters are for a new index, so they must also be within these
        (`dim`, `max_elements_hint`); leave it out to read parameters an existing index
        already has (a snapshot), which were checked when it was created.
        """
        if not isinstance(data, dict):
            raise InvalidRequest(f"index params must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise InvalidRequest(f"unknown index parameters: {_brief(unknown, 200)}")
        if "dim" not in data:
            raise InvalidRequest("index params need 'dim'")
        try:
            params = cls(**data)
        except TypeError as exc:
            raise InvalidRequest(f"bad index params: {exc}") from None
        if limits is not None:
            limits.check_new(params)
        return params

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
    max_elements_hint: int = 1_000_000
    """`max_elements_hint` of a new index: the capacity allocated up front (and again by
    every rebuild), whether or not items come; an index still grows past it as items are
    added"""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_int(f.name, getattr(self, f.name), 1, 2**62)

    def check_new(self, params: IndexParams) -> None:
        """Refuse parameters for a new index that are over these limits.

        Raises:
            InvalidRequest: `dim` or `max_elements_hint` over the limit, naming both.
        """
        if params.dim > self.max_dim:
            raise InvalidRequest(f"dim {params.dim} is over the limit of {self.max_dim}")
        if params.max_elements_hint > self.max_elements_hint:
            raise InvalidRequest(
                f"max_elements_hint {params.max_elements_hint} is over the limit of "
                f"{self.max_elements_hint}: an index grows by itself as items are added, "
                "the hint only allocates up front"
            )
