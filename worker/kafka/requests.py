"""Request/reply over Kafka: `ReplyChannel`, the one core the Python client and the
worker's gatherer share.

A channel owns a reply topic of its own (created on `start()` when missing, deleted on
`stop()` only when this channel created it and was not told to keep it), a producer of
requests, and a group-less consumer assigned to every partition of the reply topic from
its end (positions fixed before any request is sent, so no reply of this run is missed
and none of an earlier run is read). A reader task hands each reply to the future waiting
for its correlation id: the `kafka_correlationId` header, or the record key when the
header is absent.

The caller registers with `expect(cid)` before sending (a reply can come before the
delivery report), removes the registration with `forget(cid)` whatever happens, and
decodes replies with its own `decode` (run by the reader for a reply someone waits for;
what it raises is that call's error). `on_reply` sees the correlation id of every reply,
claimed or not (the client counts the late answers of hedged-out requests with it).

If the reader fails, the failure is kept (`failure`), waiting calls get
`Internal("the reply reader failed: ...")`, and later sends raise it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError

from lhv_index.errors import Internal, NotReady
from worker.kafka.admin import create_topics
from worker.kafka.config import KafkaConfig
from worker.kafka.errors import KafkaTopicError
from worker.kafka.shutdown import stop_consumer
from worker.wire.headers import CORRELATION_ID

__all__ = ["ReplyChannel", "ReplyRecord"]

log = logging.getLogger(__name__)

R = TypeVar("R")


class ReplyRecord(Protocol):
    """What the reader needs of a consumed reply."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


def _fail_all(futures: Sequence[asyncio.Future[Any]], exc: BaseException | None) -> None:
    """Fail the futures not done yet with `exc`; None: cancel them."""
    for fut in futures:
        if fut.done():
            continue
        if exc is None:
            fut.cancel()
        else:
            fut.set_exception(exc)


class ReplyChannel(Generic[R]):
    """A reply topic of one's own, a producer and the reader of the replies (module
    docstring).

    Arguments:
        kafka: connection settings.
        reply_topic: the topic replies come to (one partition when created here).
        decode: a reply record -> what its waiting future gets; an exception it raises
            becomes that future's error.
        producer_options: the producer's settings (acks, partitioner, ...), as the
            caller needs them; the connection settings come from `kafka`.
        keep_topic: never delete the reply topic (one named from a stable identity is
            kept for the next run).
        on_reply: called with the correlation id of every reply read, claimed or not.
        name: the reader task's name.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        reply_topic: str,
        *,
        decode: Callable[[ReplyRecord], R],
        producer_options: Mapping[str, Any],
        keep_topic: bool = False,
        on_reply: Callable[[bytes], None] | None = None,
        name: str = "lhv-replies",
    ) -> None:
        self._kafka = kafka
        self.reply_topic = reply_topic
        self._decode = decode
        self._producer_options = dict(producer_options)
        self._keep_topic = keep_topic
        self._on_reply = on_reply
        self._name = name
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self.waiting: dict[bytes, asyncio.Future[R]] = {}
        """correlation id -> the future its reply goes to"""
        self.failure: BaseException | None = None
        """why the reader stopped, if it failed"""
        self.created_topic = False
        """this channel created the reply topic (and deletes it on stop)"""

    @property
    def started(self) -> bool:
        return self._producer is not None and self._reader is not None

    async def start(self) -> None:
        """Create the reply topic if missing, connect, and start reading from its end.

        Raises:
            TopicCreationFailed: the reply topic is missing and could not be created.
        """
        kw = self._kafka.client_kwargs()
        await self._ensure_topic(kw)
        self._producer = AIOKafkaProducer(**kw, **self._producer_options)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **kw, enable_auto_commit=False, auto_offset_reset="latest"
        )
        await self._consumer.start()
        # waits until the metadata of a topic just created is known
        async with asyncio.timeout(self._kafka.request_timeout_ms / 1000):
            parts = await self._producer.partitions_for(self.reply_topic)
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # fixes the position before any request is sent
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name=self._name)

    async def _ensure_topic(self, kw: dict[str, Any]) -> None:
        admin = AIOKafkaAdminClient(**kw)
        await admin.start()
        try:
            if self.reply_topic not in await admin.list_topics():
                created = await create_topics(admin, {self.reply_topic: 1})
                self.created_topic = self.reply_topic in created
        finally:
            await admin.close()

    async def stop_reading(self, closed: BaseException | None = None) -> None:
        """Stop the reader; waiting futures get `closed` (None: they are cancelled)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self.fail_waiting(closed)

    async def stop(self, closed: BaseException | None = None) -> None:
        """`stop_reading(closed)`, then close the clients and delete the reply topic if
        this channel created it (and keeps none). Idempotent; fine after a failed start."""
        await self.stop_reading(closed)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await stop_consumer(consumer)
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
        if self.created_topic and not self._keep_topic:
            self.created_topic = False
            admin = AIOKafkaAdminClient(**self._kafka.client_kwargs())
            try:
                await admin.start()
                await admin.delete_topics([self.reply_topic])
            except Exception as exc:
                log.info("reply topic %s not deleted: %s", self.reply_topic, exc)
            finally:
                await admin.close()

    def fail_waiting(self, exc: BaseException | None) -> None:
        """Every waiting future gets `exc` (None: cancelled); none stays registered."""
        waiting, self.waiting = self.waiting, {}
        _fail_all(list(waiting.values()), exc)

    def check(self) -> None:
        """Raises `Internal` if the reader failed."""
        if self.failure is not None:
            raise Internal(f"the reply reader failed: {self.failure!r}")

    def expect(self, correlation_id: bytes) -> asyncio.Future[R]:
        """Register for the reply carrying `correlation_id`; call it before sending."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.waiting[correlation_id] = fut
        return fut

    def forget(self, correlation_id: bytes) -> None:
        """Remove the registration (its future, if still open, is cancelled)."""
        fut = self.waiting.pop(correlation_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def send(
        self,
        topic: str,
        *,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]],
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one record; returns aiokafka's delivery future (its `RecordMetadata`).

        Raises:
            NotReady: the channel is not started (or stopped).
            Internal: the reader failed.
            KafkaTopicError: `topic` does not exist.
        """
        producer = self._producer
        if producer is None:
            raise NotReady(f"the reply channel of {self.reply_topic} is not started")
        self.check()
        try:
            delivery: asyncio.Future[Any] = await producer.send(
                topic, key=key, value=value, headers=list(headers), partition=partition
            )
        except UnknownTopicOrPartitionError as exc:
            raise KafkaTopicError(
                f"topic {topic!r} does not exist on Kafka: check LHV_COMMANDS_TOPIC and "
                "LHV_SEARCH_TOPIC (--commands-topic, --search-topic), or create the topics "
                "(`lhv stack up` does)"
            ) from exc
        return delivery

    async def _read(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for rec in records:
                        self.deliver(rec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the reply reader of %s failed", self.reply_topic)
            self.failure = exc
            self.fail_waiting(Internal(f"the reply reader failed: {exc!r}"))

    def deliver(self, rec: ReplyRecord) -> None:
        """Hand one reply to the future waiting for its correlation id, decoded; a reply
        nobody waits for (timed out, forgotten, or not ours) is dropped."""
        cid = dict(rec.headers or ()).get(CORRELATION_ID, rec.key)
        if cid is None:
            return
        fut = self.waiting.pop(cid, None)
        if self._on_reply is not None:
            self._on_reply(cid)
        if fut is None or fut.done():
            return
        try:
            reply = self._decode(rec)
        except Exception as exc:
            fut.set_exception(exc)
            return
        fut.set_result(reply)
