"""The merge of a sharded index's member answers (worker/wire/gather.py): the one code
the client and a home worker's gather share."""

from __future__ import annotations

import itertools
import random

from lhv_index import Hit
from lhv_index.errors import DeadlineExceeded
from worker.wire.gather import (
    hit_rows,
    merge_get_items,
    merge_hits,
    merge_search_reply,
    merge_stats_reply,
    missing_error,
)


def test_merged_hits_break_distance_ties_by_id_whatever_order_members_answer() -> None:
    parts = [
        [Hit("b", 0.5), Hit("z", 0.7)],
        [Hit("a", 0.5), Hit("c", 0.5)],
        [Hit("y", 0.1)],
    ]
    expected = [Hit("y", 0.1), Hit("a", 0.5), Hit("b", 0.5), Hit("c", 0.5)]
    for order in itertools.permutations(parts):
        assert merge_hits(order, 4) == expected


def test_merged_hits_are_the_exact_top_k_of_the_union_across_shards() -> None:
    rng = random.Random(7)
    everything = [Hit(f"id{i}", round(rng.random(), 2)) for i in range(300)]
    shards: list[list[Hit]] = [[], [], [], []]
    for hit in everything:
        shards[hash(hit.id) % 4].append(hit)
    for k in (1, 10, 75, 299, 1000):
        # each member answers its own top k, as a member index does
        parts = [sorted(s, key=lambda h: (h.distance, h.id))[:k] for s in shards]
        expected = sorted(everything, key=lambda h: (h.distance, h.id))[:k]
        assert merge_hits(parts, k) == expected


def test_merged_search_reply_of_a_multi_vector_search_keeps_metadata_per_row() -> None:
    a = {
        "status": "ok",
        "results": [
            {"ids": ["a1"], "distances": [0.2], "metadata": [{"c": "red"}]},
            {"ids": ["a2"], "distances": [0.9], "metadata": [{"c": "red"}]},
        ],
        "applied_offset": 10,
    }
    b = {
        "status": "ok",
        "results": [
            {"ids": ["b1"], "distances": [0.1], "metadata": [{"c": "red"}]},
            {"ids": [], "distances": [], "metadata": []},
        ],
        "applied_offset": 4,
    }
    body = merge_search_reply("docs", 2, [(0, a), (1, b)], k=5, multi=True, include_metadata=True)
    assert body["results"] == [
        {"ids": ["b1", "a1"], "distances": [0.1, 0.2], "metadata": [{"c": "red"}] * 2},
        {"ids": ["a2"], "distances": [0.9], "metadata": [{"c": "red"}]},
    ]
    assert body["applied_offsets"] == {"docs#0": 10, "docs#1": 4}
    assert "partial" not in body


def test_merged_search_reply_with_a_missing_member_is_flagged_partial() -> None:
    a = {"status": "ok", "hits": [{"id": "x", "distance": 0.3}], "applied_offset": 1}
    body = merge_search_reply(
        "docs", 3, [(1, a)], k=2, multi=False, include_metadata=False, missing=[2, 0]
    )
    assert body["hits"] == [{"id": "x", "distance": 0.3}]
    assert body["partial"] is True and body["missing_shards"] == [0, 2]


def test_hit_rows_read_hits_and_columns_alike() -> None:
    hits = {"hits": [{"id": "a", "distance": 1, "metadata": {"k": 1}}]}
    cols = {"results": [{"ids": ["a"], "distances": [1.0]}]}
    assert hit_rows(hits) == [[("a", 1.0, {"k": 1})]]
    assert hit_rows(cols) == [[("a", 1.0, None)]]


def test_merged_get_puts_items_back_in_the_order_asked_duplicates_included() -> None:
    parts = [[{"id": "b"}, {"id": "d"}], [{"id": "a"}]]
    assert merge_get_items(["d", "a", "x", "b", "a"], parts) == [
        {"id": "d"},
        {"id": "a"},
        {"id": "b"},
        {"id": "a"},
    ]


def test_merged_stats_sum_counts_and_list_each_member() -> None:
    member = {"dim": 4, "space": "l2", "engine": "hnsw", "params": {"m": 16}}
    answers = [
        (1, {**member, "count": 5, "deleted": 1, "partition": 3, "applied_offset": 9}),
        (0, {**member, "count": 2, "deleted": 0, "partition": 0, "applied_offset": 2}),
    ]
    answers[0][1]["checkpoint_offset"] = 8
    answers[1][1]["checkpoint_offset"] = 1
    body = merge_stats_reply("docs", 2, answers)
    assert (body["count"], body["deleted"], body["dim"], body["space"]) == (7, 1, 4, "l2")
    # the top-level offsets every stats reply carries: the lowest of the members'
    assert (body["applied_offset"], body["checkpoint_offset"]) == (2, 1)
    assert body["applied_offsets"] == {"docs#0": 2, "docs#1": 9}
    assert [s["shard"] for s in body["shards"]] == [0, 1]
    assert body["shards"][1] == {
        "shard": 1,
        "partition": 3,
        "count": 5,
        "deleted": 1,
        "applied_offset": 9,
        "checkpoint_offset": 8,
    }


def test_missing_members_error_names_them_with_the_deadline_code() -> None:
    err = missing_error("docs", [3, 1], 4)
    assert isinstance(err, DeadlineExceeded) and err.code == "deadline_exceeded"
    assert err.missing_shards == [1, 3]
    assert "[1, 3]" in err.message and "docs" in err.message


def test_a_multi_vector_search_with_no_member_answering_has_an_empty_row_per_vector() -> None:
    body = merge_search_reply(
        "docs", 2, [], k=3, multi=True, include_metadata=False, missing=[0, 1], queries=3
    )
    assert body["results"] == [{"ids": [], "distances": []}] * 3
    assert body["partial"] is True and body["applied_offset"] == -1
