"""`LhvClient`: produce commands and ask queries over Kafka, in one line each.

    async with LhvClient("127.0.0.1:9092") as c:
        await c.create("docs", dim=128, space="cosine")
        w = await c.add("docs", ids, vectors)            # returns where the writes landed
        hits = await c.search("docs", q, k=10, after=w)  # read-your-writes, no sleeps

Writes return a `WriteResult` with their partition and last offset; passing it as `after=`
makes the query wait until the worker applied it. Queries and acknowledged commands use
Spring-style request/reply headers; the client reads its own reply topic (created on
start, removed on stop when it made it) and routes replies to waiting calls by
correlation id. A reply with `status: "error"` raises the `LhvError` subclass its code
names, the same class the worker raised.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from lhv_index.errors import LhvError, error_for_code
from worker.config import KafkaConfig, TopicsConfig

__all__ = ["Hit", "LhvClient", "WriteResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Where a write landed: pass it as `after=` to read your own writes."""

    partition: int
    offset: int
    """the offset of the last record written"""
    records: int = 1
    ack: Mapping[str, Any] | None = None
    """the worker's acknowledgement, when it was asked for"""


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    distance: float
    metadata: dict[str, Any] | None = None


def encode_vector(vector: Any) -> str:
    """base64 of little-endian float32, the compact wire form of a vector."""
    arr = np.ascontiguousarray(np.asarray(vector, dtype="<f4").reshape(-1))
    return base64.b64encode(arr.tobytes()).decode("ascii")


