"""Search throughput of one index with 0, 1 and 2 read replicas, against raw hnswlib in
the same run.

One index (one partition) on its own topics, an owner `lhv worker` subprocess, and
`lhv worker --replica` subprocesses added one at a time, each in its own replica group
on its own replica search topic (so each copy takes its share of the queries; replica
groups on one topic would all answer every query). For 0, 1 and 2 replicas,
`--concurrency` closed-loop requesters in one `LhvClient(replicas=True,
replica_topics=...)` answer `--queries` searches (round-robin over the owner and the
replicas, no hedging: every query is computed once): QPS, and CPU seconds per query of
the worker processes together (owner + replicas). Raw hnswlib `knn_query` on the same
vectors and parameters, in batches of `--concurrency` queries (the most the workers can
batch with that many requesters), gives QPS and CPU per query for the ratios.

Then, with the replicas still up, the owner is killed with SIGKILL under `--kill-requesters`
(32) closed-loop requesters in a hedging client (`hedge_after_ms`, `--hedge-ms`): every
query must still get exactly one answer; prints how many ran in the `--kill-window-s`
after the kill, how many failed, and the worst and p99 wait (the hedge bound plus a
replica's answer, not a timeout).

The machine's cores bound what replicas can add: on 2 cores the owner, the replicas,
Kafka, S3 and the client share them, so the ratios say more than the absolutes.

    python bench/replicas.py --quick            # a small set, ~1 min
    python bench/replicas.py --n 100000         # (make bench-replicas)

Kafka and S3 come from `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_*` when set, else a private
local stack is started and stopped. Prints a table, then one JSON object (also written
to `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_e2e import _cpu_s, _Worker  # noqa: E402
from bench.data import clustered, queries  # noqa: E402
from bench.stackenv import stack_env, worker_env, write_results  # noqa: E402
from worker.client import LhvClient  # noqa: E402
from worker.dev.stack import create_topics  # noqa: E402

__all__ = ["main"]

SPACE = "cosine"


def _raw(data: np.ndarray, q: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Raw hnswlib: QPS and CPU ms per query of `knn_query` in batches of
    `--concurrency`, the best of three runs."""
    index = hnswlib.Index(space=SPACE, dim=data.shape[1])
    index.init_index(max_elements=len(data), M=args.M, ef_construction=args.ef_construction)
    index.add_items(data, np.arange(len(data)))
    index.set_ef(args.ef)
    best: dict[str, float] = {}
    for _ in range(3):
        cpu0, t0 = _cpu_s("self"), time.perf_counter()
        for start in range(0, len(q), args.concurrency):
            index.knn_query(q[start : start + args.concurrency], k=args.k)
        qps = len(q) / (time.perf_counter() - t0)
        cpu_ms = 1000 * (_cpu_s("self") - cpu0) / len(q)
        if qps > best.get("qps", 0.0):
            best = {"qps": qps, "cpu_ms_per_query": cpu_ms}
    return best


async def _load(client: LhvClient, name: str, data: np.ndarray, args: argparse.Namespace) -> int:
    """Create the index and add the vectors; returns the offset of the last write."""
    params = {"M": args.M, "ef_construction": args.ef_construction, "ef_search": args.ef}
    await client.create(name, dim=data.shape[1], space=SPACE, timeout_s=120, **params)
    ids = [f"v{i}" for i in range(len(data))]
    last = await client.add(name, ids, data, batch_size=1000)
    await client.stats(name, after=last, timeout_s=1800)
    return last.offset


async def _ready(bootstrap: str, topics: Any, topic: str, name: str, offset: int) -> None:
    """Until the copy reading `topic` has applied `offset` (bounded)."""
    from dataclasses import replace

    async with LhvClient(bootstrap, topics=replace(topics, search=topic), timeout_s=600) as c:
        await c.query(name, {"op": "stats"}, min_offset=offset, timeout_s=600)


