"""One large index on one worker, end to end, against raw hnswlib in the same run.

- raw hnswlib (in a subprocess, so its memory is its own): `add_items` of N x D in
  `--chunk`-row batches, wall and CPU seconds, the index's memory (RSS after the build
  minus before it, the vectors already in memory), `save_index` / `load_index` through a
  local file (medians over `--repeats`);
- LHV (an `lhv worker` subprocess on its own 1-partition topics, default checkpoint
  policy, static membership): `LhvClient.add` of the same N x D (records of
  `--record-items`, as `lhv load` sends them) until a read-your-writes search of the last
  record is answered; each checkpoint taken meanwhile (why it started, bases and deltas,
  bytes, seconds, and the records the worker applied while it ran: whether ingest kept
  moving); then `--writes` new ids and the checkpoint(s) covering them (bytes written vs
  the writes' raw vector bytes); then `--repeats` times: `--tail` more writes, kill -9,
  restart at once, seconds to the first answer, with the restore and the replay split
  from the worker's log; peak RSS during ingest and after a restore vs the raw index;
- churn (a worker of its own, checkpoints every second, tombstone retention 1 s): an
  index of `--churn-n` ids through rounds of deletes and re-adds (half of the deleted ids
  come back, half are new), checkpointed past the tombstone horizon, against an index
  loaded once with the same live set: stored bytes (base + deltas) and a fresh base.

Kafka and S3 come from `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_*` when set, else a private
local stack is started and stopped. Prints a table of absolutes and ratios, CPU seconds
beside wall time, then one JSON object (also written to `--json`).

    python bench/bench_large.py            # 1,000,000 x 128: under 15 min on 2 cores
    python bench/bench_large.py --quick    # 50,000 x 32, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_e2e import _cpu_s, _CpuMeter, _proc_status, _Worker  # noqa: E402
from bench.data import chunks, clustered, queries  # noqa: E402
from bench.stackenv import stack_env, worker_env, write_results  # noqa: E402
from lhv_index import write_snapshot  # noqa: E402
from lhv_index.errors import DeadlineExceeded  # noqa: E402
from worker.client import LhvClient  # noqa: E402
from worker.dev.demo import until_answered  # noqa: E402
from worker.storage.blobstore import S3BlobStore  # noqa: E402
from worker.storage.snapshots import SnapshotStore  # noqa: E402

__all__ = ["main"]

SPACE = "cosine"
MIB = 2**20
#: items per `LhvClient.add` call of the ingest (each call produces its records before
#: returning, so this bounds the client's own memory)
_SLICE = 100_000
#: the benchmark's own checkpoint settings, dropped from the worker's environment so the
#: defaults rule
_POLICY_VARS = (
    "LHV_CHECKPOINT_SECONDS",
    "LHV_CHECKPOINT_RECORDS",
    "LHV_CHECKPOINT_MAX_REPLAY_S",
    "LHV_CHECKPOINT_MAX_TIME_SHARE",
)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _busy() -> tuple[int, int]:
    """The machine's (busy, total) clock ticks so far, all CPUs (`/proc/stat`)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def _cores_busy(start: tuple[int, int]) -> float:
    """Cores busy on average since `start` (`_busy()`), over the whole machine."""
    busy, total = _busy()
    return (os.cpu_count() or 1) * (busy - start[0]) / max(1, total - start[1])


def _threads_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the threads of `pid` alive now. Between two engine calls
    these are the worker's own threads (event loop, decode, apply, checkpoints): hnswlib
    starts its insert threads for each `add_items` and joins them before it returns."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread ended since the listing
            total += _cpu_s(f"{pid}/task/{tid}")
    return total


def _data(n: int, dim: int, *, start: int = 0) -> np.ndarray:
    if start:
        return clustered(n, dim, start=start)
    return np.concatenate([part for _, part in chunks(n, dim, size=10_000)])


# -- raw hnswlib, in a subprocess ----------------------------------------------------------


