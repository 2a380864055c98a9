"""A sharded index against an unsharded one, and raw hnswlib, on the same data in one run.

One clustered set (bench/data.py) of `--n` x `--dim`, space cosine, M=16,
ef_construction=200, ef=64, k=10, loaded and searched through `LhvClient` in each
configuration of `--configs` (SHARDSxPROCESSES; default `1x1,2x2`: S=1 on one worker
process against S=2 on two, `lhv worker --processes 2`), each on fresh 2-partition
topics. For S=2 the index's name is chosen so that its two shards land on different
partitions, hence on different worker processes (a shard's partition is a hash of its
key; see docs/CAPACITY.md). Measures, per configuration:

- ingest: `LhvClient.add` of the N vectors in records of `--record-items`, from the first
  record produced until a read-your-writes search of the last write is answered (for a
  sharded index the client splits the writes by shard and each member is waited for);
- search: `--concurrency` closed-loop requesters in one client answer
  `--concurrent-queries` queries (QPS); recall@k against brute force;
- CPU: user + system seconds from /proc of the worker processes (a `--processes` parent
  and its children) and of this process (the client), Kafka and S3 when the stack names
  their pids; per vector ingested and per query answered.

Raw hnswlib in this process is the yardstick: `add_items` of `--chunk`-row batches
(`max_elements` up front) and `knn_query` in batches of `--concurrency`, with its CPU
seconds. Kafka and S3 come from `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_*` when set (e.g.
`lhv stack up`), else a private local stack is started and stopped.

    python bench/bench_shards.py                  # 400 000 x 128: a long run on 2 cores
    python bench/bench_shards.py --quick          # 20 000 x 128, a check of the plumbing
    make bench-shards BENCH_ARGS="--n 100000 --json bench/results/shards.json"

Prints absolutes and ratios, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from aiokafka.errors import KafkaError  # noqa: E402

from bench.bench_e2e import _concurrent, _cpu_s, _data, _ids, _recall, _truth  # noqa: E402
from bench.data import queries  # noqa: E402
from bench.stackenv import stack_env, worker_env, write_results  # noqa: E402
from worker.client import LhvClient  # noqa: E402
from worker.dev.demo import until_answered  # noqa: E402

__all__ = ["main"]

SPACE = "cosine"
#: partitions of every configuration's topics: one per worker process of the largest
PARTITIONS = 2


# -- raw hnswlib -----------------------------------------------------------------------


def _raw(
    data: np.ndarray, q: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """Build, then search in batches of `--concurrency`; times and CPU seconds."""
    n, dim = data.shape
    index = hnswlib.Index(space=SPACE, dim=dim)
    index.init_index(max_elements=n, M=args.M, ef_construction=args.ef_construction)
    cpu0, t0 = _cpu_s("self"), time.perf_counter()
    for start in range(0, n, args.chunk):
        part = data[start : start + args.chunk]
        index.add_items(part, np.arange(start, start + len(part)))
    ingest_s, ingest_cpu = time.perf_counter() - t0, _cpu_s("self") - cpu0
    index.set_ef(args.ef)
    found, _ = index.knn_query(q, k=args.k)
    recall = _recall([set(row.tolist()) for row in found], truth)
    total = max(args.concurrent_queries, len(q))
    c = args.concurrency
    cpu0, t0 = _cpu_s("self"), time.perf_counter()
    done = 0
    while done < total:
        rows = [(done + i) % len(q) for i in range(min(c, total - done))]
        index.knn_query(q[rows], k=args.k)
        done += len(rows)
    search_s, search_cpu = time.perf_counter() - t0, _cpu_s("self") - cpu0
    return {
        "ingest_s": ingest_s,
        "ingest_cpu_us_per_vector": 1e6 * ingest_cpu / n,
        "qps": total / search_s,
        "search_cpu_ms_per_query": 1000 * search_cpu / total,
        "recall": recall,
    }


# -- workers ---------------------------------------------------------------------------


class _Workers:
    """`lhv worker` (one process) or `lhv worker --processes N` (a parent and N
    children), logging to a file."""

    def __init__(self, env: dict[str, str], processes: int, log: Path) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker"]
        if processes > 1:
            cmd += ["--processes", str(processes)]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )

    def pids(self) -> list[int]:
        """This process and its children (the worker processes of a parent)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        children = [int(p) for p in path.read_text().split()] if path.exists() else []
        return [self.proc.pid, *children]

    def stop(self, timeout_s: float = 300) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


