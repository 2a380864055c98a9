"""The lenient record-batch reader: it reads what aiokafka reads, and what aiokafka cannot
(header keys that are not UTF-8) without failing the batch; broken bytes become
unreadable records, never exceptions. Also pins the aiokafka behaviour the intake relies
on."""

from __future__ import annotations

import zlib

import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED, PartitionRecords
from aiokafka.record.memory_records import MemoryRecords
from workerkit import RawRecord as Out
from workerkit import control_record, encode_batch

from worker.service.intake import _partition_in_traceback
from worker.service.recordbatch import RawRecord, UnreadableRecord, drop_aborted, read_batches

LIMIT = 1 << 20


def with_base(batch: bytes, base: int) -> bytes:
    """The batch as the broker stores it, at base offset `base`."""
    return base.to_bytes(8, "big") + batch[8:]


def aiokafka_records(
    data: bytes, fetch_offset: int = 0, aborted: list[tuple[int, int]] | None = None
) -> list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """What aiokafka's consumer reads of `data`: `read_uncommitted`, or with `aborted`
    (the fetch response's aborted transactions), `read_committed`."""
    tp = TopicPartition("t", 0)
    level = READ_UNCOMMITTED if aborted is None else READ_COMMITTED
    parts = PartitionRecords(
        tp, MemoryRecords(data), aborted or [], fetch_offset, None, None, True, level
    )
    return [(r.offset, r.key, r.value, list(r.headers)) for r in parts]


GOOD = [
    Out(b"k1", b"v1", ((b"a", b"1"), (b"b", None))),
    Out(None, b"v2"),
    Out(b"k3", None, ((b"\xc3\xa9t\xc3\xa9", b""),)),
]


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_reads_valid_batches_as_aiokafka_does(compression: str | None) -> None:
    data = with_base(encode_batch(GOOD, compression=compression), 10) + with_base(
        encode_batch(GOOD[:1]), 13
    )
    ours = [
        (r.offset, r.key, r.value, [(k.decode(), v) for k, v in r.headers])
        for b in read_batches(data, max_inflated_bytes=LIMIT)
        for r in b.records
        if isinstance(r, RawRecord)
    ]
    assert ours == aiokafka_records(data, 10)
    assert [b.next_offset for b in read_batches(data, max_inflated_bytes=LIMIT)] == [13, 14]


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_non_utf8_header_key_fails_aiokafka_but_not_the_lenient_reader(
    compression: str | None,
) -> None:
    poison = Out(b"k", b"bad", ((b"\xff\xfe", b"x"), (b"ok", b"y")))
    data = with_base(encode_batch([GOOD[0], poison, GOOD[1]], compression=compression), 5)
    with pytest.raises((UnicodeDecodeError, Exception)) as err:
        aiokafka_records(data, 5)
    assert _partition_in_traceback(err.value) == TopicPartition("t", 0)
    (batch,) = read_batches(data, max_inflated_bytes=LIMIT)
    first, bad, last = batch.records
    assert isinstance(first, RawRecord) and first.header_keys_are_utf8 and first.offset == 5
    assert isinstance(bad, RawRecord) and not bad.header_keys_are_utf8 and bad.offset == 6
    assert bad.headers == ((b"\xff\xfe", b"x"), (b"ok", b"y")) and bad.value == b"bad"
    assert isinstance(last, RawRecord) and last.offset == 7


def test_a_trailing_partial_batch_is_left_for_the_next_fetch() -> None:
    whole = with_base(encode_batch(GOOD), 0)
    data = whole + with_base(encode_batch(GOOD), 3)[:-7]
    assert [b.base_offset for b in read_batches(data, max_inflated_bytes=LIMIT)] == [0]


def test_a_batch_with_a_bad_crc_is_one_unreadable_record() -> None:
    data = bytearray(with_base(encode_batch(GOOD), 20))
    data[-1] ^= 0xFF
    (batch,) = read_batches(bytes(data), max_inflated_bytes=LIMIT)
    (rec,) = batch.records
    assert isinstance(rec, UnreadableRecord) and rec.offset == 20 and "CRC" in rec.error
    assert batch.next_offset == 23 and rec.raw == bytes(data)


