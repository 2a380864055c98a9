"""The catalog of a partition: the names whose home it is that are not plain indexes.

A name's home is the partition of its key (`murmur2(b"NAME") % P`). Besides its indexes,
the home keeps a catalog entry for each sharded index and each alias homed there:

- `Sharded(shards, params)`: `NAME` is S member indexes `NAME#0` .. `NAME#(S-1)`, each on
  the partition of its own key (`worker.wire.shards`); the home creates them and splits
  the plain-name writes among them.
- `Alias(target)`: writes keyed by the alias go to the target (one hop).

The catalog is partition state: applied from the log like indexes, persisted in the
partition's manifest (format 3) with its checkpoint, restored with it and rebuilt by a
replay. Entries are immutable values; a change replaces the entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

__all__ = ["Alias", "CatalogEntry", "Sharded", "catalog_from_wire", "catalog_to_wire"]


@dataclass(frozen=True, slots=True)
class Sharded:
    """A sharded index: `shards` members, each created with `params`."""

    kind: ClassVar[str] = "sharded"
    shards: int
    params: dict[str, Any]
    """`IndexParams.to_dict()` of every member"""

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "shards": self.shards, "params": dict(self.params)}


@dataclass(frozen=True, slots=True)
class Alias:
    """An alias: writes keyed by it are forwarded to `target` (an index or sharded index)."""

    kind: ClassVar[str] = "alias"
    target: str

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target}


CatalogEntry: TypeAlias = Sharded | Alias


def _entry(body: Mapping[str, Any]) -> CatalogEntry:
    kind = body.get("kind")
    if kind == Sharded.kind:
        return Sharded(int(body["shards"]), dict(body["params"]))
    if kind == Alias.kind:
        return Alias(str(body["target"]))
    raise ValueError(f"unknown catalog entry kind {kind!r}")


def catalog_from_wire(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, CatalogEntry]:
    """The catalog a manifest holds (`Manifest.catalog`), as typed entries.

    Raises:
        ValueError: an entry of an unknown kind (a manifest of a newer version).
    """
    return {name: _entry(body) for name, body in raw.items()}


def catalog_to_wire(catalog: Mapping[str, CatalogEntry]) -> dict[str, dict[str, Any]]:
    """The catalog as a manifest stores it."""
    return {name: entry.to_wire() for name, entry in catalog.items()}
