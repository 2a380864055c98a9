"""lhv_index against raw hnswlib, measured in the same run on the same data.

Measures, for each data set (clustered, see bench/data.py):

- ingest: `Index.apply` in batches vs `hnswlib.Index.add_items` on the same batches
  (goal: <= 1.10x);
- search: one query per call and one batched call, `Index.search` vs `knn_query`
  (recall@k of both against brute force is printed as a check);
- snapshot: `write_snapshot` + `read_snapshot` through a local file vs `save_index` +
  `load_index` (goal: <= 1.2x);

and, in subprocesses, the resident memory of an index of `--mem-n` vectors with string ids
and small metadata vs the raw hnswlib index alone (goal: <= 1.3x).

Prints a table of absolutes and ratios (medians over `--repeats`), then one JSON object.

    python bench/bench_index.py                      # defaults: a few minutes on 2 cores
    python bench/bench_index.py --sets 20000x128 --mem-n 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from bench.data import chunks, clustered, queries
from lhv_index import (
    Clock,
    Index,
    IndexParams,
    Space,
    Upsert,
    read_snapshot,
    write_snapshot,
)

__all__ = ["main"]


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def _truth(data: np.ndarray, q: np.ndarray, k: int, space: str) -> np.ndarray:
    if space == "cosine":
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if space == "l2":
        d = (q**2).sum(1)[:, None] + (data**2).sum(1)[None, :] - 2 * q @ data.T
    else:
        d = -(q @ data.T)
    return np.argsort(d, axis=1)[:, :k]


def bench_set(n: int, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    space = args.space
    data = clustered(n, dim, args.clusters, seed=1)
    q = queries(args.queries, dim, args.clusters, seed=1)
    ids = [f"doc-{i:08d}" for i in range(n)]
    batches = [(s, min(s + args.batch, n)) for s in range(0, n, args.batch)]
    writes = [
        [Upsert(ids[i], data[i], {"cat": i % 100}, Clock(0, b, i - s)) for i in range(s, e)]
        for b, (s, e) in enumerate(batches)
    ]
    params = IndexParams(
        dim=dim,
        space=Space(space),
        M=args.M,
        ef_construction=args.ef_construction,
        ef_search=args.ef,
    )
    res: dict[str, Any] = {"n": n, "dim": dim}

    def build_raw() -> hnswlib.Index:
        raw = hnswlib.Index(space=space, dim=dim)
        raw.init_index(max_elements=n, M=args.M, ef_construction=args.ef_construction)
        for s, e in batches:
            raw.add_items(data[s:e], np.arange(s, e, dtype=np.uint64))
        raw.set_ef(args.ef)
        return raw

    def build_lhv() -> Index:
        index = Index("bench", params)
        for batch in writes:
            index.apply(batch)
        return index

    raw_t, lhv_t = [], []
    raw = lhv = None
    for r in range(args.build_repeats):
        # alternate the order so neither side always runs on a warmer machine
        order = ("raw", "lhv") if r % 2 == 0 else ("lhv", "raw")
        for side in order:
            raw, lhv = None, None if side == "lhv" else lhv
            gc.collect()
            t0 = time.perf_counter()
            if side == "raw":
                raw = build_raw()
                raw_t.append(time.perf_counter() - t0)
            else:
                lhv = build_lhv()
                lhv_t.append(time.perf_counter() - t0)
        if r < args.build_repeats - 1:
            raw = lhv = None
    if raw is None:
        raw = build_raw()
    if lhv is None:
        lhv = build_lhv()
    res["ingest_raw_s"], res["ingest_lhv_s"] = _median(raw_t), _median(lhv_t)
    res["ingest_ratio"] = res["ingest_lhv_s"] / res["ingest_raw_s"]
    res["ingest_raw_vps"] = n / res["ingest_raw_s"]

    # search
    k = args.k
    truth = _truth(data, q, k, space)
    single_raw, single_lhv, batch_raw, batch_lhv = [], [], [], []
    nq1 = min(len(q), args.single_queries)
    for _ in range(args.repeats):
        single_raw.append(_timed(lambda: [raw.knn_query(q[i], k=k) for i in range(nq1)]))
        single_lhv.append(_timed(lambda: [lhv.search(q[i], k) for i in range(nq1)]))
        batch_raw.append(_timed(lambda: raw.knn_query(q, k=k)))
        batch_lhv.append(_timed(lambda: lhv.search(q, k)))
    res["search1_raw_qps"] = nq1 / _median(single_raw)
    res["search1_lhv_qps"] = nq1 / _median(single_lhv)
    res["search1_ratio"] = res["search1_raw_qps"] / res["search1_lhv_qps"]
    res["searchN_raw_qps"] = len(q) / _median(batch_raw)
    res["searchN_lhv_qps"] = len(q) / _median(batch_lhv)
    res["searchN_ratio"] = res["searchN_raw_qps"] / res["searchN_lhv_qps"]
    raw_labels = raw.knn_query(q, k=k)[0]
    lhv_hits = lhv.search(q, k)
    lhv_labels = np.array([[int(h.id[4:]) for h in row] for row in lhv_hits])
    res["recall_raw"], res["recall_lhv"] = _recall(raw_labels, truth), _recall(lhv_labels, truth)
    flt_t = [_timed(lambda: lhv.search(q[:100], k, filter={"cat": 7})) for _ in range(args.repeats)]
    res["filtered_1pct_lhv_qps"] = 100 / _median(flt_t)

    # snapshot through local files
    with tempfile.TemporaryDirectory(prefix="lhv-bench-") as tmp:
        raw_path, lhv_path = os.path.join(tmp, "raw.bin"), os.path.join(tmp, "lhv.lhv")
        raw_s, lhv_s = [], []
        for _ in range(args.repeats):

            def raw_round() -> None:
                raw.save_index(raw_path)
                back = hnswlib.Index(space=space, dim=dim)
                back.load_index(raw_path)

            def lhv_round() -> None:
                with open(lhv_path, "wb") as f:
                    write_snapshot(lhv, f, source={"offset": 0})
                with open(lhv_path, "rb") as f:
                    read_snapshot(f, expect=params)

            raw_s.append(_timed(raw_round))
            lhv_s.append(_timed(lhv_round))
            gc.collect()
        res["snapshot_raw_s"], res["snapshot_lhv_s"] = _median(raw_s), _median(lhv_s)
        res["snapshot_ratio"] = res["snapshot_lhv_s"] / res["snapshot_raw_s"]
        res["snapshot_raw_bytes"] = os.path.getsize(raw_path)
        res["snapshot_lhv_bytes"] = os.path.getsize(lhv_path)
    return res


# -- memory, in subprocesses -------------------------------------------------------------


def _rss() -> int:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def mem_child(side: str, n: int, dim: int, M: int, efc: int, space: str) -> None:
    """Build one index, print the resident bytes it added (run in a fresh process)."""
    base = _rss()
    t0 = time.perf_counter()
    if side == "raw":
        raw = hnswlib.Index(space=space, dim=dim)
        raw.init_index(max_elements=n, M=M, ef_construction=efc)
        for start, part in chunks(n, dim, seed=2):
            raw.add_items(part, np.arange(start, start + len(part), dtype=np.uint64))
            del part
        keep: Any = raw
    else:
        index = Index("mem", IndexParams(dim=dim, space=Space(space), M=M, ef_construction=efc))
        for start, part in chunks(n, dim, seed=2):
            index.apply(
                [
                    Upsert(
                        f"doc-{start + i:08d}",
                        part[i],
                        {"cat": (start + i) % 100},
                        Clock(0, start, i),
                    )
                    for i in range(len(part))
                ]
            )
            del part
        keep = index
    build_s = time.perf_counter() - t0
    used = _rss() - base
    print(
        json.dumps(
            {
                "side": side,
                "rss_bytes": used,
                "build_s": build_s,
                "n": n,
                "kept": type(keep).__name__,
            }
        )
    )


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": args.mem_n,
        "dim": args.mem_dim,
        "ef_construction": args.mem_ef_construction,
    }
    for side in ("raw", "lhv"):
        cmd = [
            sys.executable,
            __file__,
            "--mem-child",
            side,
            "--mem-n",
            str(args.mem_n),
            "--mem-dim",
            str(args.mem_dim),
            "--M",
            str(args.M),
            "--mem-ef-construction",
            str(args.mem_ef_construction),
            "--space",
            args.space,
        ]
        got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        out[f"{side}_rss_bytes"] = got["rss_bytes"]
        out[f"{side}_build_s"] = got["build_s"]
    out["ratio"] = out["lhv_rss_bytes"] / out["raw_rss_bytes"]
    return out


# -- report ------------------------------------------------------------------------------


def report(sets: list[dict[str, Any]], mem: dict[str, Any] | None) -> None:
    rows = []
    for s in sets:
        name = f"{s['n']}x{s['dim']}"
        rows += [
            (
                name,
                "ingest (s)",
                s["ingest_raw_s"],
                s["ingest_lhv_s"],
                s["ingest_ratio"],
                "<= 1.10",
            ),
            (
                name,
                "search 1/call (QPS)",
                s["search1_raw_qps"],
                s["search1_lhv_qps"],
                s["search1_ratio"],
                "",
            ),
            (
                name,
                "search batched (QPS)",
                s["searchN_raw_qps"],
                s["searchN_lhv_qps"],
                s["searchN_ratio"],
                "",
            ),
            (name, "recall@k", s["recall_raw"], s["recall_lhv"], None, ""),
            (
                name,
                "snapshot enc+dec (s)",
                s["snapshot_raw_s"],
                s["snapshot_lhv_s"],
                s["snapshot_ratio"],
                "<= 1.2",
            ),
            (
                name,
                "snapshot size (MiB)",
                s["snapshot_raw_bytes"] / 2**20,
                s["snapshot_lhv_bytes"] / 2**20,
                s["snapshot_lhv_bytes"] / s["snapshot_raw_bytes"],
                "",
            ),
            (name, "filtered 1% (QPS)", None, s["filtered_1pct_lhv_qps"], None, ""),
        ]
    if mem is not None:
        rows.append(
            (
                f"{mem['n']}x{mem['dim']}",
                "RSS (MiB)",
                mem["raw_rss_bytes"] / 2**20,
                mem["lhv_rss_bytes"] / 2**20,
                mem["ratio"],
                "<= 1.3",
            )
        )
    print(f"{'set':<14}{'measure':<24}{'raw hnswlib':>14}{'lhv_index':>14}{'ratio':>9}  goal")
    for name, what, a, b, ratio, goal in rows:
        fa = "" if a is None else f"{a:,.3f}" if a < 100 else f"{a:,.0f}"
        fb = f"{b:,.3f}" if b < 100 else f"{b:,.0f}"
        fr = "" if ratio is None else f"{ratio:.3f}"
        print(f"{name:<14}{what:<24}{fa:>14}{fb:>14}{fr:>9}  {goal}")
    print("ratios: time and size lhv/raw; QPS raw/lhv (above 1 means lhv is slower)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sets", default="100000x128,40000x384", help="comma-separated NxDIM")
    p.add_argument("--space", default="cosine", choices=["cosine", "l2", "ip"])
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=int, default=64, help="ef_search")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--batch", type=int, default=10_000, help="writes per apply / add_items")
    p.add_argument("--queries", type=int, default=2000, help="queries in the batched call")
    p.add_argument("--single-queries", type=int, default=1000, help="queries made one per call")
    p.add_argument("--repeats", type=int, default=5, help="repeats of search and snapshot")
    p.add_argument("--build-repeats", type=int, default=1, help="repeats of each build")
    p.add_argument("--mem-n", type=int, default=1_000_000, help="0: skip the memory measure")
    p.add_argument("--mem-dim", type=int, default=128)
    p.add_argument(
        "--mem-ef-construction",
        type=int,
        default=20,
        help="graph quality does not change the bytes per item; a low value builds fast",
    )
    p.add_argument("--mem-child", choices=["raw", "lhv"], help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    if args.mem_child:
        mem_child(
            args.mem_child, args.mem_n, args.mem_dim, args.M, args.mem_ef_construction, args.space
        )
        return 0
    sets = []
    for spec in args.sets.split(","):
        if spec:
            n, dim = (int(x) for x in spec.lower().split("x"))
            t0 = time.perf_counter()
            sets.append(bench_set(n, dim, args))
            print(f"# {spec} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    mem = None
    if args.mem_n:
        t0 = time.perf_counter()
        mem = bench_memory(args)
        print(f"# memory done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report(sets, mem)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sets": sets,
        "memory": mem,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
