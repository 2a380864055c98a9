"""New ids after deletes in raw hnswlib: reuse a deleted label, `replace_deleted`, or a
fresh label.

`lhv_index` gives a new id a free label first (`_ids.Labels.allocate`); in hnswlib,
`add_items` on a deleted label goes through `updatePoint` (re-links the node and its
neighbours), and so does `replace_deleted=True` on an index with
`allow_replace_deleted=True`. A fresh label is a plain insert. This builds one index of
`--n` vectors, deletes `--k` of them, and times adding `--k` new vectors each way (same
vectors, same deletes, a fresh copy of the index each time), with recall@10 of queries
near the new vectors.

    python bench/bench_labels.py
    python bench/bench_labels.py --n 100000 --k 10000 --dim 128
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from pathlib import Path

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.data import clustered


def _build(data: np.ndarray, args: argparse.Namespace, *, replace: bool) -> hnswlib.Index:
    index = hnswlib.Index(space="cosine", dim=data.shape[1])
    index.init_index(
        max_elements=len(data) + args.k,
        M=args.M,
        ef_construction=args.ef_construction,
        allow_replace_deleted=replace,
    )
    index.add_items(data, np.arange(len(data)))
    return index


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=1_000, help="rows per add_items call")
    ap.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    args = ap.parse_args()
    data = clustered(args.n, args.dim)
    new = clustered(args.k, args.dim, start=2**30)
    gone = np.random.default_rng(0).choice(args.n, size=args.k, replace=False)
    queries = new[:500] + np.float32(0.01)
    built = {False: _build(data, args, replace=False), True: _build(data, args, replace=True)}
    for b in built.values():
        for label in gone.tolist():
            b.mark_deleted(label)
    ways = {
        "reuse deleted label": (False, gone),
        "replace_deleted=True": (True, np.arange(10**9, 10**9 + args.k)),
        "fresh label": (False, np.arange(args.n, args.n + args.k)),
    }
    runs: dict[str, list[float]] = {how: [] for how in ways}
    recall: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved: a shared machine's load weighs on all
        for how, (replace, labels) in ways.items():
            index = pickle.loads(pickle.dumps(built[replace]))  # a fresh copy each run
            t0 = time.perf_counter()
            for start in range(0, args.k, args.chunk):
                sl = slice(start, start + args.chunk)
                index.add_items(new[sl], labels[sl], replace_deleted=replace)
            runs[how].append(time.perf_counter() - t0)
            index.set_ef(64)
            found, _ = index.knn_query(queries, k=10)
            recall[how] = float(np.mean([labels[i] in row for i, row in enumerate(found)]))
    for how, secs in runs.items():
        med = statistics.median(secs)
        print(
            f"{how:22s} {args.k / med:9.0f} adds/s (median {med:.2f} s of "
            f"{', '.join(f'{x:.2f}' for x in secs)}); a new vector's own label in its "
            f"top 10: {recall[how]:.3f}"
        )


if __name__ == "__main__":
    main()
