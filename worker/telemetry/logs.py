"""Logging for the worker: a contextvar filter so every line carries where it happened.

`log_context(partition=3, offset=1200)` binds keys for the current asyncio task (and the
threads it hands work to via `asyncio.to_thread`, which copies the context). Every record
logged inside gets them as attributes, and both formatters print them. Vectors, metadata
and credentials are never logged.

`setup_logging` is the one setup of every `lhv` command, the worker's and the CLI's. It
keeps the client libraries' loggers at WARNING whatever `--log-level` says: at DEBUG,
aiokafka logs every request it sends, SASL authentication bytes included (with SASL/PLAIN
they hold the password). `LHV_LOG_KAFKA_WIRE=1` asks for those wire-level lines; they are
then logged with the SASL payloads redacted. Whatever the levels, `RedactSecrets` replaces
SASL payloads and every password handed to aiokafka (`install_redaction`) in any line that
would carry one.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

__all__ = [
    "CONTEXT_KEYS",
    "KAFKA_WIRE_ENV",
    "ContextFilter",
    "JsonFormatter",
    "RedactSecrets",
    "install_redaction",
    "log_context",
    "setup_logging",
]

#: the keys a log line carries when they are bound
CONTEXT_KEYS = ("partition", "index", "offset", "correlation_id", "worker")

#: the variable that lets aiokafka log at the root level (requests and responses)
KAFKA_WIRE_ENV = "LHV_LOG_KAFKA_WIRE"
#: libraries whose DEBUG lines are wire dumps: kept at WARNING unless asked for
_NOISY = ("aiokafka", "botocore", "aiobotocore", "kafka")
#: aiokafka's loggers that log requests, responses and SASL steps
_KAFKA_WIRE_LOGGERS = ("aiokafka.conn", "aiokafka.client")
#: what a secret is replaced with
REDACTED = "***"
#: shorter secrets are left to the structural redaction (masking every "ab" in every line
#: would garble the logs and hide nothing)
_MIN_SECRET_CHARS = 4

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


class RedactSecrets(logging.Filter):
    """Masks secrets in a record before any handler sees it.

    Two passes: arguments that carry SASL bytes (aiokafka's `SaslAuthenticateRequest` and
    `...Response`, whose repr shows `sasl_auth_bytes`: the PLAIN password, a SCRAM proof)
    are replaced by their type and length; then every registered secret in the formatted
    line is replaced by `***`. Never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_carries_sasl(a) for a in args):
            record.args = tuple(_redact_sasl(a) if _carries_sasl(a) else a for a in args)
        secrets = _secrets
        if secrets:
            message = record.getMessage()
            found = [s for s in secrets if s in message]
            if found:
                for secret in found:
                    message = message.replace(secret, REDACTED)
                record.msg, record.args = message, None
        return True


def _carries_sasl(arg: object) -> bool:
    return hasattr(arg, "sasl_auth_bytes")


def _redact_sasl(arg: object) -> str:
    payload = getattr(arg, "sasl_auth_bytes", None) or b""
    return f"{type(arg).__name__}(sasl_auth_bytes=<{len(payload)} bytes redacted>)"


class _QuietSasl(logging.Filter):
    """Drops aiokafka's per-connection SASL lines ("Authenticated as ...", "Sending
    username and password in the clear"): every short-lived CLI client printed them on
    each command. With `LHV_LOG_KAFKA_WIRE=1` they are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Authenticated as", "Sending username and"))


_secrets: tuple[str, ...] = ()
_redactor = RedactSecrets()
_quiet_sasl = _QuietSasl()


def install_redaction(*secrets: str | None) -> None:
    """Mask `secrets` in every line logged through aiokafka's loggers or `setup_logging`'s
    handler, and SASL payloads in aiokafka's request lines. Idempotent; call it before a
    secret is handed to a library that logs."""
    global _secrets
    new = tuple(s for s in secrets if s and len(s) >= _MIN_SECRET_CHARS and s not in _secrets)
    if new:
        _secrets = (*_secrets, *new)
    for name in _KAFKA_WIRE_LOGGERS:
        logger = logging.getLogger(name)
        if _redactor not in logger.filters:
            logger.addFilter(_redactor)


def setup_logging(
    level: str = "INFO", *, json: bool = False, kafka_wire: bool | None = None
) -> None:
    """Configure the root logger for the `lhv` process (every command calls it once).

    Arguments:
        level: the root level (`--log-level`, `LHV_LOG_LEVEL`); an unknown name is INFO.
        json: one JSON object per line (`LHV_LOG_JSON=1`).
        kafka_wire: let aiokafka log at `level` too, SASL payloads redacted; None reads
            `LHV_LOG_KAFKA_WIRE`. Off, aiokafka and botocore stay at WARNING.
    """
    if kafka_wire is None:
        kafka_wire = os.environ.get(KAFKA_WIRE_ENV, "") not in ("", "0")
    install_redaction()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(_redactor)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelName(level.upper()) if _known_level(level) else logging.INFO)
    for noisy in _NOISY:
        wire = kafka_wire and noisy == "aiokafka"
        logging.getLogger(noisy).setLevel(root.level if wire else max(logging.WARNING, root.level))
    conn = logging.getLogger("aiokafka.conn")
    if kafka_wire:
        conn.removeFilter(_quiet_sasl)
    elif _quiet_sasl not in conn.filters:
        conn.addFilter(_quiet_sasl)


def _known_level(name: str) -> bool:
    return isinstance(logging.getLevelName(name.upper()), int)
