"""A lenient reader of Kafka record batches (message format v2), for records the Kafka
client cannot parse.

aiokafka decodes every header key as UTF-8 while it parses a fetched batch, and one key
that is not UTF-8 makes the whole fetch raise. Kafka itself treats header keys as
strings but does not check them, so any producer can write such a record. This reader
parses the same bytes without decoding anything: keys, values and header keys stay
bytes, and a record whose structure is broken is reported as unreadable instead of
failing its batch. The worker reads a failed fetch again with it (`worker.service.intake`).

Format (KIP-98): a batch is a 61-byte header (`DefaultRecordBase.HEADER_STRUCT`, reused
from aiokafka) then the records, compressed as a whole with the codec in the attributes.
Each record is a varint length, then attributes, timestamp delta, offset delta, key,
value and headers, with varint (zigzag) lengths and -1 for null.

Only magic 2 is read; older batches (magic 0/1) never carry headers, so aiokafka reads
them without this failure. Inflating is bounded with the worker's decoders
(`worker.service.inflate`, `max_inflated_bytes`): a batch that inflates past it is unreadable as
a whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from aiokafka.record.default_records import DefaultRecordBase
from aiokafka.record.util import calc_crc32c

from worker.service.inflate import Decoder, InflateLimitExceeded, bounded_decoders

__all__ = [
    "RawBatch",
    "RawRecord",
    "UnreadableRecord",
    "drop_aborted",
    "read_batches",
]

_HEADER = DefaultRecordBase.HEADER_STRUCT
_LENGTH_END = DefaultRecordBase.AFTER_LEN_OFFSET  # base offset + length: 12 bytes
_ATTRIBUTES_AT = DefaultRecordBase.ATTRIBUTES_OFFSET
_MAGIC_AT = 16
_CODEC_MASK = DefaultRecordBase.CODEC_MASK
_CONTROL_MASK = DefaultRecordBase.CONTROL_MASK
_LOG_APPEND_TIME_MASK = DefaultRecordBase.TIMESTAMP_TYPE_MASK
_TRANSACTIONAL_MASK = DefaultRecordBase.TRANSACTIONAL_MASK


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record, exactly as stored: nothing decoded (header keys may not be UTF-8)."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[bytes, bytes | None], ...]

    @property
    def header_keys_are_utf8(self) -> bool:
        try:
            for k, _ in self.headers:
                k.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class UnreadableRecord:
    """A record (or the rest of a batch, from `offset` on) whose structure cannot be
    parsed."""

    offset: int
    error: str
    raw: bytes
    """the record's bytes (or the batch's, when the batch cannot be read), for the DLQ"""


@dataclass(slots=True)
class RawBatch:
    """One record batch: its offsets and its records, readable or not."""

    base_offset: int
    next_offset: int
    """the offset after the batch's last record (compaction may leave gaps)"""
    is_control: bool
    records: list[RawRecord | UnreadableRecord] = field(default_factory=list)
    producer_id: int = -1
    is_transactional: bool = False
    aborts: bool = False
    """a control batch holding an abort marker (its transaction's records are void)"""


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def varint(self) -> int:
        """A zigzag varint (Kafka's varint and varlong)."""
        shift = 0
        raw = 0
        while True:
            if self.pos >= len(self.buf):
                raise ValueError("varint runs past the end")
            b = self.buf[self.pos]
            self.pos += 1
            raw |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise ValueError("varint longer than 10 bytes")
        return (raw >> 1) ^ -(raw & 1)

    def sized(self) -> bytes | None:
        n = self.varint()
        if n < 0:
            return None
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"field of {n} bytes runs past the end")
        out = self.buf[self.pos : end]
        self.pos = end
        return out


def read_batches(data: bytes, *, max_inflated_bytes: int) -> list[RawBatch]:
    """Every complete batch in `data` (a fetch response's record set), in order.

    A trailing partial batch (a fetch cut at its byte limit) is left out. Never raises for
    bad bytes: a batch that cannot be read as a whole (bad CRC, unknown magic, corrupt or
    oversized compression) holds one `UnreadableRecord` at its base offset, and each
    record whose structure is broken is an `UnreadableRecord` of its own. A record whose
    only fault is a header key that is not UTF-8 is a `RawRecord`: the caller decides.
    """
    out: list[RawBatch] = []
    pos = 0
    while pos + _LENGTH_END <= len(data):
        length = int.from_bytes(data[pos + 8 : pos + 12], "big", signed=True)
        end = pos + _LENGTH_END + length
        if length < 0 or end > len(data):
            break  # partial
        out.append(_read_batch(data[pos:end], max_inflated_bytes))
        pos = end
    return out


