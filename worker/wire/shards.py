"""Sharded indexes on the wire: the record key of each shard and the shard of an id.

An index created with `shards: S` (S >= 2) is S member indexes. Shard `s` is the index
named `NAME#s` (decimal `s`, no padding), written and searched with the record key
`NAME#s`. It lives on partition `(home + s) % P`, where `home = toPositive(murmur2(NAME))
% P` is NAME's own partition (Kafka's default partitioner on the key NAME): the members of
an index sit on consecutive partitions, so S <= P members never share a partition and
S > P members spread evenly. A record for a member is produced to that partition
explicitly (`member_partition`, or LHV's partitioner `worker.wire.topics.partitioner`
for aiokafka; Java: `new ProducerRecord<>(topic, partition, key, value)`); on any other
partition it is refused with `wrong_partition`. (Hashing the key `NAME#s` instead would
let members collide: 4 members over 4 partitions would share partitions 91% of the time.)

An id belongs to shard `(murmur2(utf8(id)) & 0x7fffffff) % S`: the function Kafka's Java
client applies to a record key (`Utils.toPositive(Utils.murmur2(bytes)) % n`). An index
of one shard is an ordinary index under its plain name.

`#` is outside the index-name grammar (`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`), so a shard
name can never be taken for an index name, or the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from aiokafka.partitioner import murmur2

__all__ = [
    "MAX_SHARDS",
    "SHARD_SEPARATOR",
    "ShardName",
    "member_partition",
    "parse_shard_name",
    "shard_key",
    "shard_names",
    "shard_of",
    "split_by_shard",
]

#: the largest `shards` a `create` may ask for (also `LHV_MAX_SHARDS`'s default)
MAX_SHARDS = 1024
SHARD_SEPARATOR = "#"

_SHARD_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})#(0|[1-9][0-9]{0,3})")


def shard_of(id_: str, shards: int) -> int:
    """The shard of `id_` in an index of `shards` shards."""
    if shards <= 1:
        return 0
    return _positive_murmur2(id_.encode("utf-8")) % shards


def _positive_murmur2(data: bytes) -> int:
    return int(murmur2(data) & 0x7FFFFFFF)


def member_partition(name: str, shard: int, num_partitions: int) -> int:
    """The partition of member `shard` of the sharded index `name`: `shard` partitions
    after `name`'s home, wrapping around."""
    return (_positive_murmur2(name.encode("utf-8")) + shard) % num_partitions


def shard_key(name: str, shard: int, shards: int) -> str:
    """The record key (and member index name) of shard `shard` of `name`: `name` itself
    for an index of one shard, else `name#shard`."""
    if not 0 <= shard < max(shards, 1):
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    return name if shards <= 1 else f"{name}{SHARD_SEPARATOR}{shard}"


class ShardName:
    """A member index name `NAME#s`, parsed: `base` is NAME, `shard` is s."""

    __slots__ = ("base", "shard")

    def __init__(self, base: str, shard: int) -> None:
        self.base = base
        self.shard = shard

    def __repr__(self) -> str:
        return f"ShardName({self.base!r}, {self.shard})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardName) and (self.base, self.shard) == (other.base, other.shard)

    def __hash__(self) -> int:
        return hash((self.base, self.shard))

    def __str__(self) -> str:
        return f"{self.base}{SHARD_SEPARATOR}{self.shard}"


def parse_shard_name(name: str) -> ShardName | None:
    """`NAME#s` as a `ShardName`, or None when `name` is not a shard name."""
    m = _SHARD_NAME.fullmatch(name)
    if m is None:
        return None
    return ShardName(m.group(1), int(m.group(2)))


def split_by_shard(ids: Iterable[str], shards: int) -> dict[int, list[int]]:
    """Positions of `ids` grouped by shard, each group in input order (so a later duplicate
    of an id still comes later within its shard's record)."""
    out: dict[int, list[int]] = {}
    for pos, id_ in enumerate(ids):
        out.setdefault(shard_of(id_, shards), []).append(pos)
    return out


def shard_names(name: str, shards: int) -> Sequence[str]:
    """The member index names of `name`, shard 0 first."""
    return [shard_key(name, s, shards) for s in range(max(shards, 1))]
