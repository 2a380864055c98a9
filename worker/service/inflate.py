"""Bounded decompression of fetched record batches.

A compressed record batch is inflated whole by aiokafka before its first record is read,
with no bound: a few KB of gzip (or zstd, whose ratio has no practical limit) can ask for
gigabytes, so one record from any producer could pin or exhaust a worker's memory.
`install(max_inflated_bytes)` replaces the decoders aiokafka's record readers call (its
C readers and its pure-Python ones, for the v2 and legacy formats) with bounded ones:

- each codec writes into a buffer of the bound plus one byte (`cramjam.*.decompress_into`,
  the library aiokafka itself uses for snappy, lz4 and zstd); the buffer's pages are
  only touched as they are written, so what a bomb costs is the bound, never its
  inflated size;
- a batch that would inflate past the bound raises `InflateLimitExceeded`, which the
  worker's poll confines to that batch's records (they are dead-lettered, the partition
  moves on);
- snappy batches from the Java client use xerial framing: each block's inflated length
  is read from its header and summed before any block is inflated.

It also makes lz4, snappy and zstd batches readable at all: without `cramjam`, aiokafka
raises `NotImplementedError` for them, and one such record from kcat or a Java producer
would stop the partition.

The bound applies per batch (what aiokafka inflates at once), so it must be at least the
largest record value the worker accepts (`MessageLimits.max_message_bytes`) plus its
framing; `WorkerConfig` checks that.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from typing import Any

import cramjam
import numpy as np

__all__ = ["InflateLimitExceeded", "bounded_decoders", "install", "installed_limit", "uninstall"]

#: xerial snappy framing, as the Java client writes it (aiokafka.codec)
_XERIAL_HEADER = b"\x82SNAPPY\x00"
_XERIAL_HEADER_BYTES = 16

#: aiokafka modules whose record readers call the decoders by module-global name
_READERS = (
    "aiokafka.record._crecords.default_records",
    "aiokafka.record._crecords.legacy_records",
    "aiokafka.record.default_records",
    "aiokafka.record.legacy_records",
)

_installed: int | None = None
#: aiokafka's own decoders, by (module, name), as found before the first `install`
_originals: dict[tuple[str, str], Decoder] = {}


Decoder = Callable[[Any], bytes]


class InflateLimitExceeded(ValueError):
    """A compressed record batch inflates past the configured bound."""

    def __init__(self, codec: str, limit: int) -> None:
        super().__init__(f"a {codec} record batch inflates past {limit} bytes")
        self.codec = codec
        self.limit = limit


def _into(codec: str, decompress_into: Callable[[Any, Any], int], limit: int) -> Decoder:
    def decode(payload: Any) -> bytes:
        out = np.empty(limit + 1, dtype=np.uint8)
        try:
            n = int(decompress_into(bytes(payload), out))
        except cramjam.DecompressionError as exc:
            if "whole buffer" in str(exc):
                raise InflateLimitExceeded(codec, limit) from None
            raise
        if n > limit:
            raise InflateLimitExceeded(codec, limit)
        return out[:n].tobytes()

    decode.__name__ = f"{codec}_decode"
    return decode


def _snappy(limit: int) -> Decoder:
    def raw(block: memoryview | bytes, budget: int) -> bytes:
        size = int(cramjam.snappy.decompress_raw_len(bytes(block)))
        if size > budget:
            raise InflateLimitExceeded("snappy", limit)
        return bytes(cramjam.snappy.decompress_raw(bytes(block)))

    def decode(payload: Any) -> bytes:
        data = memoryview(bytes(payload))
        if len(data) <= _XERIAL_HEADER_BYTES or bytes(data[:8]) != _XERIAL_HEADER:
            return raw(data, limit)
        blocks: list[memoryview] = []
        total = 0
        cursor = _XERIAL_HEADER_BYTES
        while cursor < len(data):
            (size,) = struct.unpack_from("!i", data, cursor)
            cursor += 4
            block = data[cursor : cursor + size]
            cursor += size
            total += int(cramjam.snappy.decompress_raw_len(bytes(block)))
            if total > limit:
                raise InflateLimitExceeded("snappy", limit)
            blocks.append(block)
        return b"".join(raw(b, limit) for b in blocks)

    decode.__name__ = "snappy_decode"
    return decode


def bounded_decoders(limit: int) -> dict[str, Decoder]:
    """The decoders aiokafka's readers call, each refusing to inflate past `limit` bytes."""
    if limit < 1:
        raise ValueError("the inflate bound must be at least 1 byte")
    return {
        "gzip_decode": _into("gzip", cramjam.gzip.decompress_into, limit),
        "zstd_decode": _into("zstd", cramjam.zstd.decompress_into, limit),
        "lz4_decode": _into("lz4", cramjam.lz4.decompress_into, limit),
        "snappy_decode": _snappy(limit),
    }


def install(max_inflated_bytes: int) -> None:
    """Bound every batch aiokafka inflates in this process to `max_inflated_bytes`.

    Process-wide (aiokafka's readers are module-level); idempotent for the same bound,
    and a later call with another bound replaces it. Legacy (magic 0/1) lz4 keeps
    aiokafka's own reader: no current client writes it.
    """
    global _installed
    decoders = bounded_decoders(max_inflated_bytes)
    for name in _READERS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # the C readers are optional in aiokafka
            continue
        for attr, fn in decoders.items():
            if attr in vars(module):
                _originals.setdefault((name, attr), getattr(module, attr))
                setattr(module, attr, fn)
    _installed = max_inflated_bytes


def uninstall() -> None:
    """Put aiokafka's own (unbounded) decoders back."""
    global _installed
    for (name, attr), fn in _originals.items():
        setattr(importlib.import_module(name), attr, fn)
    _installed = None


def installed_limit() -> int | None:
    """The bound in force in this process, or None when `install` was not called."""
    return _installed
