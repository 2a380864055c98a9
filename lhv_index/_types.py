"""Shared type aliases and the small value types returned by reads."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
import orjson

from lhv_index._clock import Clock

__all__ = [
    "Columns",
    "Hit",
    "Item",
    "ItemId",
    "Labels",
    "Metadata",
    "MetadataJson",
    "Vector",
    "Vectors",
]

Vector: TypeAlias = npt.NDArray[np.float32]
"""One vector: float32, shape (dim,)."""

Vectors: TypeAlias = npt.NDArray[np.float32]
"""A matrix of vectors: float32, shape (n, dim), C-contiguous."""

Labels: TypeAlias = npt.NDArray[np.uint64]
"""Engine labels: uint64, shape (n,). hnswlib truncates float labels, so never use floats."""

Metadata: TypeAlias = dict[str, Any]
"""An opaque JSON object stored per id."""


@dataclass(frozen=True, slots=True)
class MetadataJson:
    """A metadata object already encoded as compact JSON (what the index stores), for a
    caller that parsed it from a message and checked its size: an `Upsert` carrying it
    holds its bytes, not a tree of Python objects that can weigh 20 times more. The index
    still checks that it is an object within the size limit; it is trusted to be valid
    JSON (make it with `MetadataJson.of`)."""

    json: bytes

    @classmethod
    def of(cls, metadata: Metadata) -> MetadataJson:
        """`metadata` as compact JSON (orjson; TypeError or orjson.JSONEncodeError when it
        cannot be encoded), in a `bytes` of its own size (orjson's output buffer is larger)."""
        return cls(bytes(memoryview(orjson.dumps(metadata))))


ItemId: TypeAlias = str
"""A client id: a non-empty string of at most `Limits.max_id_bytes` UTF-8 bytes."""


class Hit(NamedTuple):
    """One search result. `distance`: cosine `1 - cos`, l2 squared euclidean, ip `1 - dot`."""

    id: str
    distance: float
    metadata: Metadata | None = None


class Columns(NamedTuple):
    """The hits of one query as columns, nearest first: cheaper than `Hit`s to build and
    to serialize when many queries are answered at once."""

    ids: list[str]
    distances: list[float]
    metadata: list[Metadata | MetadataJson | None] | None = None
    """per hit, when asked for (as its JSON when read with `Index.metadata_json`); None
    otherwise"""

    def hits(self) -> list[Hit]:
        """The same hits as `Hit`s."""
        metadata = self.metadata or repeat(None)
        return list(map(Hit._make, zip(self.ids, self.distances, metadata, strict=False)))


@dataclass(slots=True, eq=False)
class Item:
    """A live item as stored: `vector` is a copy (None when not asked for)."""

    id: str
    vector: Vector | None
    metadata: Metadata | None
    clock: Clock
