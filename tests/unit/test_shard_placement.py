"""Where the members of a sharded index live: consecutive partitions after the home."""

from __future__ import annotations

from collections import Counter

import pytest
from aiokafka.partitioner import murmur2

from worker.wire.shards import member_partition, shard_key
from worker.wire.topics import home_partition, partitioner


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 7, 16, 64])
def test_up_to_p_members_never_share_a_partition(partitions: int) -> None:
    for n in range(200):
        name = f"idx{n}"
        where = [
            home_partition(shard_key(name, s, partitions).encode(), partitions)
            for s in range(partitions)
        ]
        assert sorted(where) == list(range(partitions)), name


def test_more_members_than_partitions_spread_evenly() -> None:
    counts = Counter(home_partition(shard_key("docs", s, 10).encode(), 4) for s in range(10))
    assert sorted(counts.values()) == [2, 2, 3, 3]


def test_member_zero_sits_on_the_home_and_the_next_ones_follow() -> None:
    home = int(murmur2(b"docs") & 0x7FFFFFFF) % 5
    assert [member_partition("docs", s, 5) for s in range(3)] == [
        home,
        (home + 1) % 5,
        (home + 2) % 5,
    ]


def test_every_other_key_goes_where_kafkas_default_partitioner_puts_it() -> None:
    for key in (b"docs", b"a#b", b"x#01", b"#3", "caf\u00e9#1".encode(), b"\xff#1"):
        assert home_partition(key, 7) == int(murmur2(key) & 0x7FFFFFFF) % 7, key


def test_the_aiokafka_partitioner_agrees_with_home_partition() -> None:
    parts = [3, 0, 2, 1, 4]
    for key in (b"docs", b"docs#0", b"docs#3", b"docs#9"):
        assert partitioner(key, parts, parts) == home_partition(key, 5)
    assert partitioner(None, parts, [2]) == 2