class _Cpu:
    """CPU seconds used by groups of processes between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, list[int | str]]) -> None:
        self.groups = {name: [p for p in pids if p] for name, pids in groups.items()}
        self._t0: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(_cpu_s(p) for p in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self._t0[name] for name in self.groups}


async def _wait_members(bootstrap: str, group: str, members: int, timeout_s: float = 180) -> None:
    """Until the group is stable with `members` members, each owning partitions."""
    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            [response] = await admin.describe_consumer_groups([group])
            desc = response.to_object()["groups"][0]
            owning = [m for m in desc["members"] if m["member_assignment"]]
            if desc["state"] == "Stable" and len(owning) == len(desc["members"]) == members:
                return
        except KafkaError:
            pass  # the group's coordinator is not there yet
        finally:
            await admin.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"group {group} did not settle on {members} members")
        await asyncio.sleep(0.5)


def _spread_name(shards: int) -> str:
    """An index name; its members sit on consecutive partitions, so up to PARTITIONS of
    them never share one (`worker.wire.shards.member_partition`)."""
    return f"shards-{shards}"


async def _lhv(
    env: dict[str, str],
    shards: int,
    processes: int,
    data: np.ndarray,
    q: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    logdir: Path,
) -> dict[str, Any]:
    n, dim = data.shape
    topics, _s3, child = await worker_env(env, f"shards{shards}x{processes}", partitions=PARTITIONS)
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    workers = _Workers(child, processes, logdir / f"s{shards}-p{processes}.log")
    out: dict[str, Any] = {"shards": shards, "processes": processes}
    try:
        await _wait_members(bootstrap, child["LHV_GROUP_ID"], processes)
        cpu = _Cpu(
            {
                "workers": list(workers.pids()),
                "client": ["self"],
                "kafka": [int(env.get("LHV_STACK_KAFKA_PID") or 0)],
                "s3": [int(env.get("LHV_STACK_S3_PID") or 0)],
            }
        )
        name = _spread_name(shards)
        params: dict[str, Any] = {"M": args.M, "ef_construction": args.ef_construction}
        if shards > 1:
            params["shards"] = shards
        async with LhvClient(bootstrap, topics=topics, timeout_s=600) as client:
            await client.create(name, dim=dim, space=SPACE, timeout_s=120, **params)
            await until_answered(client, name, q[0], 120)
            ids = _ids(n)
            cpu.start()
            t0 = time.perf_counter()
            last = await client.add(name, ids, data, batch_size=args.record_items)
            await client.search(name, data[0], k=1, after=last, timeout_s=1800)
            out["ingest_s"] = time.perf_counter() - t0
            used = cpu.stop()
            out["ingest_cpu_s"] = used
            out["ingest_cpu_us_per_vector"] = {k: 1e6 * v / n for k, v in used.items()}
            stats = await client.stats(name)
            assert stats["count"] == n, stats
            out["stats_shards"] = stats.get("shards")

            for row in q[:50]:  # warm up
                await client.search(name, row, k=args.k, ef=args.ef)
            total = max(args.concurrent_queries, len(q))
            cpu.start()
            qps, found = await _concurrent(client, name, q, total, args)
            used = cpu.stop()
            out["qps"] = qps
            out["search_cpu_ms_per_query"] = {k: 1000 * v / total for k, v in used.items()}
            out["recall"] = _recall([found[i] for i in range(len(q))], truth)
    finally:
        code = workers.stop()
    out["workers_exit_code"] = code
    if code != 0:
        raise RuntimeError(f"the workers exited {code}; see {workers.log}")
    return out


# -- report ----------------------------------------------------------------------------


def _report(raw: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    heads = ["raw hnswlib"] + [f"S={r['shards']}, {r['processes']} proc." for r in runs]

    def row(label: str, values: list[float | None], fmt: str) -> None:
        cells = ["" if v is None else format(v, fmt) for v in values]
        print(f"| {label} | " + " | ".join(cells) + " |")

    print("| measure | " + " | ".join(heads) + " |")
    print("| --- |" + " ---: |" * len(heads))
    row("ingest (s)", [raw["ingest_s"], *(r["ingest_s"] for r in runs)], ".2f")
    n = runs[0]["n"] if runs else 0
    row("ingest (vectors/s)", [n / raw["ingest_s"], *(n / r["ingest_s"] for r in runs)], ",.0f")
    row(
        "ingest CPU us per vector, workers",
        [
            raw["ingest_cpu_us_per_vector"],
            *(r["ingest_cpu_us_per_vector"]["workers"] for r in runs),
        ],
        ".0f",
    )
    row(
        "ingest CPU us per vector, all processes",
        [
            raw["ingest_cpu_us_per_vector"],
            *(sum(r["ingest_cpu_us_per_vector"].values()) for r in runs),
        ],
        ".0f",
    )
    row("search QPS, 64 requesters", [raw["qps"], *(r["qps"] for r in runs)], ",.0f")
    row(
        "search CPU ms per query, workers",
        [raw["search_cpu_ms_per_query"], *(r["search_cpu_ms_per_query"]["workers"] for r in runs)],
        ".3f",
    )
    row(
        "search CPU ms per query, all processes",
        [
            raw["search_cpu_ms_per_query"],
            *(sum(r["search_cpu_ms_per_query"].values()) for r in runs),
        ],
        ".3f",
    )
    row("recall@k", [raw["recall"], *(r["recall"] for r in runs)], ".4f")
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        print(
            f"\nS={b['shards']}/{b['processes']} against S={a['shards']}/{a['processes']}: "
            f"ingest time {b['ingest_s'] / a['ingest_s']:.2f}x, QPS {b['qps'] / a['qps']:.2f}x, "
            "worker CPU per vector "
            f"{b['ingest_cpu_us_per_vector']['workers'] / a['ingest_cpu_us_per_vector']['workers']:.2f}x, "
            "worker CPU per query "
            f"{b['search_cpu_ms_per_query']['workers'] / a['search_cpu_ms_per_query']['workers']:.2f}x"
        )


def _config(text: str) -> tuple[int, int]:
    shards, _, processes = text.partition("x")
    return int(shards), int(processes or 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400_000, help="vectors")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument(
        "--configs", default="1x1,2x2", help="SHARDSxPROCESSES,... (1x1,2x2; at most 2 processes)"
    )
    ap.add_argument("--quick", action="store_true", help="20 000 vectors, fewer queries")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", type=int, default=64, help="search ef on every side")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000, help="query set (recall, QPS)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent requesters")
    ap.add_argument("--concurrent-queries", type=int, default=6000, help="queries per QPS run")
    ap.add_argument("--chunk", type=int, default=10_000, help="raw add_items batch rows")
    ap.add_argument("--record-items", type=int, default=1000, help="items per add record")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.concurrent_queries = 20_000, 300, 1_000
    configs = [_config(c) for c in args.configs.split(",")]
    if any(p > PARTITIONS or s < 1 or p < 1 for s, p in configs):
        ap.error(f"--configs: 1 <= processes <= {PARTITIONS}, shards >= 1")

    started = time.monotonic()
    data = _data(args.n, args.dim)
    q = queries(args.queries, args.dim)
    truth = _truth(data, q, args.k)
    print(f"== {args.n} x {args.dim}: raw hnswlib", flush=True)
    raw = _raw(data, q, truth, args)
    runs = []
    with stack_env() as env, tempfile.TemporaryDirectory(prefix="lhv-bench-shards-") as tmp:
        for shards, processes in configs:
            print(f"== S={shards} on {processes} worker process(es)", flush=True)
            try:
                run = asyncio.run(_lhv(env, shards, processes, data, q, truth, args, Path(tmp)))
            except BaseException:
                for log in sorted(Path(tmp).glob("*.log")):
                    print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
                raise
            runs.append({"n": args.n, "dim": args.dim, **run})
            print(f"  done ({time.monotonic() - started:.0f} s)", flush=True)
    wall_s = time.monotonic() - started
    print(f"\nwall clock {wall_s:.0f} s, {os.cpu_count()} CPUs, load {os.getloadavg()}\n")
    _report(raw, runs)
    doc = {
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "wall_s": wall_s,
        "n": args.n,
        "dim": args.dim,
        "params": {"space": SPACE, "M": args.M, "ef_construction": args.ef_construction},
        "ef": args.ef,
        "k": args.k,
        "concurrency": args.concurrency,
        "raw": raw,
        "runs": runs,
    }
    write_results(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
