"""The client's spreading and hedging over the owners' and the replicas' search topics,
with the two copies played in memory: each call gets exactly one answer, whichever copy
is slow or dead."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from worker.client.client import LhvClient, _Sent
from worker.wire.headers import CORRELATION_ID
from worker.wire.topics import TopicsConfig

TOPICS = TopicsConfig()
OWNERS, REPLICAS = TOPICS.search, TOPICS.replica_search


@dataclass
class _Reply:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class TwoCopies(LhvClient):
    """An `LhvClient` whose requests go to two copies played here: `delay_s[topic]` is
    how long that copy takes to answer (None: it never does)."""

    def __init__(self, delay_s: dict[str, float | None], **kw: Any) -> None:
        kw.setdefault("hedge_after_ms", 50)
        kw.setdefault("resolve_names", False)  # plain names: no describe first
        super().__init__("127.0.0.1:1", replicas=True, timeout_s=2.0, reply_grace_s=0.0, **kw)
        self.delay_s = delay_s
        self.sent: list[tuple[str, bytes]] = []
        self._state = "opened"
        self._producer = object()  # type: ignore[assignment]

    async def _send(
        self, topic: str, index: str, body: dict[str, Any], *, reply: bool, batch: bool = False
    ) -> _Sent:
        loop = asyncio.get_running_loop()
        cid = uuid.uuid4().hex.encode()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[cid] = fut
        if batch:
            self._batch_cids.add(cid)
        self.sent.append((topic, cid))
        delay = self.delay_s[topic]
        if delay is not None:
            answer = self.answer(topic, index, body)
            loop.call_later(
                delay,
                self._deliver,
                _Reply(cid, orjson.dumps(answer), [(CORRELATION_ID, cid)]),
            )
        delivery: asyncio.Future[Any] = loop.create_future()
        delivery.set_result(None)
        return _Sent(delivery, cid, fut)

    def answer(self, topic: str, index: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok", "hits": [{"id": topic, "distance": 0.0}]}


class ShardedCopies(TwoCopies):
    """`docs` is sharded in two; each member answers with a hit named for it."""

    def answer(self, topic: str, index: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("op") == "describe":
            return {"status": "ok", "kind": "sharded", "shards": 2, "index": index}
        distance = 0.5 if index.endswith("#1") else 0.25
        return {"status": "ok", "hits": [{"id": f"{index} via {topic}", "distance": distance}]}


async def test_a_query_to_a_dead_copy_is_answered_by_the_other_after_the_hedge() -> None:
    client = TwoCopies({OWNERS: None, REPLICAS: 0.0})
    hits = await client.search("docs", [1.0, 2.0], k=1)
    assert [h.id for h in hits] == [REPLICAS]
    assert [topic for topic, _ in client.sent] == [OWNERS, REPLICAS]
    assert client.hedged == 1
    assert client.pending == 0 and not client._waiting


async def test_the_first_answer_wins_and_the_later_one_is_dropped() -> None:
    client = TwoCopies({OWNERS: 0.3, REPLICAS: 0.0})
    reply = await client.stats("docs")
    assert reply["hits"][0]["id"] == REPLICAS, "the hedge answered first"
    await asyncio.sleep(0.4)  # the slow copy's answer arrives, to nobody
    assert client.late_answers == 1
    assert not client._waiting


async def test_queries_alternate_between_the_copies_and_fast_ones_are_not_hedged() -> None:
    client = TwoCopies({OWNERS: 0.0, REPLICAS: 0.0})
    for _ in range(4):
        await client.stats("docs")
    assert [topic for topic, _ in client.sent] == [OWNERS, REPLICAS, OWNERS, REPLICAS]
    assert client.hedged == 0


async def test_concurrent_searches_are_each_answered_once_when_one_copy_is_dead() -> None:
    client = TwoCopies({OWNERS: 0.0, REPLICAS: None}, coalesce_searches=False)
    results = await asyncio.gather(*(client.search("docs", [1.0, float(i)]) for i in range(32)))
    assert all([h.id for h in hits] == [OWNERS] for hits in results)
    assert client.hedged == 16, "the half sent to the dead copy went to the other"
    assert not client._waiting


async def test_a_query_neither_copy_answers_times_out_and_leaves_nothing_behind() -> None:
    client = TwoCopies({OWNERS: None, REPLICAS: None})
    with pytest.raises(TimeoutError):
        await client.stats("docs", timeout_s=0.2)
    assert len(client.sent) == 2
    assert not client._waiting and client.pending == 0


async def test_without_hedging_a_query_goes_to_one_copy_only() -> None:
    client = TwoCopies({OWNERS: None, REPLICAS: 0.0}, hedge_after_ms=None)
    with pytest.raises(TimeoutError):
        await client.stats("docs", timeout_s=0.2)
    assert [topic for topic, _ in client.sent] == [OWNERS]


async def test_each_replica_topic_takes_its_turn_and_hedges_go_to_the_next_copy() -> None:
    second = "lhv.search.replicas2"
    client = TwoCopies(
        {OWNERS: 0.0, REPLICAS: None, second: 0.0}, replica_topics=[REPLICAS, second]
    )
    for _ in range(3):
        await client.stats("docs")
    assert [topic for topic, _ in client.sent] == [OWNERS, REPLICAS, second, second]
    assert client.hedged == 1


async def test_each_member_query_of_a_sharded_search_is_hedged_on_its_own() -> None:
    client = ShardedCopies(
        {OWNERS: None, REPLICAS: 0.0}, resolve_names=True, coalesce_searches=False
    )
    hits = await client.search("docs", [1.0, 2.0], k=2)
    assert [h.id for h in hits] == [f"docs#0 via {REPLICAS}", f"docs#1 via {REPLICAS}"]
    asked = [topic for topic, _ in client.sent]
    assert asked.count(REPLICAS) == 3, "describe and both members answered by the replicas"
    assert client.hedged == asked.count(OWNERS) >= 1, "each query the owners got was hedged"
    assert not client._waiting
