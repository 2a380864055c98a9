"""What one byte of checkpoint costs the S3 server: CPU seconds per GiB it receives.

Puts `--objects` objects of `--mib` MiB of float32 (what a snapshot mostly holds) through
LHV's own blob store (`S3BlobStore`, multipart as the worker uploads), against the S3 of
the `LHV_S3_*` variables, and reads the CPU time the server process and this process
spent on them from /proc. Used to split the ingest's overhead in `make bench-large`
between the worker and the S3 server it shares the machine with (BENCHMARKS.md).

    set -a; source .stack/env; set +a
    python bench/bench_s3_put.py --server-pid "$(pgrep -f 'weed mini -dir=/tmp/lhv-stack')"
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.storage.blobstore import S3BlobStore, S3Config


def _cpu_s(pid: int) -> float:
    """utime + stime of process `pid`, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(store: S3BlobStore, pid: int, data: bytes, objects: int) -> tuple[float, ...]:
    server0, client0, wall0 = _cpu_s(pid), time.process_time(), time.monotonic()
    for i in range(objects):
        await store.put(f"bench-s3-put/{i}", io.BytesIO(data))
    out = (_cpu_s(pid) - server0, time.process_time() - client0, time.monotonic() - wall0)
    for i in range(objects):
        await store.delete(f"bench-s3-put/{i}")
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-pid", type=int, required=True, help="the S3 server's pid")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = np.random.default_rng(0).standard_normal(args.mib << 18, dtype=np.float32).tobytes()
    gib = args.objects * args.mib / 1024
    rows = []
    async with S3BlobStore(S3Config.from_env()) as store:
        for _ in range(args.rounds):
            rows.append(await _round(store, args.server_pid, data, args.objects))
    for server, client, wall in rows:
        print(
            f"{gib:.2f} GiB: server {server:.2f} CPU s ({server / gib:.1f} per GiB), "
            f"client {client:.2f} CPU s ({client / gib:.1f} per GiB), wall {wall:.2f} s"
        )
    per_gib = statistics.median(r[0] / gib for r in rows)
    print(f"median: the server spends {per_gib:.1f} CPU s per GiB it receives")


if __name__ == "__main__":
    asyncio.run(main())