async def _run(
    bootstrap: str,
    topics: Any,
    replica_topics: list[str],
    name: str,
    q: np.ndarray,
    pids: list[int],
    args: argparse.Namespace,
) -> dict[str, float]:
    """`--queries` searches by `--concurrency` requesters over the owner and the copies."""
    async with LhvClient(
        bootstrap,
        topics=topics,
        timeout_s=120,
        replicas=bool(replica_topics),
        replica_topics=replica_topics or None,
        hedge_after_ms=None,
    ) as client:
        await client.search_many(name, q[: args.concurrency], k=args.k, ef=args.ef)  # warm
        rows = iter(range(args.queries))

        async def requester() -> None:
            for i in rows:
                await client.search(name, q[i % len(q)], k=args.k, ef=args.ef)

        cpu0 = sum(_cpu_s(pid) for pid in pids)
        t0 = time.perf_counter()
        await asyncio.gather(*(requester() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = sum(_cpu_s(pid) for pid in pids) - cpu0
    return {"qps": args.queries / elapsed, "cpu_ms_per_query": 1000 * cpu / args.queries}


async def _kill_under_load(
    bootstrap: str,
    topics: Any,
    replica_topics: list[str],
    name: str,
    q: np.ndarray,
    owner: _Worker,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Kill the owner under load from a hedging client; the waits of the queries that
    overlap the kill."""
    waits: list[float] = []
    failed = 0
    async with LhvClient(
        bootstrap,
        topics=topics,
        timeout_s=30,
        replicas=True,
        replica_topics=replica_topics,
        hedge_after_ms=args.hedge_ms,
    ) as client:
        await client.search(name, q[0], k=args.k, ef=args.ef)
        stop = asyncio.Event()
        killed: list[float] = []

        async def requester(j: int) -> None:
            nonlocal failed
            i = j
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    await client.search(name, q[i % len(q)], k=args.k, ef=args.ef)
                except Exception:
                    failed += 1
                if killed and t0 >= killed[0] - 1.0:
                    waits.append(time.perf_counter() - t0)
                i += args.kill_requesters

        tasks = [asyncio.create_task(requester(j)) for j in range(args.kill_requesters)]
        await asyncio.sleep(2.0)
        killed.append(time.perf_counter())
        os.kill(owner.proc.pid, signal.SIGKILL)
        await asyncio.sleep(args.kill_window_s)
        stop.set()
        await asyncio.gather(*tasks)
    waits.sort()
    out = {
        "queries": float(len(waits)),
        "failed": float(failed),
        "worst_wait_s": waits[-1] if waits else 0.0,
        "p99_wait_s": waits[int(0.99 * (len(waits) - 1))] if waits else 0.0,
        "median_wait_s": waits[len(waits) // 2] if waits else 0.0,
    }
    print(
        f"  owner killed under {args.kill_requesters} requesters, {len(replica_topics)} "
        f"replicas, hedge {args.hedge_ms} ms: {len(waits)} queries in {args.kill_window_s:g} s, "
        f"{failed} failed, wait median {out['median_wait_s'] * 1000:.1f} ms, p99 "
        f"{out['p99_wait_s'] * 1000:.1f} ms, worst {out['worst_wait_s'] * 1000:.1f} ms",
        flush=True,
    )
    return out


async def _lhv(
    env: dict[str, str], data: np.ndarray, q: np.ndarray, args: argparse.Namespace, logdir: Path
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    topics, _s3, child = await worker_env(env, "replicas")
    copies = [f"{topics.search}.replicas{i}" for i in range(1, 3)]
    await asyncio.to_thread(create_topics, bootstrap, dict.fromkeys(copies, 1))
    name = "bench"
    owner = _Worker(child, logdir / "owner.log")
    replicas: list[_Worker] = []
    out: dict[int, dict[str, float]] = {}
    try:
        async with LhvClient(bootstrap, topics=topics, timeout_s=600) as client:
            offset = await _load(client, name, data, args)
        for count in range(3):
            if count:
                replicas.append(
                    _Worker(
                        {
                            **child,
                            "LHV_ROLE": "replica",
                            "LHV_REPLICA_GROUP": f"{child['LHV_GROUP_ID']}.replicas{count}",
                            "LHV_REPLICA_SEARCH_TOPIC": copies[count - 1],
                        },
                        logdir / f"replica{count}.log",
                    )
                )
                await _ready(bootstrap, topics, copies[count - 1], name, offset)
            pids = [owner.proc.pid, *(r.proc.pid for r in replicas)]
            out[count] = await _run(bootstrap, topics, copies[:count], name, q, pids, args)
            print(
                f"  {count} replicas: {out[count]['qps']:.0f} QPS, "
                f"{out[count]['cpu_ms_per_query']:.3f} CPU ms/query",
                flush=True,
            )
        kill = await _kill_under_load(bootstrap, topics, copies, name, q, owner, args)
    finally:
        for worker in (*replicas, owner):
            with contextlib.suppress(Exception):
                worker.stop(timeout_s=60)
    return out, kill


def _report(raw: dict[str, float], lhv: dict[int, dict[str, float]]) -> dict[str, Any]:
    print(f"{'':>14} {'QPS':>9} {'x raw':>7} {'x 0 rep':>8} {'CPU ms/q':>9} {'x raw':>7}")
    print(f"{'raw hnswlib':>14} {raw['qps']:9.0f} {'':>7} {'':>8} {raw['cpu_ms_per_query']:9.3f}")
    rows: dict[str, Any] = {}
    for count, res in lhv.items():
        row = {
            **res,
            "qps_vs_raw": res["qps"] / raw["qps"],
            "qps_vs_no_replica": res["qps"] / lhv[0]["qps"],
            "cpu_vs_raw": res["cpu_ms_per_query"] / raw["cpu_ms_per_query"],
        }
        rows[str(count)] = row
        print(
            f"{f'{count} replicas':>14} {res['qps']:9.0f} {row['qps_vs_raw']:7.2f} "
            f"{row['qps_vs_no_replica']:8.2f} {res['cpu_ms_per_query']:9.3f} "
            f"{row['cpu_vs_raw']:7.2f}"
        )
    return {"raw": raw, "replicas": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="5000 x 32, 12000 queries per run")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=64, help="closed-loop requesters")
    ap.add_argument("--queries", type=int, default=20_000, help="searches per run")
    ap.add_argument("--kill-requesters", type=int, default=32, help="requesters during the kill")
    ap.add_argument("--hedge-ms", type=int, default=200, help="the client's hedge_after_ms")
    ap.add_argument("--kill-window-s", type=float, default=15.0, help="measured after the kill")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries, args.ef_construction = 5000, 32, 12_000, 100
    data = clustered(args.n, args.dim, seed=1)
    q = queries(min(args.queries, 2000), args.dim, seed=1)
    print(f"replicas: {args.n} x {args.dim}, {args.concurrency} requesters", flush=True)
    raw = _raw(data, q, args)
    with stack_env() as env, tempfile.TemporaryDirectory(prefix="lhv-bench-replicas-") as tmp:
        lhv, kill = asyncio.run(_lhv(env, data, q, args, Path(tmp)))
    doc = {
        "n": args.n,
        "dim": args.dim,
        "concurrency": args.concurrency,
        **_report(raw, lhv),
        "owner_killed": kill,
    }
    write_results(doc, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
