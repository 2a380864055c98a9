"""Prometheus metrics and the health endpoints of a worker.

`Metrics` holds every metric object in its own `CollectorRegistry` (never the global
one, so several workers can run in one process, as tests do) and offers small typed
methods the worker calls. `MetricsServer` serves it over HTTP:

- `GET /metrics`: the registry in the Prometheus text format.
- `GET /healthz`: 200 while no partition is stalled, else 503. A partition is stalled
  when its lag is above 0 and its applied offset has not changed for longer than
  `stall_timeout_s` (counted from the later of its last progress and the moment its lag
  became positive, so an idle partition that receives one record is not stalled at
  once). Partitions that are `refused` or `revoked` never count: restarting the process
  would not help them. A consumer stalled after a broker restart shows up here, so a
  supervisor restarts the worker.
- `GET /readyz`: 200 when every assigned partition is `serving` (or `restored`), else
  503 listing those that are not ready and those refused. No assigned partition is
  ready (a worker may have nothing to own in a large group).

Lag (`lhv_consumer_lag`, and what `/healthz` calls lagging) is counted against the
applied offset, not the consumer's fetch position: `log end - 1 - applied offset`, where
the log end is the last stable offset of the partition's last fetch (the highwater
without transactions: records behind a transaction still open cannot be read yet, so
they are not lag). Records already fetched but
still queued for the partition's runner are lag too; `highwater - position` would call a
backlog sitting in memory "caught up". While a restoring partition has fetched nothing
yet, the log end seen at assignment stands in for the highwater (metrics only; the stall
check waits for a real fetch).

Bodies of the health endpoints are JSON. The server is a small asyncio HTTP/1.1 server
(one request per connection, GET and HEAD only) rather than aiohttp, so the worker
needs no web framework; answering at all also shows the event loop is not blocked.

The health contract is the `HealthSource` protocol; `HealthTracker` implements it:

    tracker = HealthTracker(stall_timeout_s=60, states=worker.partition_states)
    tracker.progress(partition, applied_offset)   # after each applied batch
    tracker.set_lag(partition, lag)               # after each poll
    tracker.set_state(partition, "serving")       # unless `states` is given
    tracker.forget(partition)                     # on revoke

Partition states are strings: `restoring`, `serving` (or `restored`), `refused`,
`revoked`. A partition the tracker knows from `progress`/`set_lag` but that has no state
is `unknown`, and not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "PARTITION_STATES",
    "READY_STATES",
    "HealthSource",
    "HealthTracker",
    "Metrics",
    "MetricsServer",
]

log = logging.getLogger(__name__)

#: states a partition may report; the state gauge has one series per state
PARTITION_STATES = ("restoring", "serving", "refused", "revoked")
#: states in which a partition counts as ready
READY_STATES = frozenset({"serving", "restored"})
#: states that neither block readiness nor count as stalled (being given up, or refused)
_EXEMPT_FROM_STALL = frozenset({"refused", "revoked"})
_IGNORED_FOR_READINESS = frozenset({"revoked"})
_UNKNOWN = "unknown"

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 50_000, 100_000)
_BYTES_BUCKETS = tuple(float(1 << s) for s in range(10, 37, 2))  # 1 KiB .. 64 GiB


class Metrics:
    """Every metric of one worker, in a registry of its own. Thread-safe.

    Offsets are Kafka offsets of the commands topic; durations are seconds; sizes are
    bytes. Per-partition and per-index series are removed by `forget_partition` and
    `forget_index`, so a drop or a revoke leaves no stale series behind.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # label values in use beyond the fixed ones, so that forget_* can remove them
        self._lock = threading.Lock()
        self._odd_states: dict[str, set[str]] = {}
        self._drift_streams: dict[str, set[str]] = {}
        # partitions
        self.consumer_lag = Gauge(
            "lhv_consumer_lag",
            "Records of the commands topic not yet applied",
            ["partition"],
            registry=r,
        )
        self.replica_lag = Gauge(
            "lhv_replica_lag_records",
            "Read replica: records of the commands topic up to the log end not yet applied",
            ["partition"],
            registry=r,
        )
        self.held_back = Gauge(
            "lhv_records_held_back",
            "Records of the commands topic past the last stable offset: behind a transaction"
            " still open, read once it commits or aborts",
            ["partition"],
            registry=r,
        )
        self._standby_lag_partitions: set[int] = set()
        self.standby_lag = Gauge(
            "lhv_standby_lag_records",
            "Warm standby copy: records of the commands topic up to the log end not yet applied",
            ["partition"],
            registry=r,
        )
        self.applied_offset = Gauge(
            "lhv_applied_offset",
            "Offset of the last applied command record",
            ["partition"],
            registry=r,
        )
        self.checkpoint_offset = Gauge(
            "lhv_checkpoint_offset",
            "Offset covered by the last checkpoint manifest",
            ["partition"],
            registry=r,
        )
        self.partition_state = Gauge(
            "lhv_partition_state",
            "1 for the partition's current state, 0 for the others",
            ["partition", "state"],
            registry=r,
        )
        self.rebalances = Counter(
            "lhv_rebalances", "Partition assignments and revocations seen", registry=r
        )
        # commands
        self.commands_applied = Counter(
            "lhv_commands_applied", "Command records applied", ["op"], registry=r
        )
        self.items_applied = Counter(
            "lhv_items_applied",
            "Items changed by applied commands (writes not newer than the stored clock excluded)",
            ["op"],
            registry=r,
        )
        self.commands_rejected = Counter(
            "lhv_commands_rejected",
            "Command records rejected, by error code",
            ["op", "code"],
            registry=r,
        )
        self.dlq_records = Counter(
            "lhv_dlq_records", "Records sent to the dead-letter topic", registry=r
        )
        self.replies_dropped = Counter(
            "lhv_replies_dropped",
            "Acks and query replies dropped because their reply topic is missing",
            registry=r,
        )
        self.unreadable_records = Counter(
            "lhv_unreadable_records",
            "Records the Kafka client could not parse (e.g. header keys not UTF-8), read "
            "with the lenient reader and rejected (commands) or skipped (queries)",
            ["topic"],
            registry=r,
        )
        self.records_refused = Counter(
            "lhv_records_refused",
            "Query records skipped unanswered at intake (unreadable, or headers over the "
            "limits: no reply could carry them)",
            ["reason"],
            registry=r,
        )
        self.outgoing_dropped = Counter(
            "lhv_outgoing_dropped",
            "DLQ records, acks and replies not sent or not delivered, by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.dlq_truncated = Counter(
            "lhv_dlq_truncated",
            "DLQ records whose value (or key, or original headers) was cut to fit the size bounds",
            registry=r,
        )
        self.acks_skipped = Counter(
            "lhv_acks_skipped",
            "Acks not sent: records replayed after a restore, older than the ack age bound",
            registry=r,
        )
        self.poll_records = Histogram(
            "lhv_poll_records", "Records returned by one poll", buckets=_COUNT_BUCKETS, registry=r
        )
        self.apply_records = Histogram(
            "lhv_apply_batch_records",
            "Command records per applied batch",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.apply_items = Histogram(
            "lhv_apply_batch_items",
            "Items per applied batch",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.apply_seconds = Histogram(
            "lhv_apply_seconds",
            "Time to apply one batch of command records",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # queries
        self.search_seconds = Histogram(
            "lhv_search_seconds",
            "Time from receiving a query to its reply",
            ["op", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_batch = Histogram(
            "lhv_search_batch_size",
            "Query vectors answered by the engine call that answered a request",
            ["op", "status"],
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.search_queries = Counter(
            "lhv_search_queries",
            "Query vectors answered (a multi-vector search request counts each vector)",
            ["op", "status"],
            registry=r,
        )
        self.search_parked = Gauge(
            "lhv_search_parked_queries",
            "Queries of a partition waiting for readiness or their min_offset",
            ["partition"],
            registry=r,
        )
        self.search_parked_bytes = Gauge(
            "lhv_search_parked_bytes",
            "Record bytes of the queries of a partition waiting",
            ["partition"],
            registry=r,
        )
        self.search_committed = Gauge(
            "lhv_search_committed_offset",
            "Search-topic offset last committed for a partition (queries before it answered)",
            ["partition"],
            registry=r,
        )
        self.search_failures = Counter(
            "lhv_search_failures",
            "Unexpected failures while serving queries, by stage (each is logged)",
            ["stage"],
            registry=r,
        )
        self.background_failures = Counter(
            "lhv_background_failures",
            "Background tasks of the worker that failed, by kind (a crashed long-lived "
            "task also ends the worker)",
            ["task"],
            registry=r,
        )
        # indexes
        self.index_items = Gauge(
            "lhv_index_items",
            "Items of an index: live, or deleted (tombstones)",
            ["index", "state"],
            registry=r,
        )
        self.drift_psi = Gauge(
            "lhv_drift_psi",
            "Population Stability Index of a stream against its baseline",
            ["index", "stream"],
            registry=r,
        )
        # snapshots, checkpoints, restores
        self.snapshot_seconds = Histogram(
            "lhv_snapshot_seconds",
            "Time to encode and write one index snapshot",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.snapshot_bytes = Histogram(
            "lhv_snapshot_bytes", "Size of one index snapshot", buckets=_BYTES_BUCKETS, registry=r
        )
        self.snapshot_failures = Counter(
            "lhv_snapshot_failures", "Snapshot writes that failed", registry=r
        )
        self.checkpoint_seconds = Histogram(
            "lhv_checkpoint_seconds",
            "Time of one partition checkpoint (snapshots, manifest, commit)",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "lhv_checkpoint_failures", "Partition checkpoints that failed", registry=r
        )
        self.restore_seconds = Histogram(
            "lhv_restore_seconds",
            "Time to restore a partition (load snapshots, replay the tail)",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.restore_bytes = Histogram(
            "lhv_restore_bytes",
            "Snapshot bytes loaded to restore a partition",
            buckets=_BYTES_BUCKETS,
            registry=r,
        )
        self.restore_failures = Counter(
            "lhv_restore_failures", "Partition restores that failed", registry=r
        )
        self.restores = Counter(
            "lhv_restores",
            "Partitions taken over, by where their state came from: snapshot (downloaded "
            "from S3), standby (a warm copy kept here), parked (this worker's own, kept "
            "through a rebalance), empty (no checkpoint yet)",
            ["source"],
            registry=r,
        )
        self.standby_partitions = Gauge(
            "lhv_standby_partitions", "Partitions this worker keeps a standby copy of", registry=r
        )

    # -- partitions ----------------------------------------------------------------------

    def set_partition(
        self, partition: int, state: str, applied_offset: int, checkpoint_offset: int, lag: int
    ) -> None:
        """Record one partition's state, offsets and lag (after each poll)."""
        p = str(partition)
        self.set_partition_state(partition, state)
        self.applied_offset.labels(p).set(applied_offset)
        self.checkpoint_offset.labels(p).set(checkpoint_offset)
        self.consumer_lag.labels(p).set(lag)

    def set_partition_state(self, partition: int, state: str) -> None:
        p = str(partition)
        for s in PARTITION_STATES:
            self.partition_state.labels(p, s).set(1 if s == state else 0)
        if state not in PARTITION_STATES:
            with self._lock:
                self._odd_states.setdefault(p, set()).add(state)
            self.partition_state.labels(p, state).set(1)

    def set_lag(self, partition: int, lag: int) -> None:
        self.consumer_lag.labels(str(partition)).set(lag)

    def set_held_back(self, partition: int, records: int) -> None:
        self.held_back.labels(str(partition)).set(records)

    def set_replica_lag(self, partition: int, lag: int) -> None:
        self.replica_lag.labels(str(partition)).set(lag)

    def set_standby_lags(self, lags: dict[int, int]) -> None:
        """The lag of every warm copy held; copies no longer held are removed."""
        for p in self._standby_lag_partitions - lags.keys():
            self.standby_lag.remove(str(p))
        for p, lag in lags.items():
            self.standby_lag.labels(str(p)).set(lag)
        self._standby_lag_partitions = set(lags)

    def set_applied_offset(self, partition: int, offset: int) -> None:
        self.applied_offset.labels(str(partition)).set(offset)

    def forget_partition(self, partition: int) -> None:
        """Remove every series of `partition` (on revoke)."""
        p = str(partition)
        for gauge in (
            self.consumer_lag,
            self.held_back,
            self.replica_lag,
            self.applied_offset,
            self.checkpoint_offset,
            self.search_parked,
            self.search_parked_bytes,
            self.search_committed,
        ):
            _remove(gauge, p)
        with self._lock:
            odd = self._odd_states.pop(p, set())
        for s in (*PARTITION_STATES, *odd):
            _remove(self.partition_state, p, s)

    def rebalance(self) -> None:
        self.rebalances.inc()

    # -- commands ------------------------------------------------------------------------

    def command_applied(self, op: str, items: int = 0) -> None:
        """One command record of `op` applied, changing `items` items."""
        self.commands_applied.labels(op).inc()
        if items:
            self.items_applied.labels(op).inc(items)

    def command_rejected(self, op: str, code: str) -> None:
        self.commands_rejected.labels(op, code).inc()

    def dlq_record(self) -> None:
        self.dlq_records.inc()

    def reply_dropped(self) -> None:
        self.replies_dropped.inc()

    def unreadable_record(self, topic: str) -> None:
        self.unreadable_records.labels(topic).inc()

    def record_refused(self, reason: str) -> None:
        self.records_refused.labels(reason).inc()

    def outgoing_failed(self, kind: str, reason: str) -> None:
        """One DLQ record, ack or reply (`kind`) was not sent, or not delivered."""
        self.outgoing_dropped.labels(kind, reason).inc()

    def dlq_cut(self) -> None:
        self.dlq_truncated.inc()

    def ack_skipped(self) -> None:
        self.acks_skipped.inc()

    def observe_poll(self, records: int) -> None:
        self.poll_records.observe(records)

    def observe_apply(
        self, partition: int, records: int, seconds: float, items: int | None = None
    ) -> None:
        """One batch of `records` command records (holding `items` items) took `seconds`."""
        del partition  # accepted for call-site symmetry; histograms are not per partition
        self.apply_records.observe(records)
        if items is not None:
            self.apply_items.observe(items)
        self.apply_seconds.observe(seconds)

    # -- queries -------------------------------------------------------------------------

    def observe_search(
        self, op: str, status: str, seconds: float, batch_size: int = 1, *, queries: int = 1
    ) -> None:
        """A request of `op` (`queries` vectors) answered with `status` (`ok` or an error
        code) in `seconds`, by an engine call of `batch_size` vectors."""
        self.search_seconds.labels(op, status).observe(seconds)
        self.search_batch.labels(op, status).observe(batch_size)
        self.search_queries.labels(op, status).inc(queries)

    def set_search_parked(self, partition: int, queries: int, nbytes: int) -> None:
        """`queries` queries of `partition` (`nbytes` record bytes) are waiting."""
        self.search_parked.labels(str(partition)).set(queries)
        self.search_parked_bytes.labels(str(partition)).set(nbytes)

    def search_committed_offset(self, partition: int, offset: int) -> None:
        self.search_committed.labels(str(partition)).set(offset)

    def search_failed(self, stage: str) -> None:
        """An unexpected failure at `stage` (`decode`, `serve`, `batch`, `group`, `reply`,
        `commit`, `position`)."""
        self.search_failures.labels(stage).inc()

    def background_failed(self, task: str) -> None:
        """A background task of kind `task` (`partition`, `restore`, `gc`, ...) failed."""
        self.background_failures.labels(task).inc()

    # -- indexes -------------------------------------------------------------------------

    def set_index_size(self, index: str, live: int, deleted: int) -> None:
        self.index_items.labels(index, "live").set(live)
        self.index_items.labels(index, "deleted").set(deleted)

    def set_drift(self, index: str, report: Mapping[str, Mapping[str, Any]]) -> None:
        """Publish a `DriftMonitor.report()`; a stream without a PSI has no series."""
        for stream, entry in report.items():
            value = entry.get("psi")
            if value is None:
                _remove(self.drift_psi, index, stream)
            else:
                with self._lock:
                    self._drift_streams.setdefault(index, set()).add(stream)
                self.drift_psi.labels(index, stream).set(float(value))

    def forget_index(self, index: str) -> None:
        """Remove every series of `index` (on drop, or when its partition is revoked)."""
        _remove(self.index_items, index, "live")
        _remove(self.index_items, index, "deleted")
        with self._lock:
            streams = self._drift_streams.pop(index, set())
        for stream in streams:
            _remove(self.drift_psi, index, stream)

    # -- snapshots, checkpoints, restores ------------------------------------------------

    def observe_snapshot(self, seconds: float, nbytes: int) -> None:
        self.snapshot_seconds.observe(seconds)
        self.snapshot_bytes.observe(nbytes)

    def snapshot_failed(self) -> None:
        self.snapshot_failures.inc()

    def observe_checkpoint(self, partition: int, seconds: float, offset: int) -> None:
        """A checkpoint of `partition` covering `offset` took `seconds`."""
        self.checkpoint_seconds.observe(seconds)
        self.checkpoint_offset.labels(str(partition)).set(offset)

    def checkpoint_failed(self, partition: int) -> None:
        del partition
        self.checkpoint_failures.inc()

    def observe_restore(self, partition: int, seconds: float, nbytes: int | None = None) -> None:
        del partition
        self.restore_seconds.observe(seconds)
        if nbytes is not None:
            self.restore_bytes.observe(nbytes)

    def restore_failed(self, partition: int) -> None:
        del partition
        self.restore_failures.inc()

    def restored(self, source: str) -> None:
        """A partition was taken over from `source` (`snapshot`, `standby`, `parked`,
        `empty`)."""
        self.restores.labels(source).inc()

    def set_standbys(self, partitions: list[int]) -> None:
        self.standby_partitions.set(len(partitions))

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _remove(metric: Gauge | Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


@runtime_checkable
class HealthSource(Protocol):
    """What `/healthz` and `/readyz` ask of the worker."""

    def partition_states(self) -> Mapping[int, str]:
        """State of every assigned partition (`restoring`, `serving`, `refused`, ...)."""
        ...

    def lag_total(self) -> int:
        """Sum of the lag of every assigned partition, in records."""
        ...

    def stalled(self) -> Mapping[int, float]:
        """Stalled partitions and the seconds each has gone without progress."""
        ...


class HealthTracker:
    """Implements `HealthSource` from what the worker reports. Thread-safe.

    `states`, when given, is the source of partition states (e.g. the worker's
    `partition_states`); otherwise states come from `set_state`. `clock` is a monotonic
    clock in seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        stall_timeout_s: float = 60.0,
        states: Callable[[], Mapping[int, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        self._states_source = states
        self._clock = clock
        self._lock = threading.Lock()
        self._offsets: dict[int, int] = {}
        self._lags: dict[int, int] = {}
        self._since: dict[int, float] = {}  # start of the current no-progress period
        self._states: dict[int, str] = {}
        self._last_progress = clock()

    def progress(self, partition: int, offset: int) -> None:
        """`partition` has applied up to `offset`; a changed offset is progress."""
        now = self._clock()
        with self._lock:
            if self._offsets.get(partition) != offset:
                self._offsets[partition] = offset
                self._since[partition] = now
                self._last_progress = now

    def set_lag(self, partition: int, lag: int) -> None:
        """Records of `partition` not yet applied; a lag that becomes positive starts the clock."""
        now = self._clock()
        lag = max(0, lag)
        with self._lock:
            if self._lags.get(partition, 0) == 0 and lag > 0:
                self._since[partition] = now
            self._lags[partition] = lag

    def set_state(self, partition: int, state: str) -> None:
        with self._lock:
            self._states[partition] = state

    def forget(self, partition: int) -> None:
        """Stop tracking `partition` (revoked)."""
        with self._lock:
            for d in (self._offsets, self._lags, self._since, self._states):
                d.pop(partition, None)

    def last_progress_monotonic(self) -> float:
        """When any partition last made progress (or the tracker was created)."""
        with self._lock:
            return self._last_progress

    def partition_states(self) -> dict[int, str]:
        if self._states_source is not None:
            states = dict(self._states_source())
        else:
            with self._lock:
                states = dict(self._states)
        with self._lock:
            known = set(self._offsets) | set(self._lags)
        for p in known - set(states):
            states[p] = _UNKNOWN
        return states

    def lag_total(self) -> int:
        with self._lock:
            return sum(self._lags.values())

    def stalled(self) -> dict[int, float]:
        states = self.partition_states()
        now = self._clock()
        out: dict[int, float] = {}
        with self._lock:
            for p, lag in self._lags.items():
                if lag <= 0 or states.get(p) in _EXEMPT_FROM_STALL:
                    continue
                idle = now - self._since.get(p, now)
                if idle > self.stall_timeout_s:
                    out[p] = idle
        return out


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_READ_TIMEOUT_S = 5.0
_MAX_HEAD_BYTES = 16 * 1024


class MetricsServer:
    """Serves `/metrics`, `/healthz` and `/readyz` of one worker.

    `port=0` binds a free port; `port` then tells which. `stop()` is idempotent and
    closes open connections; a stopped server cannot be started again.
    """

    def __init__(
        self, metrics: Metrics, health: HealthSource, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._state = "unopened"

    @property
    def port(self) -> int:
        """The bound port once started, else the configured one."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind and listen. Raises RuntimeError if already started or stopped."""
        if self._state != "unopened":
            raise RuntimeError(f"metrics server cannot start: it is {self._state}")
        self._server = await asyncio.start_server(
            self._handle, self.host, self._port, limit=_MAX_HEAD_BYTES
        )
        sockets = self._server.sockets
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        self._state = "started"
        log.info("metrics on %s (/metrics, /healthz, /readyz)", self.url)

    async def stop(self) -> None:
        """Stop listening and close open connections. Idempotent."""
        previous, self._state = self._state, "stopped"
        if previous != "started" or self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        log.info("metrics server stopped")

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                return
            method, target = parts[0], parts[1]
            status, ctype, body = self._route(method, target.split("?", 1)[0])
            headers = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(headers.encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            async with asyncio.timeout(_READ_TIMEOUT_S):
                await writer.drain()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            self._writers.discard(writer)
            writer.close()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/healthz":
            return self._json(*self.healthz())
        if path == "/readyz":
            return self._json(*self.readyz())
        return 404, "text/plain; charset=utf-8", b"not found\n"

    @staticmethod
    def _json(status: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(body, sort_keys=True).encode() + b"\n"

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """`(status, body)` of `/healthz`: 503 when a partition is stalled."""
        stalled = self.health.stalled()
        lag = self.health.lag_total()
        if not stalled:
            return 200, {"status": "ok", "lag": lag}
        reasons = [
            f"partition {p}: no progress for {idle:.1f} s while lagging"
            for p, idle in stalled.items()
        ]
        return 503, {
            "status": "stalled",
            "lag": lag,
            "stalled": {str(p): round(idle, 3) for p, idle in sorted(stalled.items())},
            "reason": "; ".join(reasons),
        }

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """`(status, body)` of `/readyz`: 503 while an assigned partition is not serving."""
        states = {
            p: s
            for p, s in self.health.partition_states().items()
            if s not in _IGNORED_FOR_READINESS
        }
        not_ready = {p: s for p, s in states.items() if s not in READY_STATES}
        body: dict[str, Any] = {"partitions": _keyed(states)}
        if not not_ready:
            return 200, {"status": "ready", **body}
        refused = sorted(p for p, s in not_ready.items() if s == "refused")
        return 503, {
            "status": "not_ready",
            "not_ready": _keyed(not_ready),
            "refused": refused,
            **body,
        }


def _keyed(states: Mapping[int, str]) -> dict[str, str]:
    return {str(p): s for p, s in sorted(states.items())}
