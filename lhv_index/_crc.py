"""crc32 over large buffers: the two halves in parallel threads, joined by `crc32_combine`.

zlib releases the GIL while it checksums a large buffer, so two threads give two cores'
worth of checksum. Python's zlib has no `crc32_combine`; this is zlib's own algorithm
(1.2.12+): multiply crc1 by x^(8 * len2) modulo the CRC polynomial, then add crc2.
"""

from __future__ import annotations

import threading
import zlib

__all__ = ["PARALLEL_BYTES", "crc32", "crc32_combine"]

#: buffers at least this large are checksummed in two threads
PARALLEL_BYTES = 8 << 20
#: the CRC-32 polynomial, bit-reflected
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the polynomial (bit-reflected, as zlib's `multmodp`)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    """x^(2^k) modulo the polynomial, k = 0 .. 31."""
    out, p = [], 1 << 30  # x^1
    for _ in range(32):
        out.append(p)
        p = _multmodp(p, p)
    return out


_X2N = _powers()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the polynomial."""
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The crc32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ crc2


def crc32(data: memoryview | bytes) -> int:
    """`zlib.crc32(data)`, computed in two threads when `data` is large."""
    n = len(data)
    if n < PARALLEL_BYTES:
        return zlib.crc32(data)
    half = n // 2
    view = memoryview(data)
    with view[:half] as head, view[half:] as tail:
        box: list[int] = []
        worker = threading.Thread(target=lambda: box.append(zlib.crc32(tail)), daemon=True)
        worker.start()
        try:
            first = zlib.crc32(head)
        finally:
            worker.join()
    return crc32_combine(first, box[0], n - half)
