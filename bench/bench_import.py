"""Bulk `import` from S3 against `add` through Kafka and raw hnswlib, in the same run.

Measures, on one clustered data set (bench/data.py), into fresh indexes with the same
parameters (cosine, M=16, ef_construction=200):

- raw: `hnswlib.Index.add_items` in batches of `--chunk` rows (`max_elements` up front);
- import: one `import` command naming an `.npy` of vectors and an `.npy` of string ids in
  S3, from sending the command to its ack (download, decode, validation and apply by the
  worker; the upload of the files is timed apart, it is the producer's side);
- kafka: `LhvClient.add` of the same ids and vectors in records of 1 000 items, from the
  first record produced to the last ack (encoding, Kafka, decoding and apply).

The worker is an `lhv worker` subprocess (checkpoints off during the run, so neither side
pays for one). Kafka and S3 come from `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_*` when set (e.g.
`lhv stack up`), else a private local stack is started and stopped.

    python bench/bench_import.py                     # 200 000 x 128, a few minutes
    python bench/bench_import.py --n 50000 --json bench/results/import.json

Prints absolutes and ratios, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data import clustered  # noqa: E402
from bench.stackenv import stack_env, worker_env, write_results  # noqa: E402
from worker.client import LhvClient  # noqa: E402
from worker.storage.blobstore import S3BlobStore  # noqa: E402

__all__ = ["main"]

PARAMS: dict[str, Any] = {"space": "cosine", "M": 16, "ef_construction": 200}


def _raw(data: np.ndarray, chunk: int) -> float:
    index = hnswlib.Index(space="cosine", dim=data.shape[1])
    index.init_index(max_elements=len(data), M=PARAMS["M"], ef_construction=200)
    t0 = time.perf_counter()
    for start in range(0, len(data), chunk):
        part = data[start : start + chunk]
        index.add_items(part, np.arange(start, start + len(part)))
    return time.perf_counter() - t0


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


async def _measure(env: dict[str, str], data: np.ndarray, chunk: int, log: Path) -> dict[str, Any]:
    topics, s3, child = await worker_env(env, "import")
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    n, dim = data.shape
    ids = [f"doc-{i:08d}" for i in range(n)]
    out: dict[str, Any] = {"n": n, "dim": dim, "chunk": chunk, **PARAMS}
    worker = _start_worker(child, log)
    try:
        async with LhvClient(bootstrap, topics=topics, timeout_s=1800) as client:
            await client.create("warmup", dim=dim, timeout_s=120, **PARAMS)

            root = S3BlobStore(replace(s3, prefix=""))
            await root.start()
            try:
                t0 = time.perf_counter()
                await root.put(f"{s3.key_prefix}imports/vectors.npy", _npy(data))
                await root.put(f"{s3.key_prefix}imports/ids.npy", _npy(np.array(ids)))
                out["upload_s"] = time.perf_counter() - t0
            finally:
                await root.stop()
            await client.create("imported", dim=dim, **PARAMS)
            t0 = time.perf_counter()
            done = await client.command(
                "imported",
                {
                    "op": "import",
                    "source": f"s3://{s3.bucket}/{s3.key_prefix}imports/vectors.npy",
                    "ids_source": f"s3://{s3.bucket}/{s3.key_prefix}imports/ids.npy",
                    "chunk_items": chunk,
                },
                ack=True,
            )
            out["import_s"] = time.perf_counter() - t0
            assert done.ack is not None and done.ack["applied"] == n, done.ack

            await client.create("added", dim=dim, **PARAMS)
            t0 = time.perf_counter()
            await client.add("added", ids, data, batch_size=1000, ack=True)
            out["kafka_s"] = time.perf_counter() - t0
            for name in ("imported", "added"):
                count = (await client.stats(name))["count"]
                assert count == n, f"{name} holds {count} items, not {n}"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(120)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
    return out


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker"],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def _import_breakdown(log: Path) -> dict[str, float]:
    """The worker's own split of the import time, from its log line."""
    m = re.search(r"([\d.]+)s to load and validate, ([\d.]+)s to apply", log.read_text())
    if not m:
        return {}
    return {"import_load_validate_s": float(m.group(1)), "import_apply_s": float(m.group(2))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=10_000, help="rows per engine call")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    data = clustered(args.n, args.dim)
    with stack_env() as env, tempfile.TemporaryDirectory(prefix="lhv-bench-") as tmp:
        raw_s = _raw(data, args.chunk)
        log = Path(tmp) / "worker.log"
        res = asyncio.run(_measure(env, data, args.chunk, log))
        res.update(_import_breakdown(log))
    res["raw_s"] = raw_s
    res["import_vs_raw"] = res["import_s"] / raw_s
    res["kafka_vs_raw"] = res["kafka_s"] / raw_s
    res["kafka_vs_import"] = res["kafka_s"] / res["import_s"]

    print(f"{args.n} x {args.dim}, cosine, M=16, ef_construction=200, {args.chunk} rows/call")
    print(f"{'path':<40} {'seconds':>9} {'vectors/s':>10} {'vs raw':>7}")
    for label, key in (
        ("raw hnswlib add_items", "raw_s"),
        ("import from S3 (.npy + ids .npy)", "import_s"),
        ("add through Kafka (client to last ack)", "kafka_s"),
    ):
        secs = res[key]
        print(f"{label:<40} {secs:>9.2f} {args.n / secs:>10.0f} {secs / raw_s:>7.3f}")
    print(f"upload of the two .npy files to S3: {res['upload_s']:.2f} s (not in import)")
    if "import_apply_s" in res:
        print(
            f"import inside the worker: {res['import_load_validate_s']:.2f} s download, decode "
            f"and validation, {res['import_apply_s']:.2f} s apply"
        )
    print(f"add through Kafka / import: {res['kafka_vs_import']:.3f}")
    write_results(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
