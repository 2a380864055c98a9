"""`lhv demo`: LHV end to end on the local stack, in about a minute.

What it does, and says as it goes:

1. starts the local stack (Kafka KRaft + SeaweedFS S3), or uses the one named by
   `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_ENDPOINT_URL`;
2. creates its own topics and starts two `lhv worker` processes in one consumer group;
3. creates an index and loads clustered vectors into it through Kafka, with a progress
   bar of acknowledged (applied) vectors;
4. shows read-your-writes (a query that names a write's offset sees that write), runs
   searches and checks recall@10 against exact brute force;
5. kills (SIGKILL) the worker that owns the index, and times how long until the other
   worker, restoring from the S3 snapshot and replaying the topic tail, answers a query
   for it; checks that no acknowledged write was lost;
6. prints a report, then stops everything it started (also on failure or Ctrl-C);
7. checks the workers' logs: an ERROR line or a traceback fails the demo (they report
   situations that are not normal, and a normal run has none).

Exit code 0 when every step worked, 1 on failure, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from lhv_index.errors import LhvError

if TYPE_CHECKING:
    from worker.client import LhvClient, WriteResult

__all__ = ["add_arguments", "run", "until_answered"]

log = logging.getLogger(__name__)

PARTITIONS = 4
SESSION_TIMEOUT_MS = 6000
INDEX = "demo-docs"
EF = 64
K = 10


class DemoFailed(RuntimeError):
    """A step of the demo did not do what it should."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", type=int, default=50_000, help="vectors to load (50000)")
    parser.add_argument("--dim", type=int, default=64, help="dimensions (64)")
    parser.add_argument("--queries", type=int, default=500, help="search queries (500)")
    parser.add_argument("--batch", type=int, default=500, help="vectors per add record (500)")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def note(text: str) -> None:
    print(f"   {text}", flush=True)


