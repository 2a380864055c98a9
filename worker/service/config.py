"""Worker configuration: small frozen dataclasses, defaults in one place, `from_env()`.

Every setting can come from an `LHV_*` environment variable (the CLI flags override them).
Secrets are kept out of reprs, so a config can be logged.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

from lhv_index import Limits as IndexLimits
from worker._environ import _env
from worker.kafka.config import KafkaConfig
from worker.service.malloc import MAX_MMAP_THRESHOLD_BYTES
from worker.storage.blobstore import S3Config
from worker.storage.snapshots import DeltaPolicy
from worker.wire.limits import MessageLimits
from worker.wire.topics import TopicsConfig

__all__ = [
    "GIB",
    "CheckpointPolicy",
    "DeliveryConfig",
    "ImportPolicy",
    "ProcessesPolicy",
    "QueryPolicy",
    "Role",
    "WorkerConfig",
    "limits_from_env",
]


_L = TypeVar("_L", MessageLimits, IndexLimits)

#: what a worker is: an `owner` (applies, checkpoints, answers `lhv.search`) or a read
#: `replica` (restores from the owners' manifests, tails the log, answers the replica
#: search topic, writes nothing)
Role = Literal["owner", "replica"]
ROLES: tuple[Role, ...] = ("owner", "replica")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointPolicy:
    """When a partition is checkpointed, if anything changed: once the estimated replay
    passes `max_replay_s` (while checkpoints take at most `max_time_share` of the time, or
    at twice the budget), and at the latest after `every_records` records or `every_s`
    seconds (worker/service/pacing.py).

    Also on revoke and on graceful shutdown, whatever the policy says.
    """

    every_records: int = 50_000
    every_s: float = 30.0
    max_replay_s: float = 4.0
    """the longest replay a restart should need, in seconds of apply time at this
    partition's measured throughput (`LHV_CHECKPOINT_MAX_REPLAY_S`; 0: no such trigger)"""
    max_time_share: float = 0.1
    """no checkpoint for the replay budget while recent checkpoints took more than this
    share of the wall time, unless the estimate is twice the budget
    (`LHV_CHECKPOINT_MAX_TIME_SHARE`; 1: no cap)"""
    max_deferred_s: float = 60.0
    """an index's delta chain is cut by a new base once inserting its items would take
    more than this, in seconds of apply at the partition's measured throughput: a restore
    answers before the chain's items are inserted into HNSW, searching them exactly while
    they are inserted in the background, so this bounds how long that lasts
    (`LHV_CHECKPOINT_MAX_DEFERRED_S`; 0: chains are bounded by `deltas` alone)"""
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    deltas: DeltaPolicy = field(default_factory=DeltaPolicy)
    """when an index's snapshot is a delta on its chain, and when a new base"""
    tombstone_retention_ms: int = 0
    """a tombstone is dropped at a checkpoint once a durable checkpoint at least this old
    covers its offset (`LHV_TOMBSTONE_RETENTION_MS`, like Kafka's `delete.retention.ms`);
    0, the default, keeps tombstones for good: dropping them raises the index's version
    floor, which refuses low client versions for new ids (README, "Tombstone horizon"),
    so it is the operator's choice"""

    def __post_init__(self) -> None:
        if self.every_records < 1 or self.every_s <= 0:
            raise ValueError("checkpoint policy needs every_records >= 1 and every_s > 0")
        if self.tombstone_retention_ms < 0:
            raise ValueError("checkpoint policy needs tombstone_retention_ms >= 0")
        if self.max_replay_s < 0 or not 0 < self.max_time_share <= 1:
            raise ValueError(
                "checkpoint policy needs max_replay_s >= 0 and 0 < max_time_share <= 1"
            )
        if self.max_deferred_s < 0:
            raise ValueError("checkpoint policy needs max_deferred_s >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    """Bounds on what the worker sends back: DLQ records, acks and query replies.

    These go through their own producer (`worker.service.outbox`), and each record is checked
    against both bounds below before it is sent, so the broker never rejects one.
    """

    max_request_bytes: int = 1_048_576
    """the outgoing producer's `max_request_size`"""
    broker_max_message_bytes: int = 1_048_576
    """what the broker accepts in one batch: the smallest `message.max.bytes` (or the
    topic's `max.message.bytes`) of the DLQ and reply topics (Kafka's default is
    1 048 588)"""
    ack_replay_max_age_ms: int = 300_000
    """acks of records replayed after a restore are not sent when the record is older
    than this: nobody waits for them any more"""
    max_missing_reply_topics: int = 1024
    """reply topics remembered as missing (least recently used ones are forgotten)"""

    def __post_init__(self) -> None:
        if min(self.max_request_bytes, self.broker_max_message_bytes) < 65_536:
            raise ValueError("DeliveryConfig: the byte bounds must be at least 65536")
        if self.ack_replay_max_age_ms < 0 or self.max_missing_reply_topics < 1:
            raise ValueError(
                "DeliveryConfig: ack_replay_max_age_ms >= 0 and max_missing_reply_topics >= 1"
            )

    @property
    def max_record_bytes(self) -> int:
        """The bound one outgoing record (batched alone) must fit in."""
        return min(self.max_request_bytes, self.broker_max_message_bytes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> DeliveryConfig:
        return cls(**_ints_from_env(env, _DELIVERY_SETTINGS))


#: `DeliveryConfig` fields read from the environment
_DELIVERY_SETTINGS = {
    "max_request_bytes": "LHV_OUT_MAX_REQUEST_BYTES",
    "broker_max_message_bytes": "LHV_BROKER_MAX_MESSAGE_BYTES",
    "ack_replay_max_age_ms": "LHV_ACK_REPLAY_MAX_AGE_MS",
    "max_missing_reply_topics": "LHV_MAX_MISSING_REPLY_TOPICS",
}


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


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryPolicy:
    """How long queries may wait, how many may wait, and where the search topic starts.

    See worker/service/search.py for the policy these settings drive.
    """

    max_age_ms: int = 60_000
    """a query record older than this (by its record timestamp) is answered
    `deadline_exceeded` without being computed; a search partition with no committed
    offset starts at the first record younger than this"""
    max_wait_ms: int = 60_000
    """the longest any query waits for its partition or its `min_offset`, whatever its
    `deadline_ms` says; at this cap it is answered `deadline_exceeded`"""
    max_parked: int = 1_000
    """queries of one partition waiting (for readiness or `min_offset`) at once; more are
    answered `not_ready` at once"""
    max_parked_bytes: int = 64 * 1024 * 1024
    """record bytes of those waiting queries, per partition"""
    commit_interval_ms: int = 1_000
    """how often each owned partition's search-topic offset is committed (when it moved);
    a crash re-answers at most about this much of queries"""
    max_gathers: int = 1_000
    """queries of sharded names or aliases this worker gathers from members at once (all
    partitions); more are answered `not_ready` at once"""
    max_gathers_per_partition: int = 200
    """the same, per home partition"""
    max_gather_bytes: int = 256 * 1024 * 1024
    """bytes of members' replies, as received, all gathers hold at once; a gather whose
    replies alone pass it (or would, at the size of those in so far) is refused
    `invalid_request`, one that finds it passed with others' is answered `not_ready`"""

    def __post_init__(self) -> None:
        for name in (
            "max_age_ms",
            "max_wait_ms",
            "max_parked",
            "max_parked_bytes",
            "commit_interval_ms",
            "max_gathers",
            "max_gathers_per_partition",
            "max_gather_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"QueryPolicy.{name} must be at least 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> QueryPolicy:
        return cls(**_ints_from_env(env, _QUERY_SETTINGS))


GIB = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportPolicy:
    """Where `import` may read from and how much one import may make a worker hold.

    Every bound is checked before the bytes it guards are read or allocated (see
    `worker/service/importsource.py`); going over one rejects the import with `invalid_request`
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
        kw.update(_ints_from_env(env, _IMPORT_INT_SETTINGS))
        return cls(**kw)


#: settings of `QueryPolicy` read from the environment
_QUERY_SETTINGS = {
    "max_age_ms": "LHV_MAX_QUERY_AGE_MS",
    "max_wait_ms": "LHV_MAX_QUERY_WAIT_MS",
    "max_parked": "LHV_MAX_PARKED_QUERIES",
    "max_parked_bytes": "LHV_MAX_PARKED_BYTES",
    "commit_interval_ms": "LHV_SEARCH_COMMIT_INTERVAL_MS",
    "max_gathers": "LHV_MAX_GATHERS",
    "max_gathers_per_partition": "LHV_MAX_GATHERS_PER_PARTITION",
    "max_gather_bytes": "LHV_MAX_GATHER_BYTES",
}

#: integer settings of `ImportPolicy` read from the environment
_IMPORT_INT_SETTINGS = {
    "max_object_bytes": "LHV_MAX_IMPORT_BYTES",
    "max_inflated_bytes": "LHV_MAX_IMPORT_INFLATED_BYTES",
    "max_compression_ratio": "LHV_MAX_IMPORT_COMPRESSION_RATIO",
    "max_members": "LHV_MAX_IMPORT_MEMBERS",
}


def _ints_from_env(env: Mapping[str, str], table: Mapping[str, str]) -> dict[str, int]:
    """The integer settings of `table` (field name -> variable) that `env` sets."""
    out: dict[str, int] = {}
    for name, var in table.items():
        value = _env(env, var)
        if value is not None:
            out[name] = int(value)
    return out


#: integer settings of `WorkerConfig` read from the environment
_INT_SETTINGS = {
    "metrics_port": "LHV_METRICS_PORT",
    "session_timeout_ms": "LHV_SESSION_TIMEOUT_MS",
    "rebalance_timeout_ms": "LHV_REBALANCE_TIMEOUT_MS",
    "max_poll_records": "LHV_MAX_POLL_RECORDS",
    "max_pending_bytes": "LHV_MAX_PENDING_BYTES",
    "max_batch_bytes": "LHV_MAX_BATCH_BYTES",
    "max_read_ahead_bytes": "LHV_MAX_READ_AHEAD_BYTES",
    "max_inflated_batch_bytes": "LHV_MAX_INFLATED_BATCH_BYTES",
    "query_wait_ms": "LHV_QUERY_WAIT_MS",
    "standby_replicas": "LHV_STANDBY_REPLICAS",
    "max_indexes_per_partition": "LHV_MAX_INDEXES_PER_PARTITION",
    "malloc_arena_max": "LHV_MALLOC_ARENA_MAX",
    "malloc_mmap_threshold_bytes": "LHV_MALLOC_MMAP_THRESHOLD_BYTES",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """Everything a `Worker` needs."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    s3: S3Config
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    queries: QueryPolicy = field(default_factory=QueryPolicy)
    limits: MessageLimits = field(default_factory=MessageLimits)
    index_limits: IndexLimits = field(default_factory=IndexLimits)
    imports: ImportPolicy = field(default_factory=ImportPolicy)
    #: the key(s) that authenticate internal merge records (`LHV_INTERNAL_KEY`,
    #: comma-separated: the first signs, every one verifies); None: the random key kept
    #: in the workers' own bucket and prefix (see `worker/service/protocol_auth.py`)
    internal_key: str | None = field(default=None, repr=False)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    group_id: str = "lhv"
    #: `owner` or `replica` (`LHV_ROLE`; `lhv worker --replica`)
    role: Role = "owner"
    #: the consumer group of a replica (`LHV_REPLICA_GROUP`); None: `<group_id>.replicas`.
    #: Replicas of one group split the partitions; each replica group is one more copy
    replica_group_id: str | None = None
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
    max_pending_bytes: int = 32 * 1024 * 1024
    #: record bytes buffered by all partitions of the worker together: past it the
    #: partitions a poll filled are paused (and sought back to the first record left)
    #: until half is applied; with `max_pending_bytes`, what the worker reads ahead of
    #: its apply threads whatever the number of partitions it owns
    max_read_ahead_bytes: int = 128 * 1024 * 1024
    #: record bytes applied in one batch (at least one poll's records): bounds what is
    #: decoded at once
    max_batch_bytes: int = 16 * 1024 * 1024
    #: a compressed record batch inflates to at most this (worker/service/inflate.py); a batch
    #: past it is dead-lettered whole. At least `limits.max_message_bytes` plus framing
    max_inflated_batch_bytes: int = 64 * 1024 * 1024
    session_timeout_ms: int = 30_000
    rebalance_timeout_ms: int = 120_000
    #: default wait for a query whose partition is not ready and that names no deadline
    query_wait_ms: int = 30_000
    #: port of /metrics, /healthz, /readyz; None disables, 0 picks a free one
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    stall_timeout_s: float = 60.0
    #: warm read-only copies of each partition kept on other workers, so that a takeover
    #: replays a few records instead of downloading snapshots (README, "Warm
    #: standbys"); 0 keeps none
    standby_replicas: int = 0
    #: indexes one partition may hold (`LHV_MAX_INDEXES_PER_PARTITION`): an hnsw index
    #: holds about 2.6 MB however few items it has (hnswlib's 65536 locks per index), so
    #: creates of ever more names would otherwise grow a worker without bound; a create
    #: past it is refused `invalid_request`
    max_indexes_per_partition: int = 1000
    #: glibc malloc arenas of the worker process, set when `lhv worker` starts
    #: (worker/service/malloc.py): each arena keeps what was freed in it, and glibc's
    #: default is 8 per core; 0 leaves glibc's default
    malloc_arena_max: int = 2
    #: blocks of at least this many bytes (record values, decoded batches, checkpoint
    #: copies) are mapped on their own and given back to the kernel when freed; 0 leaves
    #: glibc's adaptive threshold, which rises up to 32 MiB and keeps such blocks resident
    malloc_mmap_threshold_bytes: int = 128 * 1024

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        if self.standby_replicas < 0:
            raise ValueError("standby_replicas (LHV_STANDBY_REPLICAS) must be >= 0")
        if self.max_indexes_per_partition < 1:
            raise ValueError(
                "max_indexes_per_partition (LHV_MAX_INDEXES_PER_PARTITION) must be >= 1"
            )
        if min(self.max_pending_bytes, self.max_read_ahead_bytes, self.max_batch_bytes) < 1:
            raise ValueError(
                "max_pending_bytes, max_read_ahead_bytes and max_batch_bytes "
                "(LHV_MAX_PENDING_BYTES, LHV_MAX_READ_AHEAD_BYTES, LHV_MAX_BATCH_BYTES) must "
                "be at least 1"
            )
        if self.malloc_arena_max < 0:
            raise ValueError("malloc_arena_max (LHV_MALLOC_ARENA_MAX) must be >= 0")
        if not 0 <= self.malloc_mmap_threshold_bytes <= MAX_MMAP_THRESHOLD_BYTES:
            raise ValueError(
                "malloc_mmap_threshold_bytes (LHV_MALLOC_MMAP_THRESHOLD_BYTES) must be within "
                f"0..{MAX_MMAP_THRESHOLD_BYTES}"
            )
        if self.max_inflated_batch_bytes < self.limits.max_message_bytes + 64 * 1024:
            raise ValueError(
                f"max_inflated_batch_bytes ({self.max_inflated_batch_bytes}) must exceed "
                f"the largest record value (max_message_bytes {self.limits.max_message_bytes})"
                " by at least 64 KiB of framing"
            )

    @property
    def replica(self) -> bool:
        return self.role == "replica"

    @property
    def replica_group(self) -> str:
        return self.replica_group_id or f"{self.group_id}.replicas"

    def for_role(self) -> WorkerConfig:
        """The settings the worker's parts run with: for a replica, its own group and
        the replica search topic in place of the owners' (so the consumer, the intake
        and the search server need no role of their own); an owner's are unchanged."""
        if not self.replica:
            return self
        return replace(
            self,
            group_id=self.replica_group,
            topics=replace(self.topics, search=self.topics.replica_search),
        )

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
                deltas=DeltaPolicy.from_env(env),
                tombstone_retention_ms=int(_env(env, "LHV_TOMBSTONE_RETENTION_MS", "0") or 0),
                max_replay_s=float(_env(env, "LHV_CHECKPOINT_MAX_REPLAY_S", "4") or 4),
                max_time_share=float(_env(env, "LHV_CHECKPOINT_MAX_TIME_SHARE", "0.1") or 0.1),
                max_deferred_s=float(_env(env, "LHV_CHECKPOINT_MAX_DEFERRED_S", "60") or 0),
            ),
            "limits": limits_from_env(MessageLimits, env),
            "index_limits": limits_from_env(IndexLimits, env),
            "queries": QueryPolicy.from_env(env),
            "delivery": DeliveryConfig.from_env(env),
            "group_id": _env(env, "LHV_GROUP_ID", "lhv") or "lhv",
            "role": _env(env, "LHV_ROLE"),
            "replica_group_id": _env(env, "LHV_REPLICA_GROUP"),
            "worker_id": _env(env, "LHV_WORKER_ID"),
            "group_instance_id": _env(env, "LHV_GROUP_INSTANCE_ID"),
            "metrics_host": _env(env, "LHV_METRICS_HOST"),
            "accept_data_loss": (_env(env, "LHV_ACCEPT_DATA_LOSS", "") or "").lower()
            in ("1", "true", "yes"),
        }
        kw.update(_ints_from_env(env, _INT_SETTINGS))
        kw.update(overrides)
        return cls(**{k: v for k, v in kw.items() if v is not None})


#: settings of `ProcessesPolicy` read from the environment (field name -> variable)
_PROCESSES_SETTINGS = {
    "restart_backoff_ms": "LHV_RESTART_BACKOFF_MS",
    "restart_backoff_max_ms": "LHV_RESTART_BACKOFF_MAX_MS",
    "restart_stable_ms": "LHV_RESTART_STABLE_MS",
    "max_quick_restarts": "LHV_MAX_QUICK_RESTARTS",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessesPolicy:
    """How `lhv worker --processes N` restarts a worker process that ended on its own."""

    restart_backoff_ms: int = 1_000
    """wait before the first restart of a process; doubled at each quick exit in a row"""
    restart_backoff_max_ms: int = 30_000
    """the longest wait before a restart"""
    restart_stable_ms: int = 60_000
    """a process that ran this long before it ended starts its count of quick exits anew"""
    max_quick_restarts: int = 5
    """restarts of one process after quick exits in a row; one more quick exit ends the
    parent (and the other processes) with a failure"""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"ProcessesPolicy.{f.name} must not be negative")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ProcessesPolicy:
        return cls(**_ints_from_env(env, _PROCESSES_SETTINGS))
