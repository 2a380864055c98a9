"""Bounded inflation of compressed record batches (worker/service/inflate.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from aiokafka.codec import snappy_encode
from aiokafka.record import default_records as py_records
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from worker.service import inflate
from worker.service.inflate import InflateLimitExceeded

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
LIMIT = 256 * 1024


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    inflate.install(LIMIT)
    try:
        yield
    finally:
        inflate.uninstall()


def _batch(codec: int, values: list[bytes]) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=64 << 20,
    )
    for i, value in enumerate(values):
        builder.append(i, timestamp=None, key=b"k", value=value, headers=[("h", b"v")])
    return bytes(builder.build())


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_batch_under_the_bound_is_read_whole(codec: str) -> None:
    values = [bytes([i]) * 10_000 for i in range(5)]
    batch = DefaultRecordBatch(_batch(CODECS[codec], values))
    assert [r.value for r in batch] == values


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_batch_that_inflates_past_the_bound_is_refused_before_it_is_inflated(
    codec: str,
) -> None:
    bomb = _batch(CODECS[codec], [b"\0" * (64 << 20)])
    assert len(bomb) < 4 << 20  # a few MB (or KB) on the wire
    with pytest.raises(InflateLimitExceeded) as caught:
        list(DefaultRecordBatch(bomb))
    assert caught.value.codec == codec and caught.value.limit == LIMIT


def test_the_pure_python_reader_is_bounded_too() -> None:
    bomb = _batch(CODECS["gzip"], [b"\0" * (8 << 20)])
    with pytest.raises(InflateLimitExceeded):
        list(py_records._DefaultRecordBatchPy(bomb))


def test_xerial_snappy_from_the_java_client_is_read_and_bounded() -> None:
    small = b"abc" * 50_000
    framed = snappy_encode(small, xerial_compatible=True, xerial_blocksize=32 * 1024)
    decode = inflate.bounded_decoders(LIMIT)["snappy_decode"]
    assert decode(framed) == small
    big = snappy_encode(b"\0" * (LIMIT * 4), xerial_compatible=True, xerial_blocksize=32 * 1024)
    with pytest.raises(InflateLimitExceeded):
        decode(big)


def test_uninstall_puts_the_unbounded_decoders_back() -> None:
    inflate.uninstall()
    assert inflate.installed_limit() is None
    big = [b"\0" * (LIMIT * 2)]
    assert [r.value for r in DefaultRecordBatch(_batch(CODECS["gzip"], big))] == big
    inflate.install(LIMIT)
    assert inflate.installed_limit() == LIMIT