def clustered(n: int, dim: int, seed: int, n_clusters: int = 100) -> npt.NDArray[np.float32]:
    """Gaussian blobs around random centres, like real embeddings (uniform random data
    hides recall problems). Same centres for every `seed`; `seed` picks the points."""
    centres = np.random.default_rng(0).normal(size=(n_clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    which = rng.integers(0, n_clusters, size=n)
    noise = rng.normal(scale=0.35, size=(n, dim)).astype(np.float32)
    return noise + centres[which]


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> npt.NDArray[np.int64]:
    """Cosine top-k by brute force: the truth recall is measured against."""
    d = data / np.linalg.norm(data, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    top = np.argpartition(-(q @ d.T), k, axis=1)[:, :k]
    return top.astype(np.int64)


@dataclass
class _Workers:
    """The demo's `lhv worker` processes, each logging to its own file."""

    env: dict[str, str]
    logdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        with open(self.logdir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker"],
                env={**self.env, "LHV_WORKER_ID": name},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DemoFailed(f"{name} exited with {proc.returncode}; see {self.logdir}")

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> list[str]:
        """SIGTERM every worker (they checkpoint and leave the group); returns problems."""
        bad = []
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
            if code != 0:
                bad.append(f"{name} exited {code}")
        self.procs.clear()
        return bad


@contextlib.contextmanager
def _stack() -> Iterator[dict[str, str]]:
    """The environment of a running stack: the caller's, or a local one started here."""
    if os.environ.get("LHV_BOOTSTRAP_SERVERS") and os.environ.get("LHV_S3_ENDPOINT_URL"):
        from worker.dev.stack import _kafka_metadata_ok

        bootstrap = os.environ["LHV_BOOTSTRAP_SERVERS"]
        if _kafka_metadata_ok(bootstrap, 5.0) is not None:
            raise DemoFailed(
                f"Kafka at LHV_BOOTSTRAP_SERVERS={bootstrap} does not answer: variables left "
                "from a stack that is gone? `unset LHV_BOOTSTRAP_SERVERS LHV_S3_ENDPOINT_URL` "
                "and the demo starts a stack of its own"
            )
        say(f"using the running stack at {bootstrap}")
        yield {k: v for k, v in os.environ.items() if k.startswith(("LHV_", "AWS_"))}
        return
    from worker.dev.stack import LocalStack

    say("starting the local stack: Kafka (KRaft, one node) + SeaweedFS S3, on loopback")
    local = LocalStack()
    try:
        local.start()
        note(
            f"ready in {local.ready_s:.1f} s: kafka {local.bootstrap_servers}, "
            f"s3 {local.s3_endpoint_url}"
        )
        yield local.env()
    finally:
        say("stopping the local stack")
        local.stop()


async def until_answered(
    client: LhvClient, index: str, query: np.ndarray, limit_s: float, every_s: float = 0.25
) -> float:
    """The monotonic time at which a search for `index` is first answered.

    A dead owner's queries go unanswered and a restoring one replies `not_ready`, so a
    probe with a 2 s deadline starts every `every_s`; the first answer wins.
    """

    async def probe() -> float:
        await client.search(index, query, k=1, timeout_s=2)
        return time.monotonic()

    deadline = time.monotonic() + limit_s
    probes: set[asyncio.Task[float]] = set()
    try:
        while time.monotonic() < deadline:
            probes.add(asyncio.create_task(probe()))
            done, _ = await asyncio.wait(
                probes, timeout=every_s, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                probes.discard(task)
                exc = task.exception()
                if exc is None:
                    return task.result()
                if not isinstance(exc, LhvError | TimeoutError):
                    raise exc
        raise DemoFailed(f"{index} not answered within {limit_s:.0f} s")
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


async def _load(
    client: LhvClient, ids: list[str], data: np.ndarray, batch: int, in_flight: int = 8
) -> WriteResult:
    """Acknowledged adds, `in_flight` records awaiting their acks at once; the bar moves
    as the worker applies."""
    window: collections.deque[tuple[int, Awaitable[WriteResult]]] = collections.deque()
    last: WriteResult | None = None
    with tqdm(total=len(ids), unit="vec", unit_scale=True, desc="   applied") as bar:
        for start in range(0, len(ids), batch):
            end = min(start + batch, len(ids))
            pending = await client.start_add(
                INDEX, ids[start:end], data[start:end], batch_size=batch, ack=True
            )
            window.append((end - start, pending))
            if len(window) >= in_flight:
                rows, oldest = window.popleft()
                last = await oldest
                bar.update(rows)
        while window:
            rows, oldest = window.popleft()
            last = await oldest
            bar.update(rows)
    assert last is not None
    return last


async def _demo(args: argparse.Namespace, env: dict[str, str], workers: _Workers) -> dict[str, str]:
    from worker.client import LhvClient
    from worker.dev.stack import create_topics
    from worker.wire.topics import TopicsConfig

    main = asyncio.current_task()
    assert main is not None
    # inside the loop, SIGTERM cancels the demo like Ctrl-C does: clients close cleanly
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    tag = uuid.uuid4().hex[:6]
    topics = TopicsConfig(
        commands=f"demo.{tag}.commands", search=f"demo.{tag}.search", dlq=f"demo.{tag}.dlq"
    )
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    say(
        f"creating topics {topics.commands} and {topics.search} ({PARTITIONS} partitions "
        "each: partition p of both belongs to one worker)"
    )
    await asyncio.to_thread(
        create_topics,
        bootstrap,
        {topics.commands: PARTITIONS, topics.search: PARTITIONS, topics.dlq: 1},
    )
    workers.env.update(
        {
            "LHV_COMMANDS_TOPIC": topics.commands,
            "LHV_SEARCH_TOPIC": topics.search,
            "LHV_DLQ_TOPIC": topics.dlq,
            "LHV_GROUP_ID": f"demo-{tag}",
            "LHV_S3_PREFIX": f"demo/{tag}/",
            "LHV_CHECKPOINT_SECONDS": "5",
            "LHV_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        }
    )
    say(f"starting two workers, worker-1 and worker-2, in group demo-{tag}")
    note(f"their logs: {workers.logdir}")
    workers.start("worker-1")
    workers.start("worker-2")

    report: dict[str, str] = {}
    async with LhvClient(bootstrap, topics=topics, timeout_s=120) as client:
        say(f"creating index {INDEX}: cosine, {args.dim} dims, HNSW M=16 ef_construction=200")
        note("(the command goes through Kafka; the owning worker acknowledges it)")
        await client.create(INDEX, dim=args.dim, space="cosine", M=16, ef_construction=200)
        workers.check_alive()

        say(f"loading {args.vectors:,} clustered vectors through Kafka ({args.batch} per record)")
        data = clustered(args.vectors, args.dim, seed=1)
        ids = [f"doc-{i}" for i in range(args.vectors)]
        started = time.monotonic()
        last = await _load(client, ids, data, args.batch)
        ingest_s = time.monotonic() - started
        report["vectors loaded"] = f"{args.vectors:,} x {args.dim}"
        report["ingest rate"] = f"{args.vectors / ingest_s:,.0f} vectors/s (first send to last ack)"
        note(f"all applied in {ingest_s:.1f} s; the last record is at offset {last.offset}")

        say("read-your-writes: add one vector, then search at once naming its offset")
        fresh = clustered(1, args.dim, seed=2)
        wrote = await client.add(INDEX, ["fresh-1"], fresh)
        hits = await client.search(INDEX, fresh[0], k=1, after=wrote)
        if not hits or hits[0].id != "fresh-1":
            raise DemoFailed(f"read-your-writes: expected fresh-1 first, got {hits[:1]}")
        note(
            f"the add landed at offset {wrote.offset}; the query waited for it and found "
            f"{hits[0].id} (distance {abs(hits[0].distance):.4f})"
        )

        say(f"searching: {args.queries} queries one at a time, k={K}, ef={EF}")
        note("recall@10 is checked against exact brute force over the same vectors")
        queries = clustered(args.queries, args.dim, seed=3)
        truth = exact_top_k(data, queries, K)
        latencies, found = [], 0
        for q, true_rows in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            hits = await client.search(INDEX, q, k=K, ef=EF, after=wrote)
            latencies.append((time.perf_counter() - t0) * 1000)
            got = {int(h.id[4:]) for h in hits if h.id.startswith("doc-")}
            found += len(got & set(true_rows.tolist()))
        report["search p50"] = f"{np.percentile(latencies, 50):.2f} ms (request/reply over Kafka)"
        report["search p99"] = f"{np.percentile(latencies, 99):.2f} ms"
        report["recall@10"] = f"{found / (K * args.queries):.4f} (ef={EF}, vs exact)"
        note(
            f"latency p50 {np.percentile(latencies, 50):.2f} ms, p99 "
            f"{np.percentile(latencies, 99):.2f} ms; recall@10 {found / (K * args.queries):.4f}"
        )

        stats = await client.stats(INDEX)
        owner = str(stats["worker"])
        say(
            f"{INDEX} lives on partition {stats['partition']}, owned by {owner}; waiting for "
            "its checkpoint (snapshot + manifest) to reach S3"
        )
        deadline = time.monotonic() + 60
        while int(stats["checkpoint_offset"]) < int(stats["applied_offset"]):
            if time.monotonic() > deadline:
                raise DemoFailed("no checkpoint within 60 s")
            await asyncio.sleep(0.5)
            stats = await client.stats(INDEX)
        note(f"the checkpoint covers offset {stats['checkpoint_offset']}")
        tail = clustered(100, args.dim, seed=4)
        tail_ids = [f"tail-{i}" for i in range(len(tail))]
        await client.add(INDEX, tail_ids, tail, ack=True)
        note("100 more vectors added and acknowledged after the checkpoint: only Kafka has them")
        expected = args.vectors + 1 + len(tail)

        say(f"kill -9 {owner} (no shutdown, no final checkpoint)")
        killed = time.monotonic()
        workers.kill9(owner)
        note(
            f"the group notices after the session timeout ({SESSION_TIMEOUT_MS / 1000:.0f} s); "
            "the survivor then loads the snapshot from S3 and replays the tail"
        )
        answered = await until_answered(client, INDEX, queries[0], limit_s=120)
        recovery_s = answered - killed
        after = await client.stats(INDEX)
        survivor = str(after["worker"])
        report["recovery time"] = f"{recovery_s:.1f} s (kill -9 until {survivor} answers)"
        note(f"{survivor} answers for {INDEX} {recovery_s:.1f} s after the kill")
        if after["count"] != expected:
            raise DemoFailed(f"expected {expected} items after takeover, found {after['count']}")
        hits = await client.search(INDEX, tail[0], k=1)
        if not hits or hits[0].id != "tail-0":
            raise DemoFailed("a write acknowledged after the checkpoint was lost")
        note(f"it holds all {expected:,} items, the post-checkpoint writes replayed from Kafka")
        report["writes lost"] = "0 (every acknowledged write survived the kill)"
    return report


#: a log line of `lhv worker` at ERROR or above (text format: `HH:MM:SS LEVEL name: msg`)
_BAD_LINE = re.compile(r"^\S+ (ERROR|CRITICAL)\b|^Traceback \(most recent call last\)")


def bad_log_lines(logdir: Path) -> list[str]:
    """`file: line` of every ERROR/CRITICAL line and traceback in the workers' logs."""
    found = []
    for path in sorted(logdir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if _BAD_LINE.search(line):
                found.append(f"{path.name}: {line}")
    return found


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    for noisy in ("aiokafka", "worker.dev.stack", "worker.client.client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM cleans up like Ctrl-C
    logdir = Path(tempfile.mkdtemp(prefix="lhv-demo-"))
    started = time.monotonic()
    try:
        with _stack() as env:
            workers = _Workers(dict(os.environ) | env, logdir)
            try:
                report = asyncio.run(_demo(args, env, workers))
            finally:
                signal.signal(signal.SIGTERM, _raise_interrupt)  # the loop's handler is gone
                say("stopping the workers (SIGTERM: each checkpoints and leaves the group)")
                problems = workers.stop_all()
            if problems:
                print("   " + "; ".join(problems), file=sys.stderr)
                return 1
            bad = bad_log_lines(logdir)
            if bad:
                print(f"\ndemo FAILED: the workers logged errors ({logdir}):", file=sys.stderr)
                for line in bad[:20]:
                    print(f"   {line}", file=sys.stderr)
                return 1
            report["worker logs"] = "no ERROR line, no traceback"
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; everything started was stopped (logs in {logdir})", file=sys.stderr)
        return 130
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc} (worker logs in {logdir})", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"\ndemo FAILED: {exc!r} (worker logs in {logdir})", file=sys.stderr)
        return 1
    say(f"report ({time.monotonic() - started:.0f} s in all)")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"   {key:<{width}}  {value}")
    return 0