def _read_batch(buf: bytes, max_inflated_bytes: int) -> RawBatch:
    base_offset = int.from_bytes(buf[0:8], "big", signed=True)
    if len(buf) < _HEADER.size or buf[_MAGIC_AT] != 2:
        return _unreadable(base_offset, base_offset + 1, buf, "not a record batch of magic 2")
    (
        _base,
        _length,
        _epoch,
        _magic,
        crc,
        attributes,
        last_delta,
        first_ts,
        max_ts,
        producer_id,
        _pepoch,
        _seq,
        count,
    ) = _HEADER.unpack_from(buf)
    batch = RawBatch(
        base_offset,
        base_offset + last_delta + 1,
        bool(attributes & _CONTROL_MASK),
        producer_id=producer_id,
        is_transactional=bool(attributes & _TRANSACTIONAL_MASK),
    )
    if calc_crc32c(buf[_ATTRIBUTES_AT:]) != crc:
        return _unreadable(base_offset, batch.next_offset, buf, "record batch CRC mismatch")
    try:
        body = _inflate(buf[_HEADER.size :], attributes & _CODEC_MASK, max_inflated_bytes)
    except Exception as exc:
        return _unreadable(
            base_offset, batch.next_offset, buf, f"record batch cannot be decompressed: {exc}"
        )
    log_append = bool(attributes & _LOG_APPEND_TIME_MASK)
    cur = _Cursor(body)
    for _ in range(max(count, 0)):
        start = cur.pos
        try:
            length = cur.varint()
            if length < 0 or cur.pos + length > len(body):
                raise ValueError(f"record length {length} runs past the batch")
        except ValueError as exc:
            # The rest of the batch cannot be delimited: one unreadable record for it.
            batch.records.append(
                UnreadableRecord(
                    _next_offset(batch, base_offset),
                    f"record cannot be parsed: {exc}",
                    bytes(body[start:]),
                )
            )
            break
        end = cur.pos + length
        raw = bytes(body[start:end])
        try:
            rec = _read_record(
                _Cursor(body[cur.pos : end]),
                base_offset,
                max_ts if log_append else first_ts,
                int(log_append),
                log_append,
            )
        except ValueError as exc:
            offset = _next_offset(batch, base_offset)
            batch.records.append(UnreadableRecord(offset, f"record cannot be parsed: {exc}", raw))
        else:
            batch.records.append(rec)
        cur.pos = end
    if batch.is_control:
        first = batch.records[0] if batch.records else None
        key = first.key if isinstance(first, RawRecord) else None
        # a control record's key: version (int16), type (int16; 0 abort, 1 commit)
        batch.aborts = key is not None and len(key) >= 4 and key[2:4] == b"\x00\x00"
    return batch


def drop_aborted(batches: list[RawBatch], aborted: Sequence[tuple[int, int]]) -> list[RawBatch]:
    """`batches` as a `read_committed` consumer reads them: the records of aborted
    transactions left out (their batches kept, empty, for their offsets).

    `aborted` is the fetch response's list of aborted transactions, (producer id, first
    offset). A transactional batch of a producer whose aborted transaction began at or
    before it is void, up to that producer's abort marker (Kafka's and aiokafka's rule).
    """
    pending = sorted(aborted, key=lambda a: a[1])
    aborting: set[int] = set()
    out: list[RawBatch] = []
    for batch in batches:
        while pending and pending[0][1] <= batch.base_offset:
            aborting.add(pending.pop(0)[0])
        if batch.is_control:
            if batch.aborts:
                aborting.discard(batch.producer_id)
        elif batch.is_transactional and batch.producer_id in aborting:
            batch = RawBatch(batch.base_offset, batch.next_offset, False)
        out.append(batch)
    return out


def _read_record(
    cur: _Cursor, base_offset: int, base_ts: int, ts_type: int, log_append: bool
) -> RawRecord:
    cur.varint()  # attributes: unused in v2
    ts_delta = cur.varint()
    offset_delta = cur.varint()
    key = cur.sized()
    value = cur.sized()
    n_headers = cur.varint()
    if n_headers < 0:
        raise ValueError(f"negative header count {n_headers}")
    headers: list[tuple[bytes, bytes | None]] = []
    for _ in range(n_headers):
        hkey = cur.sized()
        if hkey is None:
            raise ValueError("null header key")
        headers.append((hkey, cur.sized()))
    if cur.pos != len(cur.buf):
        raise ValueError(f"{len(cur.buf) - cur.pos} bytes left after the record's headers")
    return RawRecord(
        offset=base_offset + offset_delta,
        timestamp=base_ts if log_append else base_ts + ts_delta,
        timestamp_type=ts_type,
        key=key,
        value=value,
        headers=tuple(headers),
    )


def _next_offset(batch: RawBatch, base_offset: int) -> int:
    return batch.records[-1].offset + 1 if batch.records else base_offset


def _unreadable(base: int, next_offset: int, buf: bytes, error: str) -> RawBatch:
    return RawBatch(base, next_offset, False, [UnreadableRecord(base, error, bytes(buf))])


#: codec id (batch attributes) -> name of its decoder in `bounded_decoders`
_DECODERS = {
    DefaultRecordBase.CODEC_GZIP: "gzip_decode",
    DefaultRecordBase.CODEC_SNAPPY: "snappy_decode",
    DefaultRecordBase.CODEC_LZ4: "lz4_decode",
    DefaultRecordBase.CODEC_ZSTD: "zstd_decode",
}


@lru_cache(maxsize=4)
def _decoders(limit: int) -> dict[str, Decoder]:
    return bounded_decoders(limit)


def _inflate(data: bytes, codec_id: int, limit: int) -> bytes:
    """The batch's records, decompressed; at most `limit` bytes (ValueError past it)."""
    if codec_id == DefaultRecordBase.CODEC_NONE:
        return data
    name = _DECODERS.get(codec_id)
    if name is None:
        raise ValueError(f"unknown codec {codec_id}")
    try:
        return _decoders(limit)[name](data)
    except InflateLimitExceeded as exc:
        raise ValueError(str(exc)) from exc