def test_a_batch_inflating_past_the_bound_is_unreadable() -> None:
    big = Out(b"k", b" " * (2 * LIMIT))
    (batch,) = read_batches(encode_batch([big], compression="gzip"), max_inflated_bytes=LIMIT)
    (rec,) = batch.records
    assert isinstance(rec, UnreadableRecord) and "inflates past" in rec.error


def test_a_record_with_broken_structure_is_unreadable_and_its_neighbours_are_read() -> None:
    # A record whose header count claims more headers than its bytes hold: the record's
    # own length still delimits it, so the records after it are read.
    import struct

    from aiokafka.record.default_records import DefaultRecordBase
    from aiokafka.record.util import calc_crc32c

    data = bytearray(encode_batch([GOOD[1], Out(b"k", b"v"), GOOD[1]]))
    body = DefaultRecordBase.HEADER_STRUCT.size
    first_len = data[body]  # small varint: one byte
    second = body + 1 + (first_len >> 1)
    second_len = data[second] >> 1
    headers_count_at = second + second_len  # the last byte of the record: its header count
    data[headers_count_at] = 2 << 1  # claims 2 headers, holds none
    struct.pack_into(
        ">I",
        data,
        DefaultRecordBase.CRC_OFFSET,
        calc_crc32c(data[DefaultRecordBase.ATTRIBUTES_OFFSET :]),
    )
    (batch,) = read_batches(bytes(data), max_inflated_bytes=LIMIT)
    kinds = [type(r).__name__ for r in batch.records]
    assert kinds == ["RawRecord", "UnreadableRecord", "RawRecord"]
    assert "record cannot be parsed" in batch.records[1].error  # type: ignore[union-attr]


def test_garbage_never_raises() -> None:
    import random

    rng = random.Random(4)
    valid = with_base(encode_batch(GOOD, compression="gzip"), 0)
    for _ in range(300):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        read_batches(bytes(data), max_inflated_bytes=LIMIT)
    assert zlib  # the gzip path ran


def test_aborted_transactions_are_left_out_as_a_read_committed_consumer_does() -> None:
    """Producers 7 and 8 write transactions side by side: 7 aborts its first and commits
    its second, 8 commits; a plain producer writes between them. The lenient reader with
    `drop_aborted` hands on exactly what aiokafka's `read_committed` consumer reads, and
    keeps every batch's offsets (the consumer's position passes the aborted ones)."""

    def txn(pid: int, *values: bytes) -> bytes:
        return encode_batch([Out(b"k", v) for v in values], producer_id=pid, transactional=True)

    def marker(pid: int, *, commit: bool) -> bytes:
        rec = control_record(commit=commit)
        return encode_batch([rec], producer_id=pid, transactional=True, control=True)

    layout = [
        (0, txn(7, b"7a", b"7b")),  # aborted below
        (2, encode_batch([Out(b"k", b"plain")])),
        (3, txn(8, b"8a")),
        (4, txn(7, b"7c")),  # still the aborted transaction
        (5, marker(7, commit=False)),
        (6, marker(8, commit=True)),
        (7, txn(7, b"7d")),  # a new transaction of 7, committed
        (8, marker(7, commit=True)),
        (9, encode_batch([Out(b"k", b"plain2")])),
    ]
    data = b"".join(with_base(batch, base) for base, batch in layout)
    aborted = [(7, 0)]
    batches = drop_aborted(read_batches(data, max_inflated_bytes=LIMIT), aborted)
    ours = [
        (r.offset, r.key, r.value, [(k.decode(), v) for k, v in r.headers])
        for b in batches
        if not b.is_control
        for r in b.records
        if isinstance(r, RawRecord)
    ]
    assert ours == aiokafka_records(data, 0, aborted)
    assert [r[2] for r in ours] == [b"plain", b"8a", b"7d", b"plain2"]
    assert [(b.base_offset, b.next_offset) for b in batches] == [
        (base, base + (2 if base == 0 else 1)) for base, _ in layout
    ]
    assert [b.aborts for b in batches if b.is_control] == [True, False, False]
