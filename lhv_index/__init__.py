"""LHV's index library: string ids, metadata, last-write-wins clocks and tombstones over
hnswlib, annoy or exact numpy search, with the framed LHV1 snapshot format: full snapshots and delta segments
(`read_frame` describes any frame without decoding it).

No Kafka, no S3, no asyncio: a library a user can import on its own.
"""

from __future__ import annotations

from lhv_index import errors
from lhv_index._capture import Base, Delta
from lhv_index._clock import Clock
from lhv_index._delta import apply_delta, read_delta, write_delta
from lhv_index._frame import Frame, FrameSection, read_frame
from lhv_index._index import Index
from lhv_index._params import EngineKind, IndexParams, Limits, Space
from lhv_index._snapshot import read_snapshot, write_snapshot
from lhv_index._types import Columns, Hit, Item, MetadataJson
from lhv_index._validate import ValidatedWrites
from lhv_index._writes import ApplyResult, Delete, Upsert, Write

__all__ = [
    "ApplyResult",
    "Base",
    "Clock",
    "Columns",
    "Delete",
    "Delta",
    "EngineKind",
    "Frame",
    "FrameSection",
    "Hit",
    "Index",
    "IndexParams",
    "Item",
    "Limits",
    "MetadataJson",
    "Space",
    "Upsert",
    "ValidatedWrites",
    "Write",
    "apply_delta",
    "errors",
    "read_delta",
    "read_frame",
    "read_snapshot",
    "write_delta",
    "write_snapshot",
]

for _obj in (
    ApplyResult,
    Base,
    Clock,
    Columns,
    Delete,
    Delta,
    EngineKind,
    Frame,
    FrameSection,
    Hit,
    Index,
    IndexParams,
    Item,
    Limits,
    MetadataJson,
    Space,
    Upsert,
    ValidatedWrites,
):
    _obj.__module__ = "lhv_index"
del _obj
