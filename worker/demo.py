"""`lhv demo`: LHV end to end on the local stack, in about a minute.

What it does, and says as it goes:

1. starts the local stack (Kafka KRaft + SeaweedFS S3), or uses the one named by
   `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_ENDPOINT_URL`;
2. creates its own topics and starts two `lhv worker` processes in one consumer group;
3. creates two indexes and loads clustered vectors into them through Kafka, with a
   progress bar;
4. searches with read-your-writes (each query waits for the writes before it) and checks
   recall@10 against exact brute force;
5. kills (SIGKILL) the worker that owns the first index, and times how long until the
   other worker, restoring from the S3 snapshot and replaying the topic tail, answers a
   query for it;
6. prints a report, then stops everything it started (also on failure or Ctrl-C).

Exit code 0 when every step worked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from tqdm import tqdm

from lhv_index.errors import LhvError

__all__ = ["add_arguments", "run"]

PARTITIONS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", type=int, default=20_000, help="vectors per index (20000)")
    parser.add_argument("--dim", type=int, default=64, help="dimensions (64)")
    parser.add_argument("--queries", type=int, default=300, help="search queries (300)")
    parser.add_argument("--batch", type=int, default=500, help="vectors per add record (500)")


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def clustered(n: int, dim: int, seed: int, n_clusters: int = 50) -> np.ndarray:
    """Clustered data (uniform random data hides recall problems)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    which = rng.integers(0, n_clusters, size=n)
    return (centres[which] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Cosine top-k by brute force: the truth recall is measured against."""
    d = data / np.linalg.norm(data, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ d.T), axis=1)[:, :k]


@dataclass
class _Workers:
    """The demo's `lhv worker` processes."""

    env: dict[str, str]
    logdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker"],
            env={**self.env, "LHV_WORKER_ID": name},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> list[str]:
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
    if os.environ.get("LHV_BOOTSTRAP_SERVERS") and os.environ.get("LHV_S3_ENDPOINT_URL"):
        say(f"using the running stack at {os.environ['LHV_BOOTSTRAP_SERVERS']}")
        yield {k: v for k, v in os.environ.items() if k.startswith(("LHV_", "AWS_"))}
        return
    from worker.stack import LocalStack

    say("starting the local stack: Kafka 3.9 (KRaft) + SeaweedFS S3, on loopback")
    local = LocalStack()
    local.start()
    print(
        f"   ready in {local.ready_s:.1f} s: kafka {local.bootstrap_servers}, "
        f"s3 {local.s3_endpoint_url}"
    )
    try:
        yield local.env()
    finally:
        say("stopping the local stack")
        local.stop()


async def _create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics(
            [
                NewTopic(
                    n, num_partitions=1 if n.endswith("dlq") else PARTITIONS, replication_factor=1
                )
                for n in names
            ]
        )
        for topic, code, *rest in resp.topic_errors:
            if code not in (0, 36):
                raise RuntimeError(f"cannot create topic {topic}: error {code} {rest}")
    finally:
        await admin.close()


async def _until_answered(client: Any, index: str, query: np.ndarray, timeout_s: float) -> float:
    """Seconds until a search for `index` is answered (retrying not_ready / timeouts)."""
    start = time.monotonic()
    while True:
        try:
            await client.search(index, query, k=1, timeout_s=5)
            return time.monotonic() - start
        except (LhvError, TimeoutError):
            if time.monotonic() - start > timeout_s:
                raise
            await asyncio.sleep(0.2)


async def _demo(args: argparse.Namespace, env: dict[str, str], workers: _Workers) -> dict[str, Any]:
    from worker.client import LhvClient
    from worker.config import TopicsConfig

    tag = uuid.uuid4().hex[:6]
    topics = TopicsConfig(
        commands=f"demo.{tag}.commands", search=f"demo.{tag}.search", dlq=f"demo.{tag}.dlq"
    )
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    await _create_topics(bootstrap, [topics.commands, topics.search, topics.dlq])
    workers.env.update(
        {
            "LHV_COMMANDS_TOPIC": topics.commands,
            "LHV_SEARCH_TOPIC": topics.search,
            "LHV_DLQ_TOPIC": topics.dlq,
            "LHV_GROUP_ID": f"demo-{tag}",
            "LHV_S3_PREFIX": f"demo/{tag}/",
            "LHV_CHECKPOINT_SECONDS": "5",
            "LHV_SESSION_TIMEOUT_MS": "6000",
        }
    )
    say(f"starting two workers in group demo-{tag} (logs in {workers.logdir})")
    workers.start("worker-1")
    workers.start("worker-2")

    report: dict[str, Any] = {}
    async with LhvClient(bootstrap, topics=topics, timeout_s=60) as client:
        names = ["demo-a", "demo-b"]
        say(f"creating indexes {', '.join(names)} (cosine, dim {args.dim})")
        for name in names:
            await client.create(name, dim=args.dim, space="cosine", M=16, ef_construction=100)

        say(f"loading {args.vectors:,} clustered vectors into each index through Kafka")
        data = {name: clustered(args.vectors, args.dim, seed=i) for i, name in enumerate(names)}
        ids = [f"doc-{i}" for i in range(args.vectors)]
        started = time.monotonic()
        last = {}
        with tqdm(total=args.vectors * len(names), unit="vec", unit_scale=True) as bar:
            for start in range(0, args.vectors, args.batch):
                for name in names:
                    end = min(start + args.batch, args.vectors)
                    last[name] = await client.add(name, ids[start:end], data[name][start:end])
                    bar.update(end - start)
        for name in names:  # read-your-writes: answered only once everything is applied
            await client.search(name, data[name][0], k=1, after=last[name], timeout_s=300)
        ingest_s = time.monotonic() - started
        report["vectors loaded"] = args.vectors * len(names)
        report["ingest rate"] = f"{args.vectors * len(names) / ingest_s:,.0f} vectors/s"
        print(f"   applied in {ingest_s:.1f} s")

        say(f"searching: {args.queries} queries with read-your-writes, recall@10 vs exact")
        rng = np.random.default_rng(7)
        name = names[0]
        queries = data[name][rng.integers(0, args.vectors, args.queries)]
        queries = queries + 0.05 * rng.normal(size=queries.shape).astype(np.float32)
        truth = exact_top_k(data[name], queries, 10)
        latencies, found = [], 0
        for q, true_ids in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            hits = await client.search(name, q, k=10, ef=64, after=last[name])
            latencies.append((time.perf_counter() - t0) * 1000)
            found += len({int(h.id[4:]) for h in hits} & set(true_ids.tolist()))
        report["search p50"] = f"{np.percentile(latencies, 50):.2f} ms"
        report["search p99"] = f"{np.percentile(latencies, 99):.2f} ms"
        report["recall@10"] = f"{found / (10 * args.queries):.4f}"
        print(
            f"   p50 {report['search p50']}, p99 {report['search p99']}, "
            f"recall@10 {report['recall@10']}"
        )

        stats = await client.stats(name)
        owner = str(stats["worker"])
        say(
            f"{name} lives on partition {stats['partition']}, owned by {owner}; waiting for "
            f"its checkpoint to reach S3"
        )
        deadline = time.monotonic() + 60
        while int(stats["checkpoint_offset"]) < int(stats["applied_offset"]):
            if time.monotonic() > deadline:
                raise RuntimeError("no checkpoint in 60 s")
            await asyncio.sleep(1)
            stats = await client.stats(name)
        print(f"   checkpoint covers offset {stats['checkpoint_offset']}")
        # a few writes after the checkpoint: the survivor must replay them from Kafka
        tail = clustered(100, args.dim, seed=99)
        await client.add(name, [f"tail-{i}" for i in range(100)], tail)

        say(f"kill -9 {owner}")
        workers.kill9(owner)
        recovery_s = await _until_answered(client, name, queries[0], timeout_s=120)
        after = await client.stats(name)
        report["recovery time"] = f"{recovery_s:.1f} s (kill -9 until answered)"
        print(
            f"   {after['worker']} answers for {name} after {recovery_s:.1f} s; it holds "
            f"{after['count']:,} items (expected {args.vectors + 100:,})"
        )
        if after["count"] != args.vectors + 100:
            raise RuntimeError(f"expected {args.vectors + 100} items, found {after['count']}")
        hits = await client.search(name, tail[0], k=1)
        if not hits or hits[0].id != "tail-0":
            raise RuntimeError("a write made after the checkpoint was lost")
        print("   the writes made after the checkpoint were replayed from Kafka")
    return report


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    logdir = Path(tempfile.mkdtemp(prefix="lhv-demo-"))
    try:
        with _stack() as env:
            workers = _Workers(dict(os.environ) | env, logdir)
            try:
                report = asyncio.run(_demo(args, env, workers))
            finally:
                say("stopping the workers (SIGTERM: checkpoint, leave the group)")
                problems = workers.stop_all()
            if problems:
                print("   " + "; ".join(problems), file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\ndemo FAILED: {exc!r} (worker logs in {logdir})", file=sys.stderr)
        return 1
    say("report")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"   {key:<{width}}  {value}")
    return 0
