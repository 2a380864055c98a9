"""What a runner sends after applying a batch: an ack per record that asked for one, a
dead-letter record per rejected record.

Acks go through the `ReplyPort` to the requester's reply topic (checked against the
reply-topic policy; the reply topics of a batch are looked up together first, so a batch
waits at most once for the topics that do not exist); DLQ records through the `Outbox`, cut to its size bound. A failure
while sending for one record is logged with its partition and offset and counted; it
never ends the runner. An ack of a record replayed after a restore and older than
`DeliveryConfig.ack_replay_max_age_ms` is skipped: its requester stopped waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from lhv_index.errors import LhvError
from worker.service.apply import Outcome
from worker.service.config import DeliveryConfig
from worker.service.outbox import Outbox, fit_dlq_record
from worker.service.partition import Partition
from worker.service.ports import ReplyPort
from worker.telemetry.logs import log_context
from worker.telemetry.metrics import Metrics
from worker.wire.headers import dlq_headers
from worker.wire.limits import MessageLimits
from worker.wire.replies import encode_ack
from worker.wire.topics import ReplyTopicPolicy, TopicsConfig

__all__ = ["Reporter"]

log = logging.getLogger(__name__)

#: a DLQ value larger than this is cut (and hashed) in a thread, not on the event loop
_FIT_IN_THREAD_BYTES = 256 * 1024


class Reporter:
    """Sends the acks and DLQ records of applied batches (module docstring)."""

    def __init__(
        self,
        *,
        topics: TopicsConfig,
        limits: MessageLimits,
        delivery: DeliveryConfig,
        outbox: Outbox,
        replies: ReplyPort,
        reply_policy: ReplyTopicPolicy,
        metrics: Metrics,
    ) -> None:
        self._topics = topics
        self._limits = limits
        self._delivery = delivery
        self._outbox = outbox
        self._replies = replies
        self._reply_policy = reply_policy
        self._metrics = metrics

    async def report(
        self,
        partition: Partition,
        outcomes: list[Outcome],
        *,
        timestamps: dict[int, int] | None = None,
    ) -> None:
        """Send acks and DLQ records for one applied batch. Never raises (cancellation
        aside). `timestamps` (offset -> record timestamp, ms) lets acks of stale replayed
        records be skipped."""
        stamps = timestamps or {}
        # each outcome's ack decided once; their reply topics then looked up together
        plans = [
            (out, self._ack_wanted(partition, out, stamps.get(out.offset))) for out in outcomes
        ]
        await self._replies.look_up(
            out.reply_to.topic for out, ack in plans if ack and out.reply_to is not None
        )
        for out, ack in plans:
            if out.error is None and not ack:
                self._metrics.command_applied(out.op, out.applied)
                continue
            with log_context(partition=partition.number, offset=out.offset):
                try:
                    await self._report_one(partition, out, ack=ack)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._metrics.outgoing_failed("report", "error")
                    log.exception(
                        "sending the DLQ record or ack of a record failed",
                        extra={"partition": partition.number, "offset": out.offset},
                    )

    def _ack_wanted(self, partition: Partition, out: Outcome, timestamp: int | None) -> bool:
        """Whether `out` gets an ack: it names a reply topic, its ack is not left to the
        record it was forwarded as, the reply-topic policy allows the topic (else logged),
        and it is not a stale replay (else counted)."""
        if out.reply_to is None or (out.error is None and out.ack_passed_on):
            return False
        try:
            self._reply_policy.check(out.reply_to.topic)
        except LhvError as exc:
            log.warning(
                "not acking to %r: %s",
                out.reply_to.topic,
                exc,
                extra={
                    "offset": out.offset,
                    "index": out.index or None,
                    "partition": partition.number,
                },
            )
            return False
        if self._stale_replay(partition, out.offset, timestamp):
            # Replayed after a restore and older than the bound: its requester stopped
            # waiting long ago (and usually deleted its reply topic), so re-sending only
            # costs a metadata wait and a warning per record.
            self._metrics.ack_skipped()
            return False
        return True

    async def _report_one(self, partition: Partition, out: Outcome, *, ack: bool) -> None:
        where = (partition.number, out.offset)
        if out.error is not None:
            self._metrics.command_rejected(out.op or "unknown", out.error.code)
            self._metrics.dlq_record()
            log.warning(
                "command rejected (%s): %s",
                out.error.code,
                out.error.message,
                extra={
                    "offset": out.offset,
                    "index": out.index or None,
                    "partition": partition.number,
                },
            )
            await self._send_dlq(partition, out)
        else:
            self._metrics.command_applied(out.op, out.applied)
        if ack:
            assert out.reply_to is not None
            await self._replies.send(out.reply_to, encode_ack(out), kind="ack", where=where)

    def _stale_replay(self, partition: Partition, offset: int, timestamp: int | None) -> bool:
        """An ack not worth sending: the record was in the log before this worker took
        the partition (a replay) and is older than `ack_replay_max_age_ms`."""
        if timestamp is None or timestamp <= 0 or offset > partition.ready_offset:
            return False
        age_ms = time.time() * 1000 - timestamp
        return age_ms > self._delivery.ack_replay_max_age_ms

    async def _send_dlq(self, partition: Partition, out: Outcome) -> None:
        assert out.error is not None
        limits = self._limits
        outbox = self._outbox
        dlq = self._topics.dlq
        error_headers = dlq_headers(out.error, self._topics.commands, partition.number, out.offset)

        def fit() -> Any:
            return fit_dlq_record(
                out.key,
                out.value,
                out.headers,
                error_headers,
                max_record_bytes=outbox.max_record_bytes,
                max_headers=limits.max_headers,
                max_header_bytes=limits.max_header_bytes,
            )

        big = len(out.value or b"") > _FIT_IN_THREAD_BYTES
        record = await asyncio.to_thread(fit) if big else fit()
        where = (partition.number, out.offset)
        if record is None:
            outbox.dropped("dlq", "too_large", dlq, where, "headers alone")
            return
        if record.truncated:
            self._metrics.dlq_cut()
        await outbox.send(
            "dlq",
            dlq,
            key=record.key,
            value=record.value,
            headers=record.headers,
            where=where,
            retry_small=True,
        )
