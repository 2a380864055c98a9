"""The `Engine` protocol: what `Index` needs from a nearest-neighbour library.

Engines know labels (uint64) and vectors only: ids, metadata, clocks and the decision of
which label is live belong to `Index`, whose bookkeeping is the truth. Engines see two
metrics, `l2` and `ip`; cosine is `ip` over vectors the index normalized itself.

Calls never overlap with a write: `Index` holds its exclusive lock for `reserve`, `add`,
`mark_deleted`, `dump` and `capture`, and its shared lock for `get` and `query`. An engine that works
in the background (annoy's forest rebuilds) guards its own state against that work.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, Protocol

from lhv_index._capture import EnginePiece, FilePiece
from lhv_index._distance import Metric, TopK
from lhv_index._types import Labels, Vectors
from lhv_index.errors import EngineError

__all__ = ["Engine", "EngineCapture", "ShortResult", "capture_by_dump", "capture_to_file"]

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
        """What `dump` would write, for encoding later: buffers in memory, or files
        (`FilePiece`: an engine's own dump to an unlinked temporary file, see
        `capture_to_file` and `capture_by_dump`) that the caller owns and closes
        (`Base.close`). The caller holds the index's exclusive lock; the capture shares
        nothing the engine mutates.

        Raises:
            EngineError: the engine failed to serialize.
        """
        ...

    def slots(self) -> int:
        """Slots in use, live and deleted (hnswlib's element count)."""
        ...


def capture_by_dump(engine: Engine) -> EngineCapture:
    """`Engine.capture` for engines whose `dump` writes several files: dump to a private
    temporary directory, open every file and remove the directory, so each section is an
    unlinked file (`FilePiece`) the caller closes.

    Raises:
        EngineError: a file could not be written or opened.
    """
    files: list[IO[bytes]] = []
    try:
        with _capture_errors(), tempfile.TemporaryDirectory(prefix="lhv-capture-") as tmpdir:
            path = os.path.join(tmpdir, "engine")
            state = engine.dump(path)
            names = [("engine", path)] + [
                (f"engine.{p}", f"{path}.{p}") for p in state.get("parts", ())
            ]
            sections: list[tuple[str, list[EnginePiece]]] = []
            for name, file in names:
                files.append(open(file, "rb"))  # noqa: SIM115 - the capture owns it
                sections.append((name, [_piece(files[-1])]))
    except BaseException:
        for f in files:
            f.close()
        raise
    return state, sections


def capture_to_file(engine: Engine) -> EngineCapture:
    """`Engine.capture` for engines whose `dump` writes one file: dump into an anonymous
    temporary file (`tempfile.TemporaryFile`, through its `/proc/self/fd` path), which has
    no name even while it is written, so it vanishes when closed or when the process dies.
    Without `/proc`, `capture_by_dump`.

    Raises:
        EngineError: the file could not be written.
    """
    if not os.path.isdir(_PROC_FD):
        return capture_by_dump(engine)
    with _capture_errors():
        f = tempfile.TemporaryFile(prefix="lhv-capture-")  # noqa: SIM115 - the capture owns it
    try:
        with _capture_errors():
            state = engine.dump(f"{_PROC_FD}/{f.fileno()}")
            piece = _piece(f)
    except BaseException:
        f.close()
        raise
    return state, [("engine", [piece])]


#: the directory of this process's open files, by descriptor (Linux)
_PROC_FD = "/proc/self/fd"


def _piece(f: IO[bytes]) -> FilePiece:
    return FilePiece(f, os.fstat(f.fileno()).st_size)


@contextmanager
def _capture_errors() -> Iterator[None]:
    """A capture's file that cannot be written or read is the engine failing to serialize."""
    try:
        yield
    except OSError as exc:
        raise EngineError(f"could not write the engine's capture: {exc}") from exc


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
