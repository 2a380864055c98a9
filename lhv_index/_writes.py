"""The writes `Index.apply` takes, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from lhv_index._clock import Clock
from lhv_index._types import Metadata, MetadataJson

__all__ = ["ApplyResult", "Delete", "Upsert", "Write"]


@dataclass(frozen=True, slots=True, eq=False)
class Upsert:
    """Insert or replace `id`.

    `metadata=None` keeps the stored metadata, `{}` clears it, an object replaces it (a
    dict, or `MetadataJson`: the object already encoded).
    """

    id: str
    vector: npt.NDArray[np.floating] | list[float]
    metadata: Metadata | MetadataJson | None
    clock: Clock


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete `id`, leaving a tombstone with `clock` so older adds arriving later are ignored."""

    id: str
    clock: Clock


Write: TypeAlias = Upsert | Delete


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one `apply` did: `applied` writes changed state, `skipped` did not (not newer).

    `won` names the writes that changed state, by their positions in the list given (in
    ascending order): per id, the write that applying the writes one by one would leave
    stored, when it is newer than what was stored before. Results compare by their counts.
    """

    applied: int
    skipped: int
    won: tuple[int, ...] = field(default=(), compare=False)
    """positions of the winning writes, ascending (`len(won) == applied`)"""
