"""Logging for the worker: a contextvar filter so every line carries where it happened.

`log_context(partition=3, offset=1200)` binds keys for the current asyncio task (and the
threads it hands work to via `asyncio.to_thread`, which copies the context). Every record
logged inside gets them as attributes, and both formatters print them. Vectors, metadata
and credentials are never logged.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

__all__ = ["CONTEXT_KEYS", "ContextFilter", "JsonFormatter", "log_context", "setup_logging"]

#: the keys a log line carries when they are bound
CONTEXT_KEYS = ("partition", "index", "offset", "correlation_id", "worker")

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("lhv_log_context")


@contextmanager
def log_context(**kw: Any) -> Iterator[None]:
    """Bind keys for every log line inside the block; restores the previous keys on exit."""
    current = _context.get({})
    token = _context.set({**current, **{k: v for k, v in kw.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bound() -> dict[str, Any]:
    """The keys bound in this task now."""
    return dict(_context.get({}))


class ContextFilter(logging.Filter):
    """Copies the bound keys onto each record (as attributes and as `record.lhv`).

    Context keys passed as `extra=` win over the bound ones and are printed too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get({})
        extra = {k: record.__dict__[k] for k in CONTEXT_KEYS if record.__dict__.get(k) is not None}
        record.lhv = {**ctx, **extra} if extra else ctx
        for key, value in ctx.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the bound keys, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "lhv", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = getattr(record, "lhv", {})
        if ctx:
            line += " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]"
        return line


def setup_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Configure the root logger once for the `lhv` process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "botocore", "aiobotocore", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
