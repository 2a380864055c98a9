"""The annoy engine against the hnsw engine, both through `lhv_index.Index`, same data.

For each engine, in a fresh subprocess (so resident memory is its own): build an index of
`--n` clustered vectors (bench/data.py) with string ids and small metadata, applied in
batches of `--batch`; for annoy the build ends when its forest holds every item (the
background rebuilds chained during ingest, then one last fold of the delta). Then measure
resident memory added by the build, search QPS (one query per call and one batched call)
and recall@k against brute force, at a few search settings (`ef` for hnsw; for annoy the
default `search_k` and per-query `ef`, which means `search_k = n_trees * ef`).

Prints a table, then one JSON object.

    python bench/bench_engines.py                       # 100000 x 128, cosine, ~2 min
    python bench/bench_engines.py --n 20000 --dim 64 --efs 16,64
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.data import clustered, queries
from lhv_index import Clock, EngineKind, Index, IndexParams, Space, Upsert
from lhv_index._engines import AnnoyEngine

__all__ = ["main"]


def _rss() -> dict[str, int]:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _truth(data: np.ndarray, q: np.ndarray, k: int, space: str) -> np.ndarray:
    if space == "cosine":
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if space == "l2":
        d = (q**2).sum(1)[:, None] + (data**2).sum(1)[None, :] - 2 * q @ data.T
    else:
        d = -(q @ data.T)
    return np.argsort(d, axis=1)[:, :k]


def _recall(hits: list[list[Any]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    found = [{int(h.id[4:]) for h in row} for row in hits]
    return float(np.mean([len(f & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def child(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one index and measure it (run in a fresh process)."""
    n, dim, space = args.n, args.dim, args.space
    data = clustered(n, dim, args.clusters, seed=1)
    q = queries(args.queries, dim, args.clusters, seed=1)
    truth = _truth(data, q, args.k, space)
    params = IndexParams(
        dim=dim,
        space=Space(space),
        engine=EngineKind(engine),
        M=args.M,
        ef_construction=args.ef_construction,
        ef_search=args.ef,
        n_trees=args.n_trees,
    )
    writes = [
        [Upsert(f"doc-{i:08d}", data[i], {"cat": i % 100}, Clock(0, s, i - s)) for i in range(s, e)]
        for s, e in ((s, min(s + args.batch, n)) for s in range(0, n, args.batch))
    ]
    base = _rss()
    t0 = time.perf_counter()
    index = Index("bench", params)
    for batch in writes:
        index.apply(batch)
    res: dict[str, Any] = {"engine": engine, "apply_s": time.perf_counter() - t0}
    eng = index._engine
    if isinstance(eng, AnnoyEngine):
        eng.join()
        if eng.delta_size:
            eng.rebuild()
        res["forest_items"] = eng.forest_size
        res["forest_file_bytes"] = os.path.getsize(eng._forest.file.path) if eng._forest else 0
    res["build_s"] = time.perf_counter() - t0
    del writes
    after = _rss()
    res["rss_bytes"] = after["VmRSS"] - base["VmRSS"]
    res["rss_anon_bytes"] = after["RssAnon"] - base["RssAnon"]
    res["rss_file_bytes"] = after["RssFile"] - base["RssFile"]

    settings: list[tuple[str, int | None]] = [("default", None)]
    settings += [(f"ef={ef}", ef) for ef in args.efs]
    nq1 = min(len(q), args.single_queries)
    res["search"] = []
    for label, ef in settings:
        index.search(q[:50], args.k, ef=ef)  # warm up
        single, batched = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for i in range(nq1):
                index.search(q[i], args.k, ef=ef)
            single.append(time.perf_counter() - t)
            t = time.perf_counter()
            hits = index.search(q, args.k, ef=ef)
            batched.append(time.perf_counter() - t)
        res["search"].append(
            {
                "setting": label,
                "qps_single": nq1 / statistics.median(single),
                "qps_batched": len(q) / statistics.median(batched),
                "recall": _recall(hits, truth),
            }
        )
    return res


def run_child(engine: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *argv, "--child", engine]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{args.n}x{args.dim} {args.space}, k={args.k}")
    print(f"{'engine':<8}{'build (s)':>11}{'RSS (MiB)':>11}{'anon':>8}{'file':>8}")
    for r in results:
        print(
            f"{r['engine']:<8}{r['build_s']:>11.2f}{r['rss_bytes'] / 2**20:>11.0f}"
            f"{r['rss_anon_bytes'] / 2**20:>8.0f}{r['rss_file_bytes'] / 2**20:>8.0f}"
        )
    print(f"{'engine':<8}{'setting':<12}{'QPS 1/call':>12}{'QPS batched':>13}{'recall':>8}")
    for r in results:
        for s in r["search"]:
            print(
                f"{r['engine']:<8}{s['setting']:<12}{s['qps_single']:>12,.0f}"
                f"{s['qps_batched']:>13,.0f}{s['recall']:>8.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--space", default="cosine", choices=["cosine", "l2", "ip"])
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--batch", type=int, default=10_000, help="writes per apply")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=int, default=64, help="ef_search (hnsw's default ef)")
    p.add_argument("--n-trees", type=int, default=16)
    p.add_argument("--efs", default="32,128,512", help="per-query ef values also measured")
    p.add_argument("--queries", type=int, default=1000, help="queries in the batched call")
    p.add_argument("--single-queries", type=int, default=500, help="queries one per call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default="hnsw,annoy")
    p.add_argument("--child", choices=["hnsw", "annoy"], help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    args.efs = [int(x) for x in str(args.efs).split(",") if x]
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    passed, skip = [], False
    for a in raw:  # the children get every argument but --json
        if skip or a.startswith("--json"):
            skip = a == "--json"
            continue
        passed.append(a)
    results = []
    for engine in args.engines.split(","):
        t0 = time.perf_counter()
        results.append(run_child(engine, passed))
        print(f"# {engine} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report(results, args)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
