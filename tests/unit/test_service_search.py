"""The search server inside a worker over the in-memory log and reply bus: concurrent
queries share one engine call, `min_offset` is honoured, and answered offsets are
committed."""

from __future__ import annotations

from aiokafka import TopicPartition
from servicekit import TOPICS, Cluster, caught_up, eventually

from worker.wire.limits import MessageLimits

INDEX = "docs"


async def test_concurrent_queries_of_one_index_are_answered_by_one_engine_call() -> None:
    cluster = Cluster(partitions=1)
    cluster.command(INDEX, {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    cluster.command(INDEX, {"op": "add", "items": [{"id": "a", "vector": [1.0, 0.0]}]})
    async with cluster.worker("a") as (w, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, w), "the index is applied")
        cids = [b"q%d" % i for i in range(20)]
        client.pause(TopicPartition(TOPICS.search, 0))  # all arrive in one poll
        for cid in cids:
            cluster.query(INDEX, {"vector": [1.0, 0.0], "k": 1}, cid)
        client.resume(TopicPartition(TOPICS.search, 0))
        await eventually(lambda: all(c in cluster.replies() for c in cids), "every reply")
        replies = cluster.replies()
        assert all(replies[c]["hits"][0]["id"] == "a" for c in cids)
        assert w.search.searched == 20
        assert w.search.engine_calls == 1


async def test_a_query_waits_until_its_min_offset_is_applied() -> None:
    cluster = Cluster(partitions=1)
    cluster.command(INDEX, {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    async with cluster.worker("a") as (w, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, w), "the index is created")
        later = cluster.end(0)  # the offset the add below will get
        cluster.query(INDEX, {"vector": [0.0, 1.0], "k": 1, "min_offset": later}, b"ryw")
        await eventually(
            lambda: sum(f.parked for f in w.search._flights.values()) == 1, "the query parks"
        )
        assert b"ryw" not in cluster.replies()
        assert (
            cluster.command(INDEX, {"op": "add", "items": [{"id": "b", "vector": [0.0, 1.0]}]})
            == later
        )
        await eventually(lambda: b"ryw" in cluster.replies(), "the reply")
        reply = cluster.replies()[b"ryw"]
        assert reply["status"] == "ok" and reply["hits"][0]["id"] == "b"
        assert reply["applied_offset"] >= later


async def test_answered_search_offsets_are_committed() -> None:
    cluster = Cluster(partitions=1)
    cluster.command(INDEX, {"op": "create", "dim": 2})
    async with cluster.worker("a") as (w, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, w), "the index is created")
        for i in range(3):
            cluster.query(INDEX, {"vector": [1.0, 0.0], "k": 1}, b"c%d" % i)
        tp = TopicPartition(TOPICS.search, 0)
        await eventually(
            lambda: cluster.broker.committed("lhv").get(tp) == 3, "the search offset commit"
        )


async def test_queries_batched_together_stay_within_max_hits_per_engine_call() -> None:
    """One query with a large k among many small ones: the engine is never asked for more
    than `max_hits` hits at once (the large k is not applied to the small queries' rows),
    and every query is answered with its own k."""
    cluster = Cluster(partitions=1)
    cluster.command(INDEX, {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    items = [{"id": f"i{n}", "vector": [float(n), 0.0]} for n in range(50)]
    cluster.command(INDEX, {"op": "add", "items": items})
    async with cluster.worker("a", limits=MessageLimits(max_hits=40)) as (w, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, w), "the index is applied")
        client.pause(TopicPartition(TOPICS.search, 0))  # all arrive in one poll
        cluster.query(INDEX, {"vector": [0.0, 0.0], "k": 40}, b"big")
        small = [b"s%d" % i for i in range(20)]
        for cid in small:
            cluster.query(INDEX, {"vector": [0.0, 0.0], "k": 2}, cid)
        cluster.query(INDEX, {"vector": [0.0, 0.0], "k": 41}, b"over")
        client.resume(TopicPartition(TOPICS.search, 0))
        cids = [b"big", b"over", *small]
        await eventually(lambda: all(c in cluster.replies() for c in cids), "every reply")
        replies = cluster.replies()
        assert len(replies[b"big"]["hits"]) == 40
        assert all([h["id"] for h in replies[c]["hits"]] == ["i0", "i1"] for c in small)
        assert replies[b"over"]["error"]["code"] == "invalid_request"
        assert "max_hits" in replies[b"over"]["error"]["message"]
        # 20 small queries of k 2 in one call (40 hits), the large one in its own
        assert w.search.searched == 21
        assert w.search.engine_calls == 2


async def test_stored_metadata_is_sent_as_stored_and_never_parsed_past_a_replys_bytes() -> None:
    """Metadata made of small objects weighs about 20 times its bytes once parsed: 200
    items of 30 KB of empty arrays would be over 100 MB of objects for one search of k
    200. The worker sends metadata as the JSON it stores, and refuses a search or get
    whose metadata alone is over one reply record's bytes before reading any of it."""
    import tracemalloc

    cluster = Cluster(partitions=1)
    cluster.command(INDEX, {"op": "create", "dim": 2, "space": "l2", "engine": "exact"})
    fat = {"a": [[]] * 10_000}
    items = [{"id": f"i{n}", "vector": [float(n), 0.0], "metadata": fat} for n in range(200)]
    cluster.command(INDEX, {"op": "add", "items": items})
    async with cluster.worker("a") as (w, client, _):
        await client.assign([0])
        await eventually(caught_up(cluster, w), "the index is applied")
        tracemalloc.start()
        try:
            cluster.query(INDEX, {"vector": [0.0, 0.0], "k": 200, "include_metadata": True}, b"s")
            cluster.query(INDEX, {"op": "get", "ids": [f"i{n}" for n in range(200)]}, b"g")
            await eventually(lambda: {b"s", b"g"} <= cluster.replies().keys(), "both replies")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        replies = cluster.replies()
        for cid in (b"s", b"g"):
            error = replies[cid]["error"]
            assert error["code"] == "invalid_request"
            assert "bytes for one reply record" in error["message"], error
        assert peak < 30 * 2**20, f"{peak} bytes traced while refusing"
        cluster.query(INDEX, {"vector": [0.0, 0.0], "k": 2, "include_metadata": True}, b"s2")
        cluster.query(INDEX, {"op": "get", "ids": ["i1", "nope"]}, b"g2")
        await eventually(lambda: {b"s2", b"g2"} <= cluster.replies().keys(), "both replies")
        replies = cluster.replies()
        assert [(h["id"], h["metadata"]) for h in replies[b"s2"]["hits"]] == [
            ("i0", fat),
            ("i1", fat),
        ]
        assert [(it["id"], it["metadata"]) for it in replies[b"g2"]["items"]] == [("i1", fat)]