class LhvClient:
    """An async client for LHV's command and search topics.

    Arguments:
        bootstrap_servers: Kafka to talk to (ignored when `kafka` is given).
        reply_topic: where replies come; default `lhv.replies.<random>`, created on start.
        timeout_s: default wait for a reply.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        kafka: KafkaConfig | None = None,
        topics: TopicsConfig | None = None,
        reply_topic: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._kafka = kafka or KafkaConfig(bootstrap_servers=bootstrap_servers or "127.0.0.1:9092")
        self._topics = topics or TopicsConfig()
        prefix = self._topics.reply_pattern.rstrip("*")
        self.reply_topic = reply_topic or f"{prefix}{uuid.uuid4().hex[:12]}"
        self._created_reply_topic = False
        self.timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._state = "unopened"

    async def __aenter__(self) -> LhvClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._state != "unopened":
            raise RuntimeError(f"client cannot start: it is {self._state}")
        self._state = "opened"
        kw = self._kafka.client_kwargs()
        await self._ensure_reply_topic(kw)
        self._producer = AIOKafkaProducer(
            **kw,
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
            max_request_size=16 * 1024 * 1024,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **kw, enable_auto_commit=False, auto_offset_reset="latest"
        )
        await self._consumer.start()
        for _ in range(100):  # a topic just created needs a moment to have a leader
            if self.reply_topic in await self._consumer.topics() and (
                self._consumer.partitions_for_topic(self.reply_topic)
            ):
                break
            await asyncio.sleep(0.1)
        tp = TopicPartition(self.reply_topic, 0)
        self._consumer.assign([tp])
        await self._consumer.seek_to_end(tp)
        await self._consumer.position(tp)  # fixes the position before any request is sent
        self._reader = asyncio.create_task(self._read_replies(), name="lhv-client-replies")

    async def _ensure_reply_topic(self, kw: dict[str, Any]) -> None:
        admin = AIOKafkaAdminClient(**kw)
        await admin.start()
        try:
            existing = await admin.list_topics()
            if self.reply_topic not in existing:
                resp = await admin.create_topics(
                    [NewTopic(self.reply_topic, num_partitions=1, replication_factor=1)]
                )
                for topic, code, *rest in resp.topic_errors:
                    if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS
                        raise LhvError(f"cannot create reply topic {topic}: error {code} {rest}")
                self._created_reply_topic = True
        finally:
            await admin.close()

    async def stop(self) -> None:
        """Close; waiting calls fail with `CancelledError`. Idempotent."""
        if self._state != "opened":
            self._state = "closed"
            return
        self._state = "closed"
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._created_reply_topic:
            admin = AIOKafkaAdminClient(**self._kafka.client_kwargs())
            try:
                await admin.start()
                await admin.delete_topics([self.reply_topic])
            except Exception as exc:
                log.debug("could not delete reply topic %s: %s", self.reply_topic, exc)
            finally:
                await admin.close()

    async def _read_replies(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    cid = dict(rec.headers or ()).get("kafka_correlationId", rec.key)
                    fut = self._waiting.pop(cid, None) if cid is not None else None
                    if fut is None or fut.done():
                        continue
                    try:
                        fut.set_result(orjson.loads(rec.value))
                    except orjson.JSONDecodeError as exc:
                        fut.set_exception(LhvError(f"undecodable reply: {exc}"))

    # -- plumbing ------------------------------------------------------------------------

    @property
    def _p(self) -> AIOKafkaProducer:
        if self._producer is None or self._state != "opened":
            raise RuntimeError("client is not started")
        return self._producer

    async def _send(
        self, topic: str, index: str, body: dict[str, Any], *, reply: bool
    ) -> tuple[asyncio.Future[Any], asyncio.Future[dict[str, Any]] | None]:
        """Queue one record; returns its delivery future and, with `reply`, the reply's."""
        headers: list[tuple[str, bytes]] = []
        fut: asyncio.Future[dict[str, Any]] | None = None
        if reply:
            cid = uuid.uuid4().hex.encode()
            fut = asyncio.get_running_loop().create_future()
            self._waiting[cid] = fut
            headers = [
                ("kafka_replyTopic", self.reply_topic.encode()),
                ("kafka_correlationId", cid),
            ]
        delivery = await self._p.send(
            topic,
            key=index.encode(),
            value=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
            headers=headers,
        )
        return delivery, fut

    async def _await_reply(
        self, fut: asyncio.Future[dict[str, Any]], timeout_s: float | None
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                reply = await fut
        except TimeoutError:
            fut.cancel()
            raise
        if reply.get("status") == "error":
            err = reply.get("error") or {}
            raise error_for_code(str(err.get("code", "internal")), str(err.get("message", "")))
        return reply

    async def command(
        self, index: str, body: dict[str, Any], *, ack: bool, timeout_s: float | None = None
    ) -> WriteResult:
        """Produce one command; with `ack`, wait for the worker to apply it (or raise)."""
        body = {"index": index, **body}
        delivery, fut = await self._send(self._topics.commands, index, body, reply=ack)
        meta = await delivery
        reply = await self._await_reply(fut, timeout_s) if fut is not None else None
        return WriteResult(partition=meta.partition, offset=meta.offset, ack=reply)

    # -- commands ------------------------------------------------------------------------

    async def create(
        self,
        index: str,
        *,
        dim: int,
        space: str = "cosine",
        engine: str = "hnsw",
        ack: bool = True,
        **params: Any,
    ) -> WriteResult:
        return await self.command(
            index,
            {"op": "create", "dim": dim, "space": space, "engine": engine, **params},
            ack=ack,
        )

    async def drop(self, index: str, *, ack: bool = True) -> WriteResult:
        return await self.command(index, {"op": "drop"}, ack=ack)

    async def add(
        self,
        index: str,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        version: int | None = None,
        batch_size: int = 1000,
        ack: bool = False,
    ) -> WriteResult:
        """Upsert items, `batch_size` per record; returns where the last record landed.

        With `ack`, waits for every record to be applied and raises the first error.
        """
        vecs = np.asarray(vectors, dtype="<f4")
        if vecs.ndim != 2 or len(vecs) != len(ids):
            raise ValueError("vectors must be a 2-D array with one row per id")
        results: list[Any] = []
        for start in range(0, len(ids), batch_size):
            items = []
            for i in range(start, min(start + batch_size, len(ids))):
                item: dict[str, Any] = {"id": ids[i], "vector_b64": encode_vector(vecs[i])}
                if metadata is not None and metadata[i] is not None:
                    item["metadata"] = metadata[i]
                if version is not None:
                    item["version"] = version
                items.append(item)
            results.append(
                await self._send(
                    self._topics.commands,
                    index,
                    {"op": "add", "index": index, "items": items},
                    reply=ack,
                )
            )
        if not results:
            raise ValueError("nothing to add")
        metas = await asyncio.gather(*(delivery for delivery, _ in results))
        last_ack = None
        for _delivery, fut in results:
            if fut is not None:
                last_ack = await self._await_reply(fut, None)
        meta = metas[-1]
        return WriteResult(
            partition=meta.partition, offset=meta.offset, records=len(results), ack=last_ack
        )

    async def delete(
        self, index: str, ids: Iterable[str], *, version: int | None = None, ack: bool = False
    ) -> WriteResult:
        body: dict[str, Any] = {"op": "delete", "ids": list(ids)}
        if version is not None:
            body["version"] = version
        return await self.command(index, body, ack=ack)

    async def merge(
        self, index: str, dest: str, *, clear_source: bool = False, ack: bool = True
    ) -> WriteResult:
        return await self.command(
            index, {"op": "merge", "dest": dest, "clear_source": clear_source}, ack=ack
        )

    # -- queries -------------------------------------------------------------------------

    async def query(
        self,
        index: str,
        body: dict[str, Any],
        *,
        after: WriteResult | None = None,
        min_offset: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send one query and return its reply (raises the reply's error)."""
        body = {"index": index, **body}
        if after is not None:
            min_offset = max(min_offset or -1, after.offset)
        if min_offset is not None:
            body["min_offset"] = min_offset
        delivery, fut = await self._send(self._topics.search, index, body, reply=True)
        assert fut is not None
        await delivery
        return await self._await_reply(fut, timeout_s)

    async def search(
        self,
        index: str,
        vector: Any,
        k: int = 10,
        *,
        ef: int | None = None,
        filter: Mapping[str, Any] | None = None,
        include_metadata: bool = False,
        after: WriteResult | None = None,
        min_offset: int | None = None,
        timeout_s: float | None = None,
    ) -> list[Hit]:
        body: dict[str, Any] = {"op": "search", "vector_b64": encode_vector(vector), "k": k}
        if ef is not None:
            body["ef"] = ef
        if filter:
            body["filter"] = dict(filter)
        if include_metadata:
            body["include_metadata"] = True
        reply = await self.query(
            index, body, after=after, min_offset=min_offset, timeout_s=timeout_s
        )
        return [Hit(h["id"], float(h["distance"]), h.get("metadata")) for h in reply["hits"]]

    async def get(
        self,
        index: str,
        ids: Sequence[str],
        *,
        include_vectors: bool = True,
        include_metadata: bool = True,
        after: WriteResult | None = None,
        timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        reply = await self.query(
            index,
            {
                "op": "get",
                "ids": list(ids),
                "include_vectors": include_vectors,
                "include_metadata": include_metadata,
            },
            after=after,
            timeout_s=timeout_s,
        )
        return list(reply["items"])

    async def stats(
        self, index: str, *, after: WriteResult | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        return await self.query(index, {"op": "stats"}, after=after, timeout_s=timeout_s)
