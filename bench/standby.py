"""kill -9 of the owner to the first answer from the survivor, with and without a warm
standby (`LHV_STANDBY_REPLICAS=1` vs 0).

Per mode: a one-partition index of `--n` vectors (dim `--dim`) is loaded through Kafka
into worker A and checkpointed to S3; worker B joins (with standbys, B keeps a warm copy
of the partition); a few more writes land after the checkpoint; the owner is killed
with SIGKILL and a search asking for the last write (`min_offset`) is sent at once and
again until the survivor answers. Prints the seconds from the kill to that answer, the
survivor's restore time from its log, and where its state came from (`standby`: no
snapshot download; `snapshot`). Both modes wait out the same session timeout
(`--session-timeout-ms`) before the group moves the partition: the difference is the
restore. Needs a stack (`source .stack/env`), else starts a private one.

    python bench/standby.py --quick          # 5k x 32, a smoke run
    python bench/standby.py                  # 100k x 128
    python bench/standby.py --n 1000000      # the 1M x 128 of DESIGN section 10
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stackenv import WorkerEnv, stack_env, worker_env, write_results

from worker.client import LhvClient
from worker.storage.blobstore import S3BlobStore
from worker.storage.snapshots import SnapshotStore

INDEX = "bench"


class _Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker"],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def owns(self) -> bool:
        found = re.findall(r"partitions assigned: \[([\d, ]*)\]", self.text())
        return bool(found) and "0" in found[-1].split(", ")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()


async def _wait(check: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def _checkpointed(wenv: WorkerEnv, offset: int, timeout_s: float) -> None:
    blobs = S3BlobStore(wenv.s3)
    await blobs.start()
    try:
        store = SnapshotStore(blobs, topic=wenv.topics.commands, worker_id="bench")
        deadline = time.monotonic() + timeout_s
        while True:
            manifest, _ = await store.read_manifest(0)
            if manifest is not None and manifest.offset >= offset:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("no checkpoint covers the load")
            await asyncio.sleep(0.5)
    finally:
        await blobs.stop()


async def run_mode(env: dict[str, str], args: argparse.Namespace, replicas: int) -> dict[str, Any]:
    wenv = await worker_env(
        env,
        "standby",
        {
            "LHV_STANDBY_REPLICAS": str(replicas),
            "LHV_SESSION_TIMEOUT_MS": str(args.session_timeout_ms),
            "LHV_CHECKPOINT_SECONDS": "3",
            "LHV_CHECKPOINT_RECORDS": "1000000000",
        },
    )
    logs = Path(tempfile.mkdtemp(prefix="lhv-bench-standby-"))
    rng = np.random.default_rng(7)
    first = _Worker(wenv.child, logs / "a.log")
    second: _Worker | None = None
    try:
        async with LhvClient(
            wenv.child["LHV_BOOTSTRAP_SERVERS"], topics=wenv.topics, timeout_s=600
        ) as c:
            await c.create(INDEX, dim=args.dim, space="l2", M=16, ef_construction=100)
            loaded = await c.add(
                INDEX,
                [str(i) for i in range(args.n)],
                rng.random((args.n, args.dim), dtype=np.float32),
                ack=True,
            )
            await _checkpointed(wenv, loaded.offset, 600)
            second = _Worker(wenv.child, logs / "b.log")
            if replicas:
                await _wait(lambda: "standby copy" in second.text(), "standby started", 120)
                await _wait(
                    lambda: (
                        "standby copy loaded" in second.text()
                        or "standby copy loaded" in first.text()
                    ),
                    "standby loaded",
                    600,
                )
            else:
                await _wait(lambda: "partitions assigned" in second.text(), "joined", 120)
            await _wait(lambda: first.owns() or second.owns(), "owner", 120)
            owner, survivor = (first, second) if first.owns() else (second, first)
            tail = await c.add(
                INDEX,
                [f"t{i}" for i in range(100)],
                rng.random((100, args.dim), dtype=np.float32),
                ack=True,
            )
            await asyncio.sleep(1.0)  # the standby tails the last writes
            query = rng.random(args.dim, dtype=np.float32)
            killed = time.monotonic()
            owner.stop(signal.SIGKILL)
            while True:
                try:
                    await c.search(INDEX, query, k=1, min_offset=tail.offset, timeout_s=5)
                    break
                except Exception:
                    if time.monotonic() - killed > 600:
                        raise
            answered = time.monotonic() - killed
        text = survivor.text()
        promoted = re.search(r"promoted from standby at offset (\d+)", text) is not None
        restored = re.findall(r"partition restored in ([\d.]+)s", text)
        return {
            "mode": "standby" if replicas else "no standby",
            "kill_to_first_answer_s": round(answered, 3),
            "survivor_restore_s": float(restored[-1]) if restored else None,
            "source": "standby" if promoted else "snapshot",
            "logs": str(logs),
        }
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors (1000000 for 1M)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--session-timeout-ms", type=int, default=6000)
    parser.add_argument("--quick", action="store_true", help="5k x 32: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim = 5_000, 32
    with stack_env() as env:
        results = [await run_mode(env, args, replicas) for replicas in (0, 1)]
    cold, warm = results
    write_results(
        {
            "bench": "standby",
            "n": args.n,
            "dim": args.dim,
            "session_timeout_ms": args.session_timeout_ms,
            "results": results,
            "restore_ratio": (
                round(warm["survivor_restore_s"] / cold["survivor_restore_s"], 3)
                if warm["survivor_restore_s"] and cold["survivor_restore_s"]
                else None
            ),
        },
        args.out,
    )


if __name__ == "__main__":
    asyncio.run(main())
