"""Worker configuration: small frozen dataclasses, defaults in one place, `from_env()`.

Every setting can come from an `LHV_*` environment variable (the CLI flags override them).
Secrets are kept out of reprs, so a config can be logged.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from lhv_index import Limits as IndexLimits
from worker.blobstore import S3Config, _env
from worker.messages import MessageLimits

__all__ = [
    "CheckpointPolicy",
    "ImportPolicy",
    "KafkaConfig",
    "S3Config",
    "TopicsConfig",
    "WorkerConfig",
    "limits_from_env",
]

_L = TypeVar("_L", MessageLimits, IndexLimits)


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """How to reach Kafka; SASL/SSL settings pass straight through to aiokafka."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "lhv"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_ms: int = 30_000

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's consumer, producer and admin client."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_plain_username
            kw["sasl_plain_password"] = self.sasl_plain_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        return kw

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> KafkaConfig:
        return cls(
            bootstrap_servers=_env(env, "LHV_BOOTSTRAP_SERVERS", "127.0.0.1:9092") or "",
            client_id=_env(env, "LHV_CLIENT_ID", "lhv") or "lhv",
            security_protocol=_env(env, "LHV_SECURITY_PROTOCOL", "PLAINTEXT") or "PLAINTEXT",
            sasl_mechanism=_env(env, "LHV_SASL_MECHANISM"),
            sasl_plain_username=_env(env, "LHV_SASL_USERNAME"),
            sasl_plain_password=_env(env, "LHV_SASL_PASSWORD"),
            ssl_cafile=_env(env, "LHV_SSL_CAFILE"),
            ssl_certfile=_env(env, "LHV_SSL_CERTFILE"),
            ssl_keyfile=_env(env, "LHV_SSL_KEYFILE"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicsConfig:
    """Topic names and the reply-topic pattern (fnmatch style)."""

    commands: str = "lhv.commands"
    search: str = "lhv.search"
    dlq: str = "lhv.commands.dlq"
    reply_pattern: str = "lhv.replies.*"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TopicsConfig:
        d = cls()
        return cls(
            commands=_env(env, "LHV_COMMANDS_TOPIC", d.commands) or d.commands,
            search=_env(env, "LHV_SEARCH_TOPIC", d.search) or d.search,
            dlq=_env(env, "LHV_DLQ_TOPIC", d.dlq) or d.dlq,
            reply_pattern=_env(env, "LHV_REPLY_PATTERN", d.reply_pattern) or d.reply_pattern,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointPolicy:
    """When a partition is checkpointed: whichever comes first, if anything changed.

    Also on revoke and on graceful shutdown, whatever the policy says.
    """

    every_records: int = 50_000
    every_s: float = 30.0
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.every_records < 1 or self.every_s <= 0:
            raise ValueError("checkpoint policy needs every_records >= 1 and every_s > 0")


def limits_from_env(cls: type[_L], env: Mapping[str, str] = os.environ) -> _L:
    """`MessageLimits` or `lhv_index.Limits` with each field read from `LHV_<FIELD>` when
    set (`max_dim` from `LHV_MAX_DIM`, ...); a field both have (`max_dim`, `max_k`,
    `max_id_bytes`, `max_metadata_bytes`) is set in both by one variable."""
    kw: dict[str, int] = {}
    for f in fields(cls):
        value = _env(env, f"LHV_{f.name.upper()}")
        if value is not None:
            kw[f.name] = int(value)
    return cls(**kw)


GIB = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportPolicy:
    """Where `import` may read from and how much one import may make a worker hold.

    Every bound is checked before the bytes it guards are read or allocated (see
    `worker/importsource.py`); going over one rejects the import with `invalid_request`
    naming the bound and its setting.
    """

    sources: tuple[str, ...] | None = None
    """`s3://bucket/prefix/` entries an import may read under (`LHV_IMPORT_SOURCES`,
    comma-separated); None: `s3://<bucket>/<prefix>imports/` of the worker's own store.
    The worker's own checkpoint, merge and key objects are refused whatever this says."""
    max_object_bytes: int = GIB
    """size of one object read (`LHV_MAX_IMPORT_BYTES`), from its Content-Length and
    while reading"""
    max_inflated_bytes: int = GIB
    """arrays of one `.npz`, inflated, in total (`LHV_MAX_IMPORT_INFLATED_BYTES`)"""
    max_compression_ratio: int = 100
    """inflated / compressed size of one `.npz` member (`LHV_MAX_IMPORT_COMPRESSION_RATIO`)"""
    max_members: int = 16
    """members of one `.npz` (`LHV_MAX_IMPORT_MEMBERS`)"""

    def __post_init__(self) -> None:
        for name in ("max_object_bytes", "max_inflated_bytes", "max_compression_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImportPolicy.{name} must be at least 1")
        if self.max_members < 1:
            raise ValueError("ImportPolicy.max_members must be at least 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ImportPolicy:
        kw: dict[str, Any] = {}
        sources = _env(env, "LHV_IMPORT_SOURCES")
        if sources is not None:
            kw["sources"] = tuple(s.strip() for s in sources.split(",") if s.strip())
        for name, var in _IMPORT_INT_SETTINGS.items():
            value = _env(env, var)
            if value is not None:
                kw[name] = int(value)
        return cls(**kw)


_IMPORT_INT_SETTINGS = {
    "max_object_bytes": "LHV_MAX_IMPORT_BYTES",
    "max_inflated_bytes": "LHV_MAX_IMPORT_INFLATED_BYTES",
    "max_compression_ratio": "LHV_MAX_IMPORT_COMPRESSION_RATIO",
    "max_members": "LHV_MAX_IMPORT_MEMBERS",
}

#: integer settings of `WorkerConfig` read from the environment
_INT_SETTINGS = {
    "metrics_port": "LHV_METRICS_PORT",
    "session_timeout_ms": "LHV_SESSION_TIMEOUT_MS",
    "rebalance_timeout_ms": "LHV_REBALANCE_TIMEOUT_MS",
    "max_poll_records": "LHV_MAX_POLL_RECORDS",
    "max_pending_bytes": "LHV_MAX_PENDING_BYTES",
    "max_batch_bytes": "LHV_MAX_BATCH_BYTES",
    "query_wait_ms": "LHV_QUERY_WAIT_MS",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """Everything a `Worker` needs."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    s3: S3Config
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    limits: MessageLimits = field(default_factory=MessageLimits)
    index_limits: IndexLimits = field(default_factory=IndexLimits)
    imports: ImportPolicy = field(default_factory=ImportPolicy)
    #: the key(s) that authenticate internal merge records (`LHV_INTERNAL_KEY`,
    #: comma-separated: the first signs, every one verifies); None: the random key kept
    #: in the workers' own bucket and prefix (see `worker/protocol_auth.py`)
    internal_key: str | None = field(default=None, repr=False)
    group_id: str = "lhv"
    #: Kafka static membership (KIP-345): a worker restarted with the same id takes its
    #: partitions back at once instead of after the session timeout; unique per worker
    group_instance_id: str | None = None
    #: identifies this process in manifests and logs
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    #: serve partitions whose log no longer holds the records after their checkpoint
    accept_data_loss: bool = False
    max_poll_records: int = 5_000
    #: records buffered per partition before it is paused (backpressure)
    max_pending_records: int = 20_000
    #: record bytes (values) buffered per partition before it is paused: bounds the
    #: worker's read-ahead when records are large (a 1 000-vector `add` is ~0.7 MB)
    max_pending_bytes: int = 64 * 1024 * 1024
    #: record bytes applied in one batch (at least one poll's records): bounds what is
    #: decoded at once
    max_batch_bytes: int = 16 * 1024 * 1024
    session_timeout_ms: int = 30_000
    rebalance_timeout_ms: int = 120_000
    #: default wait for a query whose partition is not ready and that names no deadline
    query_wait_ms: int = 30_000
    #: port of /metrics, /healthz, /readyz; None disables, 0 picks a free one
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    stall_timeout_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> WorkerConfig:
        """Build from `LHV_*` variables; keyword overrides win."""
        kw: dict[str, Any] = {
            "kafka": KafkaConfig.from_env(env),
            "s3": S3Config.from_env(env),
            "topics": TopicsConfig.from_env(env),
            "imports": ImportPolicy.from_env(env),
            "internal_key": _env(env, "LHV_INTERNAL_KEY"),
            "checkpoint": CheckpointPolicy(
                every_records=int(_env(env, "LHV_CHECKPOINT_RECORDS", "50000") or 50000),
                every_s=float(_env(env, "LHV_CHECKPOINT_SECONDS", "30") or 30),
            ),
            "limits": limits_from_env(MessageLimits, env),
            "index_limits": limits_from_env(IndexLimits, env),
            "group_id": _env(env, "LHV_GROUP_ID", "lhv") or "lhv",
            "worker_id": _env(env, "LHV_WORKER_ID"),
            "group_instance_id": _env(env, "LHV_GROUP_INSTANCE_ID"),
            "metrics_host": _env(env, "LHV_METRICS_HOST"),
            "accept_data_loss": (_env(env, "LHV_ACCEPT_DATA_LOSS", "") or "").lower()
            in ("1", "true", "yes"),
        }
        for name, var in _INT_SETTINGS.items():
            value = _env(env, var)
            if value is not None:
                kw[name] = int(value)
        kw.update(overrides)
        return cls(**{k: v for k, v in kw.items() if v is not None})
