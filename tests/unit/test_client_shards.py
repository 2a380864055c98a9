"""The client's handling of sharded indexes and aliases, over an in-memory stand-in for
the workers (the client's own `_send`), so its routing, splitting and merging are checked
without a broker: which record goes to which member key, in which order, what each member
is asked, and what the caller gets back."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pytest

from lhv_index import Hit
from lhv_index.errors import IndexNotFound
from worker.client import LhvClient, NotAcknowledged, ShardsMissing
from worker.client.client import _Sent
from worker.wire.shards import parse_shard_name, shard_key, shard_of
from worker.wire.topics import TopicsConfig


class _Meta(NamedTuple):
    partition: int
    offset: int


class _Workers(LhvClient):
    """A client whose records never leave the process: commands are applied to per-key
    stores, queries answered from them (exact l2 search), `describe` from `catalog`."""

    def __init__(self, catalog: dict[str, dict[str, Any]], **kw: Any) -> None:
        super().__init__("127.0.0.1:1", topics=TopicsConfig(), reply_grace_s=0.0, **kw)
        self.catalog = catalog
        self.down: set[str] = set()
        self.records: list[tuple[str, str, dict[str, Any]]] = []
        self.store: dict[str, dict[str, tuple[np.ndarray, Any]]] = defaultdict(dict)
        self.next_offset: dict[str, int] = defaultdict(int)
        self._state = "opened"
        self._producer = object()  # type: ignore[assignment,unused-ignore]

    async def _send(
        self, topic: str, index: str, body: dict[str, Any], *, reply: bool, batch: bool = False
    ) -> _Sent:
        loop = asyncio.get_running_loop()
        delivery: asyncio.Future[Any] = loop.create_future()
        offset = 0
        if topic == self._topics.commands:
            offset = self.next_offset[index]
            self.next_offset[index] += 1
        delivery.set_result(_Meta(0, offset))
        self.records.append((topic, index, body))
        if topic == self._topics.commands:
            self._apply(index, body)
        fut: asyncio.Future[dict[str, Any]] | None = None
        if reply:
            fut = loop.create_future()
            if index not in self.down:
                fut.set_result(self._answer(topic, index, body))
        return _Sent(delivery, None, fut, command=topic == self._topics.commands)

    def _apply(self, key: str, body: dict[str, Any]) -> None:
        if body["op"] == "add":
            for item in body["items"]:
                vec = np.frombuffer(base64.b64decode(item["vector_b64"]), dtype="<f4")
                self.store[key][item["id"]] = (vec, item.get("metadata"))
        elif body["op"] == "delete":
            for id_ in body["ids"]:
                self.store[key].pop(id_, None)

    def _answer(self, topic: str, key: str, body: Mapping[str, Any]) -> dict[str, Any]:
        op = body["op"]
        if topic == self._topics.commands:
            return {"status": "ok", "op": op, "offset": self.next_offset[key] - 1}
        if op == "describe":
            if key not in self.catalog:
                return {"status": "error", "error": {"code": "index_not_found", "message": ""}}
            return {"status": "ok", **self.catalog[key]}
        base = parse_shard_name(key)
        sharded = {n for n, c in self.catalog.items() if c.get("kind") == "sharded"}
        known = key in self.catalog if base is None else base.base in sharded
        if not known:
            return {"status": "error", "error": {"code": "index_not_found", "message": key}}
        items = self.store[key]
        applied = self.next_offset[key] - 1
        if op == "stats":
            return {"status": "ok", "count": len(items), "deleted": 0, "dim": 2, "partition": 0}
        if op == "get":
            rows = [{"id": i, "metadata": items[i][1]} for i in body["ids"] if i in items]
            return {"status": "ok", "items": rows, "applied_offset": applied}
        vectors = [body["vector_b64"]] if "vector_b64" in body else list(body["vectors_b64"])
        flt = body.get("filter") or {}
        results: list[dict[str, list[Any]]] = []
        for v in vectors:
            q = np.frombuffer(base64.b64decode(v), dtype="<f4")
            found = sorted(
                (float(np.sum((vec - q) ** 2)), id_)
                for id_, (vec, meta) in items.items()
                if all((meta or {}).get(f) == x for f, x in flt.items())
            )[: body["k"]]
            results.append({"ids": [i for _, i in found], "distances": [d for d, _ in found]})
        if "vector_b64" in body:
            r = results[0]
            hits = [{"id": i, "distance": d} for i, d in zip(r["ids"], r["distances"], strict=True)]
            return {"status": "ok", "hits": hits, "applied_offset": applied}
        return {"status": "ok", "results": results, "applied_offset": applied}

    def sent(self, op: str) -> list[tuple[str, dict[str, Any]]]:
        return [(key, body) for _, key, body in self.records if body["op"] == op]


SHARDED = {"docs": {"kind": "sharded", "shards": 4}}


def _ids(n: int) -> list[str]:
    return [f"item-{i}" for i in range(n)]


async def test_sharded_add_sends_each_item_to_its_shards_key_in_input_order() -> None:
    c = _Workers(dict(SHARDED))
    ids = [*_ids(40), "item-3", "item-7"]  # later duplicates come later in their shard
    vecs = np.arange(len(ids) * 2, dtype="<f4").reshape(-1, 2)
    wrote = await c.add("docs", ids, vecs, batch_size=5)
    adds = c.sent("add")
    per_key: dict[str, list[str]] = defaultdict(list)
    for key, body in adds:
        assert body["index"] == key and len(body["items"]) <= 5
        for item in body["items"]:
            assert key == shard_key("docs", shard_of(item["id"], 4), 4)
            per_key[key].append(item["id"])
    for key, got in per_key.items():
        assert got == [i for i in ids if shard_key("docs", shard_of(i, 4), 4) == key]
    assert set(wrote.offsets) == set(per_key) == {f"docs#{s}" for s in range(4)}
    assert all(wrote.offsets[k] == c.next_offset[k] - 1 for k in per_key)
    assert wrote.records == len(adds)


async def test_unsharded_add_is_keyed_by_the_name_and_its_position_is_as_before() -> None:
    c = _Workers({"plain": {"kind": "index", "shards": 1}})
    wrote = await c.add("plain", _ids(3), np.ones((3, 2)))
    assert [key for key, _ in c.sent("add")] == ["plain"]
    assert wrote.offsets == {} and wrote.offset == 0


async def test_sharded_delete_sends_each_id_to_its_shard_only() -> None:
    c = _Workers(dict(SHARDED))
    await c.delete("docs", _ids(20), version=3)
    for key, body in c.sent("delete"):
        assert body["version"] == 3
        assert all(key == shard_key("docs", shard_of(i, 4), 4) for i in body["ids"])
    assert sorted(i for _, b in c.sent("delete") for i in b["ids"]) == sorted(_ids(20))


@pytest.mark.parametrize("coalesce", [True, False])
async def test_sharded_search_answers_the_exact_top_k_of_all_members(coalesce: bool) -> None:
    c = _Workers(dict(SHARDED), coalesce_searches=coalesce)
    rng = np.random.default_rng(3)
    vecs = rng.integers(0, 4, size=(200, 2)).astype("<f4")  # many equal distances
    ids = _ids(200)
    await c.add("docs", ids, vecs, [{"odd": i % 2} for i in range(200)])
    queries = rng.integers(0, 4, size=(6, 2)).astype("<f4")
    rows = await c.search_many("docs", queries, k=15, filter={"odd": 1})
    for q, hits in zip(queries, rows, strict=True):
        exact = sorted(
            (float(np.sum((v - q) ** 2)), i)
            for i, v in zip(ids, vecs, strict=True)
            if int(i[5:]) % 2
        )[:15]
        assert [(h.distance, h.id) for h in hits] == exact
        assert hits.partial is False
    searched = {key for key, _ in c.sent("search")}
    assert searched == {f"docs#{s}" for s in range(4)}


async def test_search_after_a_sharded_write_waits_on_each_member_for_its_own_offset() -> None:
    c = _Workers(dict(SHARDED), coalesce_searches=False)
    wrote = await c.add("docs", _ids(30), np.ones((30, 2)))
    await c.search("docs", [1.0, 1.0], k=3, after=wrote)
    asked = {key: body.get("min_offset") for key, body in c.sent("search")}
    assert asked == dict(wrote.offsets)


async def test_a_member_that_does_not_answer_fails_the_search_naming_its_shard() -> None:
    c = _Workers(dict(SHARDED))
    await c.add("docs", _ids(30), np.ones((30, 2)))
    c.down.add("docs#2")
    with pytest.raises(ShardsMissing) as err:
        await c.search("docs", [1.0, 1.0], k=3, timeout_s=0.2)
    assert err.value.missing_shards == [2] and err.value.code == "deadline_exceeded"
    hits = await c.search("docs", [1.0, 1.0], k=50, timeout_s=0.2, allow_partial=True)
    assert hits.partial and hits.missing_shards == (2,)
    assert {h.id for h in hits} == {i for i in _ids(30) if shard_of(i, 4) != 2}
    stats = await c.stats("docs", timeout_s=0.2, allow_partial=True)
    assert stats["partial"] and stats["missing_shards"] == [2]
    assert c.pending == 0


async def test_get_asks_each_member_for_its_own_ids_and_keeps_the_order_asked() -> None:
    c = _Workers(dict(SHARDED))
    await c.add("docs", _ids(30), np.ones((30, 2)), [{"n": i} for i in range(30)])
    asked = ["item-9", "nope", "item-2", "item-17", "item-2"]
    items = await c.get("docs", asked)
    assert [i["id"] for i in items] == ["item-9", "item-2", "item-17", "item-2"]
    for key, body in c.sent("get"):
        assert all(key == shard_key("docs", shard_of(i, 4), 4) for i in body["ids"])
    stats = await c.stats("docs")
    assert stats["count"] == 30 and [s["shard"] for s in stats["shards"]] == [0, 1, 2, 3]


async def test_an_alias_is_followed_and_resolved_again_when_its_target_is_gone() -> None:
    catalog: dict[str, dict[str, Any]] = {
        "live": {"kind": "alias", "target": "v1"},
        "v1": {"kind": "index", "shards": 1},
        "v2": {"kind": "sharded", "shards": 4},
    }
    c = _Workers(catalog)
    await c.add("live", ["a"], [[0.0, 0.0]])
    assert [key for key, _ in c.sent("add")] == ["v1"]
    await c.add("v2", ["b"], [[0.0, 0.0]])
    catalog["live"] = {"kind": "alias", "target": "v2"}
    del catalog["v1"]  # dropped: its member answers index_not_found, the alias is asked again
    hits = await c.search("live", [0.0, 0.0], k=5)
    assert [h.id for h in hits] == ["b"]


async def test_a_name_that_is_not_found_anywhere_raises_index_not_found() -> None:
    c = _Workers({})
    with pytest.raises(IndexNotFound):
        await c.search("ghost", [0.0, 0.0])


async def test_hits_of_an_ordinary_index_are_a_plain_list_of_hits() -> None:
    c = _Workers({"plain": {"kind": "index", "shards": 1}})
    await c.add("plain", ["a"], [[1.0, 0.0]])
    hits = await c.search("plain", [1.0, 0.0])
    assert hits == [Hit("a", 0.0)] and not hits.partial


@pytest.mark.parametrize("coalesce", [True, False])
async def test_a_query_nobody_answers_gives_up_within_its_own_timeout_name_lookup_included(
    coalesce: bool,
) -> None:
    c = _Workers({"plain": {"kind": "index", "shards": 1}}, coalesce_searches=coalesce)
    c.down.add("plain")  # no worker: neither `describe` nor the search is answered
    called_ms = time.time() * 1000
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: c.search("plain", [1.0, 0.0], timeout_s=0.2),
        lambda: c.get("plain", ["a"], timeout_s=0.2),
        lambda: c.stats("plain", timeout_s=0.2),
    ]
    for call in calls:
        with pytest.raises(TimeoutError, match=r"no (search )?reply within"):
            await call()
        asked = [body["deadline_ms"] for _, _, body in c.records]
        assert c.records[0][2]["op"] == "describe"
        # every request of the call, the name's lookup too, is due by the call's deadline
        assert max(asked) <= called_ms + 200 + 1
        c.records.clear()
        called_ms = time.time() * 1000
    assert c.pending == 0


async def test_a_write_nobody_acknowledges_raises_not_acknowledged_after_the_name_lookup() -> None:
    c = _Workers({"plain": {"kind": "index", "shards": 1}})
    c.down.add("plain")
    called_ms = time.time() * 1000
    with pytest.raises(NotAcknowledged):
        await c.add("plain", ["a"], [[1.0, 0.0]], ack=True, timeout_s=0.2)
    [(_, describe)], [(_, add)] = c.sent("describe"), c.sent("add")
    assert describe["deadline_ms"] <= called_ms + 200 + 1
    assert [i["id"] for i in add["items"]] == ["a"]


@pytest.mark.parametrize("coalesce", [True, False])
async def test_numpy_numbers_are_taken_wherever_the_client_takes_numbers(coalesce: bool) -> None:
    c = _Workers({"plain": {"kind": "index", "shards": 1}}, coalesce_searches=coalesce)
    meta: list[dict[str, Any]] = [{"n": np.int64(1), "score": np.float32(0.5)}, {"n": np.int64(2)}]
    await c.add("plain", ["a", "b"], np.eye(2), meta)
    k: Any = np.int64(2)  # e.g. min(10, array.size)
    ef: Any = np.int32(8)
    hits = await c.search("plain", [1.0, 0.0], k=k, ef=ef)
    assert [h.id for h in hits] == ["a", "b"]
    hits = await c.search("plain", [1.0, 0.0], k=2, filter={"n": np.int64(2)})
    assert [h.id for h in hits] == ["b"]


@pytest.mark.parametrize("catalog", [SHARDED, {"docs": {"kind": "index", "shards": 1}}])
async def test_deleting_no_ids_is_refused_before_anything_is_written(
    catalog: dict[str, dict[str, Any]],
) -> None:
    c = _Workers(dict(catalog))
    with pytest.raises(ValueError, match="nothing to delete"):
        await c.delete("docs", [])
    assert c.sent("delete") == []


@pytest.mark.parametrize("topic", ["other.replies", "lhv.commands", "lhv.replies.bad name"])
def test_a_reply_topic_no_worker_would_answer_on_is_refused_when_the_client_is_made(
    topic: str,
) -> None:
    with pytest.raises(ValueError, match=r"matching .lhv\.replies\.\*."):
        LhvClient("127.0.0.1:1", reply_topic=topic)
    LhvClient("127.0.0.1:1", reply_topic="lhv.replies.mine")
    LhvClient("127.0.0.1:1", reply_topic="x.mine", topics=TopicsConfig(reply_pattern="x.*"))