def raw_child(n: int, dim: int, M: int, efc: int, chunk: int, repeats: int) -> None:
    """Build, measure and save/load the raw index; print the results as JSON."""
    data = _data(n, dim)
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss0 = _proc_status("self", "VmRSS")
    index = hnswlib.Index(space=SPACE, dim=dim)
    index.init_index(max_elements=n, M=M, ef_construction=efc)
    cpu0, busy0, t0 = _cpu_s("self"), _busy(), time.perf_counter()
    for start in range(0, n, chunk):
        part = data[start : start + chunk]
        index.add_items(part, np.arange(start, start + len(part)))
    out: dict[str, Any] = {
        "build_s": time.perf_counter() - t0,
        "build_cpu_s": _cpu_s("self") - cpu0,
        "build_cores_busy": _cores_busy(busy0),
        "index_bytes": _proc_status("self", "VmRSS") - rss0,
        "peak_rss": _proc_status("self", "VmHWM"),
    }
    saves, loads = [], []
    with tempfile.TemporaryDirectory(prefix="lhv-bench-large-raw-") as tmp:
        path = os.path.join(tmp, "raw.bin")
        for _ in range(repeats):
            t0 = time.perf_counter()
            index.save_index(path)
            saves.append(time.perf_counter() - t0)
            loaded = hnswlib.Index(space=SPACE, dim=dim)
            t0 = time.perf_counter()
            loaded.load_index(path, max_elements=n)
            loads.append(time.perf_counter() - t0)
            del loaded
        out["file_bytes"] = os.path.getsize(path)
    out["save_s"], out["load_s"] = _median(saves), _median(loads)
    print(json.dumps(out))


