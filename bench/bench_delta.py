"""Checkpoints that follow the change: base snapshot vs delta segment, against raw hnswlib.

Builds one index (default 200,000 x 128, cosine, M=16, ef_construction=100), then:

- base: `capture_base` (under the index lock) + `write_snapshot` to a local file, vs
  hnswlib `save_index` of the same engine;
- delta: `capture_delta` + `write_delta` after `--changed` ids were rewritten;
- restore: `read_snapshot` of the base file, and base + `apply_delta`, vs `load_index`;

then runs bench/rss_restore.py on the base file (peak RSS from a file vs from bytes).
Times are one run each on a shared machine: read the ratios, not the seconds.

    python bench/bench_delta.py
    python bench/bench_delta.py --n 50000 --changed 5000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lhv_index import (
    Clock,
    Index,
    IndexParams,
    Space,
    Upsert,
    apply_delta,
    read_snapshot,
    write_delta,
    write_snapshot,
)
from lhv_index._engines import HnswEngine


def _upserts(vecs: np.ndarray, ids: list[str], offset: int) -> list[Upsert]:
    return [
        Upsert(id=i, vector=v, metadata={"n": k}, clock=Clock(0, offset, k))
        for k, (i, v) in enumerate(zip(ids, vecs, strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--changed", type=int, default=10_000)
    parser.add_argument("--ef-construction", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = IndexParams(
        dim=args.dim, space=Space.COSINE, M=16, ef_construction=args.ef_construction
    )
    index = Index("bench", params)
    t = time.perf_counter()
    for start in range(0, args.n, 10_000):
        stop = min(args.n, start + 10_000)
        vecs = rng.normal(size=(stop - start, args.dim)).astype(np.float32)
        index.apply(_upserts(vecs, [f"id-{k}" for k in range(start, stop)], 1))
    print(f"build {args.n} x {args.dim}: {time.perf_counter() - t:.1f} s")
    engine = index._engine
    assert isinstance(engine, HnswEngine)

    with tempfile.TemporaryDirectory(prefix="lhv-bench-delta-") as tmp:
        raw_path, base_path, delta_path = (f"{tmp}/{n}" for n in ("raw", "base", "delta"))
        t = time.perf_counter()
        engine.raw.save_index(raw_path)
        raw_save = time.perf_counter() - t
        raw_bytes = Path(raw_path).stat().st_size
        t = time.perf_counter()
        loaded = hnswlib.Index(space="ip", dim=args.dim)
        loaded.load_index(raw_path)
        raw_load = time.perf_counter() - t
        del loaded

        t = time.perf_counter()
        base = index.capture_base()
        base_capture = time.perf_counter() - t
        with open(base_path, "wb") as f:
            base_bytes = write_snapshot(base, f, source={"offset": 1})
        base_total = time.perf_counter() - t
        del base

        ids = [f"id-{k}" for k in rng.choice(args.n, size=args.changed, replace=False)]
        vecs = rng.normal(size=(args.changed, args.dim)).astype(np.float32)
        index.apply(_upserts(vecs, ids, 2))
        t = time.perf_counter()
        delta = index.capture_delta()
        delta_capture = time.perf_counter() - t
        with open(delta_path, "wb") as f:
            delta_bytes = write_delta(delta, f, source={"offset": 2})
        delta_total = time.perf_counter() - t
        del delta
        raw_change_bytes = args.changed * args.dim * 4

        t = time.perf_counter()
        with open(base_path, "rb") as f:
            restored, _ = read_snapshot(f)
        restore_base = time.perf_counter() - t
        with open(delta_path, "rb") as f:
            apply_delta(restored, f)
        restore_both = time.perf_counter() - t
        assert len(restored) == len(index)
        del restored

        rows = [
            ("raw save_index", raw_save, raw_bytes),
            ("base: capture_base (lock held)", base_capture, None),
            ("base: capture + write_snapshot", base_total, base_bytes),
            (f"delta of {args.changed} ids: capture_delta (lock held)", delta_capture, None),
            ("delta: capture + write_delta", delta_total, delta_bytes),
            ("raw load_index", raw_load, None),
            ("restore base (read_snapshot from file)", restore_base, None),
            ("restore base + delta", restore_both, None),
        ]
        for label, secs, size in rows:
            extra = f"  {size / 2**20:8.1f} MiB" if size is not None else ""
            print(f"{label:<50} {secs:7.3f} s{extra}")
        print(f"ratio base write / raw save_index:        {base_total / raw_save:6.2f}x time")
        print(
            f"ratio delta write / raw save_index:       {delta_total / raw_save:6.3f}x time, "
            f"{delta_bytes / raw_bytes:.3f}x bytes"
        )
        print(
            f"ratio delta bytes / changed vectors' raw bytes: {delta_bytes / raw_change_bytes:.2f}x"
        )
        print(
            f"ratio delta write / base write:           {delta_total / base_total:6.3f}x time, "
            f"{delta_bytes / base_bytes:.3f}x bytes"
        )
        print(f"ratio restore base / raw load_index:      {restore_base / raw_load:6.2f}x")
        print(f"ratio restore base+delta / raw load_index:{restore_both / raw_load:6.2f}x")
        del index, engine
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("rss_restore.py")), base_path],
            check=True,
        )


if __name__ == "__main__":
    main()
