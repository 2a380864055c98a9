"""A plain query keyed by a sharded name (or an alias) is gathered by its home's search
server: sub-queries to every member, one merged reply with the original correlation id;
a member that does not answer is named (or, when allowed, the answer is flagged partial);
gathers are bounded.

The server runs on in-memory ports (test_search_server's stand-ins); its sub-queries are
looped back into the same server as search records, their replies back to the gatherer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson
from test_search_server import REPLY_TOPIC, Record, Replies, StandInWorker

from lhv_index import Clock, EngineKind, Index, IndexParams, Space, Upsert
from worker.service.config import QueryPolicy
from worker.service.gather import Gatherer, GatherTarget
from worker.service.partition import Partition
from worker.service.search import SearchServer
from worker.wire.headers import CORRELATION_ID, ReplyTo
from worker.wire.shards import shard_of

SHARDS = 4
GATHER_TOPIC = "lhv.replies.gather-unit"


class Loopback:
    """`RequestPort`: a sub-query goes into the same search server as a search record;
    replies to `GATHER_TOPIC` come back here. Members in `down` never get theirs."""

    reply_topic = GATHER_TOPIC

    def __init__(self) -> None:
        self.server: SearchServer | None = None
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.down: set[str] = set()
        self.sent: list[dict[str, Any]] = []
        self.offset = 1000

    def expect(self, correlation_id: bytes) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[correlation_id] = fut
        return fut

    def forget(self, correlation_id: bytes) -> None:
        fut = self.waiting.pop(correlation_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def send(self, topic: str, *, key: bytes, value: bytes, headers: Any) -> None:
        self.sent.append(orjson.loads(value))
        if key.decode() in self.down:
            return
        self.offset += 1
        assert self.server is not None
        self.server.submit(0, [Record(self.offset, key, value, list(headers))])

    def deliver(self, correlation_id: bytes, value: bytes) -> None:
        fut = self.waiting.pop(correlation_id, None)
        if fut is not None and not fut.done():
            fut.set_result(value)


class RoutedReplies(Replies):
    def __init__(self, loop: Loopback) -> None:
        super().__init__()
        self.loop = loop

    async def send(self, reply_to: ReplyTo, value: bytes, **kw: Any) -> bool:
        if reply_to.topic == GATHER_TOPIC:
            self.loop.deliver(reply_to.correlation_id, value)
            return True
        return await super().send(reply_to, value, **kw)


def _members(part: Partition, items: dict[str, list[float]]) -> None:
    params = IndexParams(dim=2, space=Space.L2, engine=EngineKind.EXACT)
    for s in range(SHARDS):
        part.indexes[f"big#{s}"] = Index(f"big#{s}", params)
    for n, (id_, vec) in enumerate(items.items()):
        member = part.indexes[f"big#{shard_of(id_, SHARDS)}"]
        member.apply([Upsert(id=id_, vector=vec, metadata={"n": n}, clock=Clock(0, 1, n))])


def _targets(part: Partition, name: str) -> GatherTarget | None:
    return {
        "big": GatherTarget("big", SHARDS),
        "live": GatherTarget("big", alias="live"),
        "chain": GatherTarget("live", alias="chain"),
    }.get(name)


def _rig(
    policy: QueryPolicy | None = None, *, max_reply_bytes: int | None = None
) -> tuple[StandInWorker, SearchServer, Loopback]:
    from test_search_server import real_index

    worker = StandInWorker(real_index(), queries=policy)
    loop = Loopback()
    worker.replies = RoutedReplies(loop)
    gatherer = Gatherer(
        search_topic="lhv.search",
        requests=loop,
        targets=_targets,
        policy=worker.config.queries,
        query_wait_ms=worker.config.query_wait_ms,
        max_reply_bytes=max_reply_bytes,
    )
    server = worker.server()
    server._gatherer = gatherer
    loop.server = server
    return worker, server, loop


ITEMS = {f"id{i:03d}": [float(i % 7), float(i % 5)] for i in range(120)}


def _ask(offset: int, cid: bytes, index: str = "big", **body: Any) -> Record:
    value = orjson.dumps({"index": index, **body})
    headers = [("kafka_replyTopic", REPLY_TOPIC.encode()), (CORRELATION_ID, cid)]
    return Record(offset, index.encode(), value, headers)


def _exact(q: list[float], k: int) -> list[tuple[float, str]]:
    dists = ((float(np.sum((np.asarray(v) - q) ** 2)), i) for i, v in ITEMS.items())
    return sorted(dists)[:k]


async def test_a_plain_search_of_a_sharded_name_gets_one_merged_exact_answer() -> None:
    worker, server, loop = _rig()
    _members(worker.partitions[0], ITEMS)
    server.submit(0, [_ask(1, b"one", vector=[3.0, 2.0], k=9, include_metadata=True)])
    server.submit(0, [_ask(2, b"many", vectors=[[0.0, 0.0], [6.0, 4.0]], k=4)])
    await worker.replies.wait_for([b"one", b"many"])
    one = worker.replies.sent[b"one"]
    assert len(one) == 1 and one[0]["status"] == "ok" and one[0]["correlation_id"] == "one"
    assert [(h["distance"], h["id"]) for h in one[0]["hits"]] == _exact([3.0, 2.0], 9)
    assert all(h["metadata"]["n"] == int(h["id"][2:]) for h in one[0]["hits"])
    assert one[0]["index"] == "big"
    many = worker.replies.sent[b"many"][0]["results"]
    for row, q in zip(many, ([0.0, 0.0], [6.0, 4.0]), strict=True):
        assert list(zip(row["distances"], row["ids"], strict=True)) == _exact(q, 4)
    assert {b["index"] for b in loop.sent} == {f"big#{s}" for s in range(SHARDS)}


async def test_get_and_stats_of_a_sharded_name_and_a_search_by_alias_are_gathered_one_hop() -> None:
    worker, server, loop = _rig()
    _members(worker.partitions[0], ITEMS)
    server.submit(0, [_ask(1, b"get", op="get", ids=["id007", "nope", "id100", "id007"])])
    server.submit(0, [_ask(2, b"stats", op="stats")])
    server.submit(0, [_ask(3, b"alias", "live", vector=[0.0, 0.0], k=3)])
    server.submit(0, [_ask(4, b"chain", "chain", vector=[0.0, 0.0], k=3)])
    await worker.replies.wait_for([b"get", b"stats", b"alias", b"chain"])
    got = worker.replies.sent[b"get"][0]
    assert [i["id"] for i in got["items"]] == ["id007", "id100", "id007"]
    stats = worker.replies.sent[b"stats"][0]
    assert stats["count"] == len(ITEMS) and len(stats["shards"]) == SHARDS
    alias = worker.replies.sent[b"alias"][0]
    assert alias["index"] == "live"
    assert [(h["distance"], h["id"]) for h in alias["hits"]] == _exact([0.0, 0.0], 3)
    assert alias["correlation_id"] == "alias"
    chain = worker.replies.sent[b"chain"][0]  # an alias of an alias is never followed
    assert (
        chain["error"]["code"] == "invalid_request" and "alias chain" in chain["error"]["message"]
    )
    asked = [b for b in loop.sent if b["op"] == "get"]
    for body in asked:
        assert all(f"big#{shard_of(i, SHARDS)}" == body["index"] for i in body["ids"])


async def test_a_member_that_does_not_answer_is_named_or_flagged_when_partial_is_allowed() -> None:
    worker, server, loop = _rig()
    _members(worker.partitions[0], ITEMS)
    loop.down.add("big#1")
    deadline = int(time.time() * 1000) + 300
    server.submit(0, [_ask(1, b"strict", vector=[0.0, 0.0], k=3, deadline_ms=deadline)])
    server.submit(
        0,
        [_ask(2, b"loose", vector=[0.0, 0.0], k=200, deadline_ms=deadline, allow_partial=True)],
    )
    await worker.replies.wait_for([b"strict", b"loose"])
    strict = worker.replies.sent[b"strict"][0]
    assert strict["status"] == "error" and strict["error"]["code"] == "deadline_exceeded"
    assert "[1]" in strict["error"]["message"]
    loose = worker.replies.sent[b"loose"][0]
    assert loose["status"] == "ok" and loose["partial"] is True and loose["missing_shards"] == [1]
    assert {h["id"] for h in loose["hits"]} == {i for i in ITEMS if shard_of(i, SHARDS) != 1}
    assert not loop.waiting  # nothing left registered


async def test_gathers_over_the_bound_are_answered_not_ready_at_once() -> None:
    worker, server, loop = _rig(QueryPolicy(max_gathers_per_partition=1))
    _members(worker.partitions[0], ITEMS)
    loop.down.add("big#0")
    deadline = int(time.time() * 1000) + 500
    server.submit(0, [_ask(1, b"first", vector=[0.0, 0.0], deadline_ms=deadline)])
    await asyncio.sleep(0.05)
    server.submit(0, [_ask(2, b"second", vector=[0.0, 0.0], deadline_ms=deadline)])
    await worker.replies.wait_for([b"second"])
    assert worker.replies.sent[b"second"][0]["error"]["code"] == "not_ready"
    assert b"first" not in worker.replies.sent
    await worker.replies.wait_for([b"first"])
    assert worker.replies.sent[b"first"][0]["error"]["code"] == "deadline_exceeded"


async def test_when_no_sub_query_can_be_sent_the_query_gets_not_ready() -> None:
    worker, server, loop = _rig()
    _members(worker.partitions[0], ITEMS)

    async def refuse(topic: str, *, key: bytes, value: bytes, headers: Any) -> None:
        raise RuntimeError("no producer")

    loop.send = refuse  # type: ignore[method-assign]
    server.submit(0, [_ask(1, b"q", vector=[0.0, 0.0])])
    await worker.replies.wait_for([b"q"])
    assert worker.replies.sent[b"q"][0]["error"]["code"] == "not_ready"
    assert not loop.waiting


def test_a_static_member_names_its_gather_topic_from_its_identity_others_per_run() -> None:
    from worker.service.config import WorkerConfig
    from worker.service.worker import _gather_topic
    from worker.storage.blobstore import S3Config

    s3 = S3Config(bucket="b")
    static = WorkerConfig(s3=s3, group_id="lhv", group_instance_id="node/1", worker_id="a")
    again = WorkerConfig(s3=s3, group_id="lhv", group_instance_id="node/1", worker_id="b")
    assert _gather_topic(static) == _gather_topic(again) == "lhv.replies.gather-lhv-node-1"
    other_group = WorkerConfig(s3=s3, group_id="g2", group_instance_id="node/1")
    assert _gather_topic(other_group) != _gather_topic(static)
    plain = WorkerConfig(s3=s3, group_id="lhv", worker_id="host-1")
    first, second = _gather_topic(plain), _gather_topic(plain)
    assert first != second and first.startswith("lhv.replies.gather-host-1-")


async def test_a_relayed_query_whose_old_target_is_gone_is_relayed_to_the_switched_target() -> None:
    worker, server, loop = _rig()
    _members(worker.partitions[0], ITEMS)
    where = {"moved": GatherTarget("gone", alias="moved")}

    def targets(part: Partition, name: str) -> GatherTarget | None:
        return where.get(name) or _targets(part, name)

    assert server._gatherer is not None
    server._gatherer._targets = targets
    send = loop.send

    async def switch_then_send(topic: str, *, key: bytes, value: bytes, headers: Any) -> None:
        if key == b"gone":  # switched (and "gone" dropped) while this query is on its way
            where["moved"] = GatherTarget("big", alias="moved")
        await send(topic, key=key, value=value, headers=headers)

    loop.send = switch_then_send  # type: ignore[method-assign]
    server.submit(0, [_ask(1, b"moved", "moved", vector=[0.0, 0.0], k=3)])
    await worker.replies.wait_for([b"moved"])
    moved = worker.replies.sent[b"moved"][0]
    assert moved["status"] == "ok" and moved["index"] == "moved", moved
    assert [(h["distance"], h["id"]) for h in moved["hits"]] == _exact([0.0, 0.0], 3)
    assert [b["index"] for b in loop.sent if b.get("via_alias") == "moved"] == ["gone", "big"]
    # an alias whose target is simply missing still says so
    where["nowhere"] = GatherTarget("missing", alias="nowhere")
    server.submit(0, [_ask(3, b"missing", "nowhere", vector=[0.0, 0.0], k=3)])
    await worker.replies.wait_for([b"missing"])
    missing = worker.replies.sent[b"missing"][0]
    assert missing["error"]["code"] == "index_not_found", missing


async def test_member_replies_held_by_gathers_are_bounded_and_given_back() -> None:
    """`max_gather_bytes` bounds the members' replies all gathers hold: a search whose
    replies alone pass it is refused `invalid_request` naming the setting; one that
    finds it passed by another gather's replies is answered `not_ready`; every byte is
    given back when a gather ends."""
    worker, server, loop = _rig()
    _members(worker.partitions[0], ITEMS)
    sizes: list[int] = []
    deliver = loop.deliver

    def counted(correlation_id: bytes, value: bytes) -> None:
        sizes.append(len(value))
        deliver(correlation_id, value)

    loop.deliver = counted  # type: ignore[method-assign]
    server.submit(0, [_ask(1, b"probe", vector=[0.0, 0.0], k=120, include_metadata=True)])
    await worker.replies.wait_for([b"probe"])
    total = sum(sizes)  # the four members' replies to such a search (took_ms varies)

    worker, server, loop = _rig(QueryPolicy(max_gather_bytes=total // 2))
    _members(worker.partitions[0], ITEMS)
    gatherer = server._gatherer
    assert gatherer is not None
    server.submit(0, [_ask(1, b"big", vector=[0.0, 0.0], k=120, include_metadata=True)])
    await worker.replies.wait_for([b"big"])
    big = worker.replies.sent[b"big"][0]
    assert big["error"]["code"] == "invalid_request", big
    assert "LHV_MAX_GATHER_BYTES" in big["error"]["message"]
    assert "index 'big'" in big["error"]["message"]
    server.submit(0, [_ask(2, b"small", vector=[0.0, 0.0], k=3)])
    await worker.replies.wait_for([b"small"])
    small = worker.replies.sent[b"small"][0]
    assert [(h["distance"], h["id"]) for h in small["hits"]] == _exact([0.0, 0.0], 3)
    assert gatherer.held_bytes == 0

    # big#0 never answers: the first gather holds the other three replies until its deadline
    worker, server, loop = _rig(QueryPolicy(max_gather_bytes=total))
    _members(worker.partitions[0], ITEMS)
    gatherer = server._gatherer
    assert gatherer is not None
    loop.down.add("big#0")
    deadline = int(time.time() * 1000) + 3000
    ask = {"vector": [0.0, 0.0], "k": 120, "include_metadata": True, "allow_partial": True}
    server.submit(0, [_ask(1, b"first", deadline_ms=deadline, **ask)])
    for _ in range(100):
        if gatherer.held_bytes >= total // 2:
            break
        await asyncio.sleep(0.01)
    server.submit(0, [_ask(2, b"second", deadline_ms=deadline, **ask)])
    await worker.replies.wait_for([b"second"])
    second = worker.replies.sent[b"second"][0]
    assert second["error"]["code"] == "not_ready", second
    assert b"first" not in worker.replies.sent
    await worker.replies.wait_for([b"first"])
    first = worker.replies.sent[b"first"][0]
    assert first["status"] == "ok" and first["missing_shards"] == [0], first
    assert {h["id"] for h in first["hits"]} == {i for i in ITEMS if shard_of(i, SHARDS) != 0}
    assert gatherer.held_bytes == 0


async def test_a_gathered_search_holds_one_members_parsed_reply_not_all_of_them() -> None:
    """Metadata of small objects weighs about 20 times its bytes once parsed. The home
    folds each member's reply into the best hits so far and lets it go, so a search of 16
    members of 300 KB each holds about one of them parsed (before: all 16, ~100 MB)."""
    import tracemalloc

    worker, server, _ = _rig()
    shards = 16
    fat = {"a": [[]] * 10_000}  # 30 KB of JSON, about 0.6 MB parsed
    params = IndexParams(dim=2, space=Space.L2, engine=EngineKind.EXACT)
    members = [Index(f"fat#{s}", params) for s in range(shards)]
    for n in range(10 * shards):
        id_ = f"f{n}"
        member = members[shard_of(id_, shards)]
        member.apply([Upsert(id=id_, vector=[float(n), 0.0], metadata=fat, clock=Clock(0, 1, n))])
    for member in members:
        worker.partitions[0].indexes[member.name] = member
    assert server._gatherer is not None
    server._gatherer._targets = lambda part, name: GatherTarget("fat", shards)
    tracemalloc.start()
    try:
        server.submit(0, [_ask(1, b"fat", "fat", vector=[0.0, 0.0], k=10, include_metadata=True)])
        await worker.replies.wait_for([b"fat"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reply = worker.replies.sent[b"fat"][0]
    assert [h["id"] for h in reply["hits"]] == [f"f{n}" for n in range(10)]
    assert all(h["metadata"] == fat for h in reply["hits"])
    assert peak < 40 * 2**20, f"{peak} bytes traced"


async def test_a_gathered_get_whose_items_are_over_one_reply_is_refused_before_decoding() -> None:
    """The merged reply of a `get` holds every member's items, so members' items over one
    reply record are refused as the unsharded `get` refuses them, naming the size."""
    worker, server, _ = _rig(max_reply_bytes=2000)
    _members(worker.partitions[0], ITEMS)
    every = sorted(ITEMS)
    server.submit(0, [_ask(1, b"all", op="get", ids=every, include_vectors=True)])
    server.submit(0, [_ask(2, b"two", op="get", ids=["id001", "id100"])])
    await worker.replies.wait_for([b"all", b"two"])
    refused = worker.replies.sent[b"all"][0]["error"]
    assert refused["code"] == "invalid_request"
    assert "bytes for one reply record" in refused["message"], refused
    assert "ask for less" in refused["message"]
    two = worker.replies.sent[b"two"][0]
    assert [item["id"] for item in two["items"]] == ["id001", "id100"]


async def test_a_gather_whose_own_replies_would_pass_the_bound_is_refused_not_told_to_retry() -> (
    None
):
    """The bound can be passed while another gather holds replies too. A gather whose own
    replies, at the size of those in so far, would pass it alone gets `invalid_request`
    (a retry could never succeed); one that would fit alone gets `not_ready`."""
    from lhv_index.errors import InvalidRequest, NotReady
    from worker.service.gather import _Arrivals

    gatherer = _rig(QueryPolicy(max_gather_bytes=1000))[1]._gatherer
    assert gatherer is not None
    target = GatherTarget("big", 4)
    loop = asyncio.get_running_loop()
    for size, expected in ((300, InvalidRequest), (200, NotReady)):
        gatherer._held.bytes = 500  # another gather's replies
        futures: list[asyncio.Future[bytes]] = [loop.create_future() for _ in range(4)]
        arrivals = _Arrivals(gatherer._held, futures)
        for fut in futures:
            fut.set_result(b"x" * size)
            await asyncio.sleep(0)  # the arrival is counted
            if arrivals.over:
                break
        assert arrivals.over and arrivals.bytes <= 1000
        error = gatherer._over(target, arrivals)
        assert type(error) is expected, (size, error)
        arrivals.release()
        assert gatherer.held_bytes == 500
