"""The `Engine` protocol: what `Index` needs from a nearest-neighbour library.

Engines know labels (uint64) and vectors only: ids, metadata, clocks and the decision of
which label is live belong to `Index`, whose bookkeeping is the truth. Engines see two
metrics, `l2` and `ip`; cosine is `ip` over vectors the index normalized itself.

Calls never overlap with a write: `Index` holds its exclusive lock for `reserve`, `add`,
`mark_deleted` and `dump`, and its shared lock for `get` and `query`. An engine that works
in the background (annoy's forest rebuilds) guards its own state against that work.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from typing import Any, Protocol

from lhv_index._capture import EnginePiece
from lhv_index._distance import Metric, TopK
from lhv_index._types import Labels, Vectors
from lhv_index.errors import EngineError

__all__ = ["Engine", "EngineCapture", "ShortResult", "capture_by_dump"]

#: what `Engine.capture` returns: the state `dump` returns, and (section name, pieces) of
#: each of the engine's sections, `engine` first, then `engine.<part>` per part
EngineCapture = tuple[dict[str, Any], list[tuple[str, list[EnginePiece]]]]


class ShortResult(Exception):
    """The engine could not return k results for every query (an unreachable part of the
    graph, many deleted slots); the index answers those queries by brute force."""


class Engine(Protocol):
    """One nearest-neighbour structure over labelled vectors."""

    metric: Metric
    dim: int
    replace_in_place: bool
    """Whether `add` of a live label (replacing its vector) costs about what adding a new
    label costs. When it does not (hnswlib re-links the node), delta application moves
    rewritten ids to fresh labels instead (`LabelMap.move`)."""

    @property
    def capacity(self) -> int:
        """Labels `0 .. capacity-1` can be added without `reserve`."""
        ...

    def reserve(self, capacity: int) -> None:
        """Grow to hold labels `0 .. capacity-1` (never shrinks)."""
        ...

    def add(self, labels: Labels, vectors: Vectors) -> None:
        """Upsert in one call: a new label is inserted, a live or deleted one replaced (and
        revived). Labels are distinct and below `capacity`."""
        ...

    def mark_deleted(self, labels: Labels) -> None:
        """Hide live labels from queries; their slots stay until re-added."""
        ...

    def get(self, labels: Labels) -> Vectors:
        """Copies of the stored vectors of live labels, float32 (n, dim)."""
        ...

    def query(self, queries: Vectors, k: int, *, ef: int) -> TopK:
        """The k nearest live labels per query; k is at most the live count.

        Raises:
            ShortResult: fewer than k results for some query.
        """
        ...

    def dump(self, path: str) -> dict[str, Any]:
        """Write the engine's bytes to `path`; returns what `load` needs besides them.

        An engine whose bytes are several files (annoy) writes the others beside it as
        `f"{path}.{part}"` and lists the part names under `"parts"` in what it returns.
        """
        ...

    def capture(self) -> EngineCapture:
        """An in-memory copy of what `dump` would write, for encoding later (the caller
        holds the index's exclusive lock; the copy shares nothing the engine mutates)."""
        ...

    def slots(self) -> int:
        """Slots in use, live and deleted (hnswlib's element count)."""
        ...


def capture_by_dump(engine: Engine) -> EngineCapture:
    """`Engine.capture` for engines that can only save to files: dump to a temporary
    directory and read the files back."""
    with tempfile.TemporaryDirectory(prefix="lhv-capture-") as tmpdir:
        path = os.path.join(tmpdir, "engine")
        state = engine.dump(path)
        names = [("engine", path)] + [
            (f"engine.{p}", f"{path}.{p}") for p in state.get("parts", ())
        ]
        sections: list[tuple[str, list[EnginePiece]]] = []
        for name, file in names:
            with open(file, "rb") as f:
                sections.append((name, [f.read()]))
    return state, sections


def engine_library(module: str, engine: str) -> Any:
    """The library behind `engine`, imported on first use: `lhv_index` (and the client,
    which shares its types) imports without hnswlib or annoy; only an index on that
    engine needs it.

    Raises:
        EngineError: the library is not installed (the `worker` extra brings it).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EngineError(f"the {engine} engine needs {module}: pip install 'lhv[worker]'") from exc
