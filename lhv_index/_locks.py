"""A readers-writer lock: queries share it, writes and serialization hold it alone.

hnswlib gives spurious errors when adds run beside queries and crashes when `resize_index`
runs beside one, so every engine call is made under this lock. Writers are preferred: once
a writer waits, new readers queue behind it, so a stream of queries cannot starve `apply`.
Not reentrant: a thread must not take it again while holding it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RWLock"]


class RWLock:
    """Shared/exclusive lock with writer preference."""

    __slots__ = ("_cond", "_readers", "_waiting_writers", "_writer")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers and self._waiting_writers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