def _raw(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--raw-child", f"{args.n}x{args.dim}"]
    cmd += ["--M", str(args.M), "--ef-construction", str(args.ef_construction)]
    cmd += ["--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- the worker's log ------------------------------------------------------------------------


def _log(path: Path) -> list[dict[str, Any]]:
    """The worker's JSON log lines (`LHV_LOG_JSON=1`), with `t` in epoch seconds."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        rec["t"] = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
        out.append(rec)
    return out


def _checkpoints(path: Path) -> list[dict[str, Any]]:
    """Each checkpoint the worker wrote: offset, reason, start and end, bases, deltas,
    bytes, seconds."""
    started: dict[int, dict[str, Any]] = {}
    done = []
    for rec in _log(path):
        msg, offset = rec["msg"], rec.get("offset")
        if offset is None:
            continue
        if msg.startswith("checkpoint started ("):
            started[offset] = rec
        elif msg.startswith("checkpoint (") and "snapshots written" in msg:
            words = msg.split("written (", 1)[1].split(")", 1)[0].split(", ")
            bases, deltas, nbytes = (int(w.split()[0]) for w in words)
            begin = started.get(offset, rec)
            done.append(
                {
                    "offset": offset,
                    "reason": begin["msg"][len("checkpoint started (") : -1],
                    "start": begin["t"],
                    "end": rec["t"],
                    "seconds": float(msg.rsplit(", ", 1)[1].rstrip("s")),
                    "bases": bases,
                    "deltas": deltas,
                    "bytes": nbytes,
                }
            )
    return done


def _restore(path: Path, killed: float) -> dict[str, Any]:
    """From a restarted worker's log: seconds from the kill (epoch `killed`) to the
    assignment (process start and rejoin), restore seconds, replay seconds and records."""
    out: dict[str, Any] = {}
    restored = None
    for rec in _log(path):
        msg = rec["msg"]
        if msg.startswith("partitions assigned: [") and "join_s" not in out:
            out["join_s"] = rec["t"] - killed
        elif msg.startswith("partition restored in "):
            restored = rec["t"]
            out["restore_s"] = float(msg.split()[3].rstrip("s:"))
            tail = msg.rsplit("checkpoint offset ", 1)[1]
            ckpt, _, target = tail.partition(", replaying to ")
            out["replay_records"] = int(target) - int(ckpt)
        elif msg.startswith("partition serving at offset") and restored is not None:
            out["replay_s"] = rec["t"] - restored
            break
    return out


async def _wait_checkpoint(path: Path, offset: int, limit_s: float) -> list[dict[str, Any]]:
    """Wait until a checkpoint covering `offset` is written; returns all so far."""
    deadline = time.monotonic() + limit_s
    while True:
        done = _checkpoints(path)
        if any(c["offset"] >= offset for c in done):
            return done
        if time.monotonic() > deadline:
            raise RuntimeError(f"no checkpoint covered offset {offset} in {limit_s:.0f} s")
        await asyncio.sleep(0.5)


class _Sampler:
    """The worker's applied offset and RSS every `every_s` (epoch seconds)."""

    def __init__(self, worker: _Worker, every_s: float = 1.0) -> None:
        self.worker, self.every_s = worker, every_s
        self.samples: list[tuple[float, float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                m = await asyncio.to_thread(self.worker.metrics)
                rss = self.worker.rss()
                self.samples.append((time.time(), m.get("lhv_applied_offset", -1.0), rss))
            await asyncio.sleep(self.every_s)

    def __enter__(self) -> _Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def applied_at(self, t: float) -> float:
        """The applied offset at `t` (the last sample at or before it)."""
        before = [s[1] for s in self.samples if s[0] <= t]
        return before[-1] if before else -1.0


# -- LHV: ingest, writes, kill -9 ------------------------------------------------------------


async def _applied(client: LhvClient, name: str, probe: Any, after: Any, timeout_s: float) -> None:
    """Until the worker has applied `after` (a write position): a search that waits for
    it, asked again while the worker's own bound on one wait (`deadline_exceeded`) ends
    first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.search(name, probe, k=1, after=after, timeout_s=120)
            return
        except DeadlineExceeded:
            if time.monotonic() > deadline:
                raise


async def _lhv(env: dict[str, str], args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    n, dim = args.n, args.dim
    topics, s3, child = await worker_env(env, "large")
    for var in _POLICY_VARS:
        child.pop(var, None)
    child.update(args.worker_env)
    child.update(
        {
            "LHV_LOG_JSON": "1",
            "LHV_GROUP_INSTANCE_ID": f"bench-large-{s3.prefix.strip('/')}",
            "LHV_SESSION_TIMEOUT_MS": str(args.session_timeout_ms),
        }
    )
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    params = {"M": args.M, "ef_construction": args.ef_construction}
    name = "large"
    out: dict[str, Any] = {}
    data = _data(n, dim)
    probe = queries(1, dim)[0]
    log = logdir / "large-1.log"
    worker = _Worker(child, log)
    cpu = _CpuMeter(
        {
            "worker": worker.proc.pid,
            "client": "self",
            "kafka": int(env.get("LHV_STACK_KAFKA_PID") or 0),
            "s3": int(env.get("LHV_STACK_S3_PID") or 0),
        }
    )
    try:
        async with LhvClient(bootstrap, topics=topics, timeout_s=600) as client:
            await client.create(name, dim=dim, space=SPACE, timeout_s=120, **params)
            out["worker_idle_rss"] = worker.rss()
            with _Sampler(worker) as sampler:
                # -- ingest under the default checkpoint policy --
                cpu.start()
                busy0, own0 = _busy(), _threads_cpu_s(worker.proc.pid)
                t0 = time.perf_counter()
                for start in range(0, n, _SLICE):  # bounds what the client holds at once
                    ids = [f"doc-{i:08d}" for i in range(start, min(n, start + _SLICE))]
                    part = data[start : start + _SLICE]
                    last = await client.add(name, ids, part, batch_size=args.record_items)
                await _applied(client, name, probe, last, 3600)
                out["ingest_s"] = time.perf_counter() - t0
                out["ingest_cpu_s"] = cpu.stop()
                out["ingest_worker_threads_cpu_s"] = _threads_cpu_s(worker.proc.pid) - own0
                out["ingest_cores_busy"] = _cores_busy(busy0)
                out["ingest_records"] = last.offset + 1
                print(f"  ingest: {out['ingest_s']:.1f} s", flush=True)
                done = await _wait_checkpoint(log, last.offset, 120 + args.tail_wait_s)
                out["peak_rss_ingest"] = worker.peak_rss()
                during = [c for c in done if c["offset"] <= last.offset]
                for c in during:
                    c["applied_during"] = sampler.applied_at(c["end"]) - sampler.applied_at(
                        c["start"]
                    )
                out["checkpoints_ingest"] = during
                full = max(c["offset"] for c in done)

                # -- new writes to the full index, and the checkpoint(s) covering them --
                new = _data(args.writes, dim, start=2**30)
                new_ids = [f"new-{i:08d}" for i in range(args.writes)]
                wrote = await client.add(name, new_ids, new, batch_size=args.record_items)
                await _applied(client, name, probe, wrote, 600)
                done = await _wait_checkpoint(log, wrote.offset, 120 + args.tail_wait_s)
                covering = [c for c in done if full < c["offset"]]
                out["writes_checkpoints"] = covering
                out["writes_raw_bytes"] = args.writes * dim * 4
                out["writes_checkpoint_bytes"] = sum(c["bytes"] for c in covering)
                out["peak_rss_before_kill"] = worker.peak_rss()

            # -- kill -9 and restart at once (static membership), --repeats times --
            kills = []
            for r in range(args.repeats):
                tail = _data(args.tail, dim, start=2**31 + r)
                tail_ids = [f"tail-{r}-{i:08d}" for i in range(args.tail)]
                wrote = await client.add(name, tail_ids, tail, batch_size=args.record_items)
                await _applied(client, name, probe, wrote, 600)
                killed, killed_epoch = time.monotonic(), time.time()
                worker.kill9()
                log = logdir / f"large-{r + 2}.log"
                worker = _Worker(child, log)
                answered = await until_answered(client, name, probe, 600, every_s=0.1)
                kill = {"kill_to_answer_s": answered - killed, **_restore(log, killed_epoch)}
                kills.append(kill)
                print(f"  kill -9 {r + 1}: {kill}", flush=True)
            out["kills"] = kills
            stats = await client.stats(name)
            assert stats["count"] == n + args.writes + args.repeats * args.tail, stats
            out["restored_peak_rss"] = worker.peak_rss()
            out["restored_rss"] = worker.rss()
    finally:
        worker.stop()
    return out


# -- churn -------------------------------------------------------------------------------------


async def _churn(env: dict[str, str], args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """An index through delete + re-add rounds vs one loaded once with the same live set,
    both checkpointed past the tombstone horizon."""
    n, dim, rounds = args.churn_n, args.dim, args.churn_rounds
    step = max(1, n // 10)
    topics, s3, child = await worker_env(
        env,
        "largechurn",
        {"LHV_CHECKPOINT_SECONDS": "1", "LHV_TOMBSTONE_RETENTION_MS": "1000", "LHV_LOG_JSON": "1"},
    )
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    params = {"M": args.M, "ef_construction": args.ef_construction}
    log = logdir / "churn.log"
    worker = _Worker(child, log)
    rng = np.random.default_rng(3)
    live: dict[str, int] = {}  # id -> row of `pool`
    pool = _data(n + rounds * step, dim, start=2**32)
    deleted: list[str] = []
    fresh = iter(range(n, len(pool)))
    try:
        async with LhvClient(bootstrap, topics=topics, timeout_s=600) as client:
            for name in ("churn", "plain"):
                await client.create(name, dim=dim, space=SPACE, timeout_s=120, **params)
            ids = [f"c-{i:08d}" for i in range(n)]
            await client.add("churn", ids, pool[:n], batch_size=args.record_items)
            live.update((i, k) for k, i in enumerate(ids))
            for _ in range(rounds):
                gone = [str(i) for i in rng.choice(sorted(live), size=step, replace=False)]
                await client.delete("churn", gone)
                for i in gone:
                    del live[i]
                back = deleted[: step // 2]
                deleted = deleted[step // 2 :] + gone
                add_ids = back + [f"c-{next(fresh):08d}" for _ in range(step - len(back))]
                picked = rng.integers(0, len(pool), size=len(add_ids))
                wrote = await client.add(
                    "churn", add_ids, pool[picked], batch_size=args.record_items
                )
                live.update(zip(add_ids, picked.tolist(), strict=True))
            await _applied(client, "churn", pool[0], wrote, 600)
            keys = sorted(live)
            plain = await client.add(
                "plain", keys, pool[[live[k] for k in keys]], batch_size=args.record_items
            )
            await _applied(client, "plain", pool[0], plain, 600)
            # past the horizon: a checkpoint over a second old, then two more that drop
            # the tombstones below it
            for touch in range(2):
                await asyncio.sleep(1.5)
                k = keys[touch]
                wrote = await client.add("churn", [k], pool[[live[k]]])
                await _wait_checkpoint(log, wrote.offset, 60)
            out: dict[str, Any] = {"n": n, "rounds": rounds, "per_round": step}
            for name in ("churn", "plain"):
                out[f"{name}_stats"] = {
                    k: v
                    for k, v in (await client.stats(name)).items()
                    if k in ("count", "deleted", "slots", "free_slots")
                }
    finally:
        code = worker.stop()
    assert code == 0, f"churn worker exited {code}; see {log}"
    blobs = S3BlobStore(s3)
    await blobs.start()
    try:
        store = SnapshotStore(blobs, topic=topics.commands, worker_id="bench")
        manifest, _ = await store.read_manifest(0)
        assert manifest is not None
        for name in ("churn", "plain"):
            entry = manifest.indexes[name]
            out[f"{name}_stored_bytes"] = entry.bytes + entry.delta_bytes
            out[f"{name}_deltas"] = len(entry.deltas)
            index = await store.load_index(name, entry)
            with tempfile.TemporaryFile() as f:
                out[f"{name}_base_bytes"] = await asyncio.to_thread(
                    write_snapshot, index, f, source={}
                )
    finally:
        await blobs.stop()
    return out


# -- report --------------------------------------------------------------------------------


def _report(res: dict[str, Any]) -> None:
    raw, lhv, churn = res["raw"], res["lhv"], res.get("churn")
    rows: list[tuple[str, str, str, str]] = []

    def row(measure: str, r: float | None, x: float | None, p: int = 2) -> None:
        fr = "" if r is None else f"{r:,.{p}f}"
        fx = "" if x is None else f"{x:,.{p}f}"
        ratio = f"{x / r:.3f}" if r and x is not None else ""
        rows.append((measure, fr, fx, ratio))

    cpu = lhv["ingest_cpu_s"]
    row("ingest / build (s)", raw["build_s"], lhv["ingest_s"], 1)
    row("  CPU s (lhv: worker + client + Kafka + S3)", raw["build_cpu_s"], sum(cpu.values()), 1)
    row("  lhv worker CPU s", None, cpu.get("worker"), 1)
    own = lhv.get("ingest_worker_threads_cpu_s")
    if own is not None and "worker" in cpu:
        row("    hnswlib's insert threads (raw: the whole build)", raw["build_cpu_s"],
            cpu["worker"] - own, 1)  # fmt: skip
        row("    the worker's own threads: event loop, decode, apply, checkpoints", None,
            own, 1)  # fmt: skip
    for name in ("s3", "kafka", "client"):
        row(f"  {name} CPU s", None, cpu.get(name), 1)
    row("  cores busy on average, whole machine", raw.get("build_cores_busy"),
        lhv.get("ingest_cores_busy"), 2)  # fmt: skip
    ck = lhv["checkpoints_ingest"]
    row("checkpoints during ingest (count)", None, len(ck), 0)
    if ck:
        row("  bytes written, total (MiB)", None, sum(c["bytes"] for c in ck) / MIB, 1)
        row("  seconds, median", None, _median([c["seconds"] for c in ck]), 2)
        row("  seconds, total", None, sum(c["seconds"] for c in ck), 2)
        moving = sum(1 for c in ck if c["applied_during"] > 0)
        rows.append(("  of which ingest kept applying", "", f"{moving} of {len(ck)}", ""))
    base = [c for c in ck if c["bases"]]
    row(
        "save_index vs the last checkpoint with a base, during ingest (s)",
        raw["save_s"],
        base[-1]["seconds"] if base else None,
        2,
    )
    row(
        "  file bytes vs that checkpoint's bytes (MiB)",
        raw["file_bytes"] / MIB,
        base[-1]["bytes"] / MIB if base else None,
        1,
    )
    row(
        f"{res['writes']} new writes: checkpoint bytes vs raw vector bytes (MiB)",
        lhv["writes_raw_bytes"] / MIB,
        lhv["writes_checkpoint_bytes"] / MIB,
        2,
    )
    kills = lhv["kills"]

    def med(key: str) -> float | None:
        got = [k[key] for k in kills if key in k]
        return _median(got) if got else None

    row("kill -9 to first answer (s), median", None, med("kill_to_answer_s"), 2)
    row("  to assigned: process start, rejoin (s)", None, med("join_s"), 2)
    row("  restore (s; raw: load_index from a local file)", raw["load_s"], med("restore_s"), 2)
    row("  replay (s)", None, med("replay_s"), 2)
    row("  records replayed", None, med("replay_records"), 0)
    row("index memory: raw RSS growth vs worker peak RSS, ingest (MiB)",
        raw["index_bytes"] / MIB, lhv["peak_rss_ingest"] / MIB, 0)  # fmt: skip
    row("  worker peak RSS after restore (MiB)", raw["index_bytes"] / MIB,
        lhv["restored_peak_rss"] / MIB, 0)  # fmt: skip
    row("  worker RSS after restore (MiB)", raw["index_bytes"] / MIB,
        lhv["restored_rss"] / MIB, 0)  # fmt: skip
    # the restored index holds the new writes and the tails too: against raw hnswlib's
    # memory per item times that count (hnswlib's memory is linear in its items)
    items = res["n"] + res["writes"] + res["repeats"] * res["tail"]
    same = raw["index_bytes"] * items / res["n"] / MIB
    row(f"  raw index of the restored {items:,} items vs worker peak RSS after restore (MiB)",
        same, lhv["restored_peak_rss"] / MIB, 0)  # fmt: skip
    row("  same vs worker RSS after restore (MiB)", same, lhv["restored_rss"] / MIB, 0)
    row("  worker RSS before any index (MiB)", None, lhv["worker_idle_rss"] / MIB, 0)
    row(
        "  worker peak RSS during ingest minus before any index (MiB)",
        raw["index_bytes"] / MIB,
        (lhv["peak_rss_ingest"] - lhv["worker_idle_rss"]) / MIB,
        0,
    )
    if churn:
        row("churn: stored base + deltas vs a fresh base of the churned index (MiB)",
            churn["churn_base_bytes"] / MIB, churn["churn_stored_bytes"] / MIB, 2)  # fmt: skip
        row("churn: fresh base vs same live set (MiB)",
            churn["plain_base_bytes"] / MIB, churn["churn_base_bytes"] / MIB, 2)  # fmt: skip
        row("churn: tombstones kept past the horizon", None, churn["churn_stats"]["deleted"], 0)
    head = ("measure", "raw hnswlib", "lhv", "ratio")
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))))  # fmt: skip
    print("ratios: lhv / raw")
    for c in ck:
        print(
            f"  checkpoint at offset {c['offset']}: {c['bases']} bases {c['deltas']} deltas, "
            f"{c['bytes'] / MIB:.1f} MiB, {c['seconds']:.2f} s, "
            f"{c['applied_during']:.0f} records applied meanwhile; {c['reason']}"
        )


def _set(text: str) -> tuple[int, int]:
    n, _, dim = text.lower().partition("x")
    return int(n), int(dim)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="50,000 x 32 (and smaller parts)")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=10_000, help="raw add_items batch rows")
    ap.add_argument("--record-items", type=int, default=1000, help="items per add record")
    ap.add_argument("--writes", type=int, default=None, help="new writes after ingest (50000)")
    ap.add_argument("--tail", type=int, default=None, help="writes before each kill (20000)")
    ap.add_argument("--repeats", type=int, default=3, help="kill -9 runs, raw save/load")
    ap.add_argument("--churn-n", type=int, default=None, help="churn index size (100000)")
    ap.add_argument("--churn-rounds", type=int, default=5)
    ap.add_argument("--no-churn", action="store_true")
    ap.add_argument("--session-timeout-ms", type=int, default=10_000)
    ap.add_argument("--tail-wait-s", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="a setting of the large index's worker (e.g. LHV_CHECKPOINT_MAX_REPLAY_S=2)",
    )
    ap.add_argument("--logdir", type=Path, default=None, help="keep the workers' logs here")
    ap.add_argument("--raw-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.raw_child:
        n, dim = _set(args.raw_child)
        raw_child(n, dim, args.M, args.ef_construction, args.chunk, args.repeats)
        return 0
    if args.quick:
        args.n, args.dim = 50_000, 32
    args.worker_env = dict(kv.split("=", 1) for kv in args.worker_env)
    args.writes = args.writes if args.writes is not None else min(50_000, args.n // 10)
    args.tail = args.tail if args.tail is not None else min(20_000, args.n // 25)
    args.churn_n = args.churn_n if args.churn_n is not None else min(100_000, args.n // 10)

    started = time.monotonic()
    print(f"== {args.n} x {args.dim}, M={args.M}, ef_construction={args.ef_construction}")
    raw = _raw(args)
    print(f"  raw build: {raw['build_s']:.1f} s", flush=True)
    with stack_env() as env, tempfile.TemporaryDirectory(prefix="lhv-bench-large-") as tmp:
        if args.logdir is not None:
            args.logdir.mkdir(parents=True, exist_ok=True)
            tmp = str(args.logdir)
        try:
            lhv = asyncio.run(_lhv(env, args, Path(tmp)))
            churn = None if args.no_churn else asyncio.run(_churn(env, args, Path(tmp)))
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
            raise
    wall_s = time.monotonic() - started
    res = {
        "n": args.n,
        "dim": args.dim,
        "space": SPACE,
        "M": args.M,
        "ef_construction": args.ef_construction,
        "writes": args.writes,
        "tail": args.tail,
        "repeats": args.repeats,
        "raw": raw,
        "lhv": lhv,
        "churn": churn,
    }
    print(f"\nwall clock {wall_s:.0f} s, {os.cpu_count()} CPUs, load {os.getloadavg()}\n")
    _report(res)
    doc = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "wall_s": wall_s, **res}
    write_results(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
