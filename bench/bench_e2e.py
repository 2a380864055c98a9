"""LHV end to end (Kafka + worker + S3) against raw hnswlib, in the same run.

For each data set (clustered, see bench/data.py; same vectors and parameters on both sides),
an `lhv worker` subprocess on its own 1-partition topics, and in this process:

- ingest: `LhvClient.add` of N vectors (records of `--record-items`), from the first
  record produced until a read-your-writes search naming the last record's offset is
  answered (so: client encoding, Kafka, decoding, validation, apply), vs raw
  `add_items` on `--chunk`-row batches with `max_elements` up front (goal: <= 1.25x);
- search: one closed-loop requester (RTT p50/p99; goal: a few ms on loopback) and
  `--concurrency` closed-loop requesters in one client (QPS; goal: >= 0.70 of raw
  `knn_query` QPS, compared both with batches of `--concurrency` queries, the most the
  worker can batch with that many requesters, and with all queries in one call);
  recall@k against brute force for both at the same ef (goal: equal);
- checkpoint: `SnapshotStore.save_index` (encode + upload) and `load_index` (download +
  decode) against the real S3 vs raw `save_index` / `load_index` on local disk (goal:
  <= 1.5x); the codec alone (through a local temp file) is timed too, to split codec
  from transfer;
- recovery: the worker stops gracefully (final checkpoint), restarts (time until a query
  is answered), takes `--tail` more acknowledged writes, is killed with SIGKILL and
  restarted at once: time from the kill until a query is answered, with the worker's own
  restore time from its log (session timeout `--session-timeout-ms`);
- memory: the worker's peak RSS (VmHWM) after ingest + search and after a restore, vs
  the peak RSS of a subprocess that builds the raw hnswlib index of the same vectors.

Kafka and S3 come from `LHV_BOOTSTRAP_SERVERS` / `LHV_S3_*` when set (e.g. after
`lhv stack up`), else a private local stack is started and stopped. Medians over
`--repeats` where a measure repeats. Prints a table of absolutes and ratios, then one JSON
object (also written to `--json`).

    python bench/bench_e2e.py                           # defaults: ~10 min on 2 cores
    python bench/bench_e2e.py --sets 20000x128 --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data import chunks, queries  # noqa: E402
from bench.stackenv import stack_env, worker_env, write_results  # noqa: E402
from lhv_index import read_snapshot, write_snapshot  # noqa: E402
from worker.client import LhvClient  # noqa: E402
from worker.dev.demo import until_answered  # noqa: E402
from worker.storage.blobstore import S3BlobStore, S3Config  # noqa: E402
from worker.storage.snapshots import SnapshotStore  # noqa: E402

__all__ = ["main"]

SPACE = "cosine"
CHUNK_ROWS = 10_000  # rows per generated piece (bench/data.py chunks), shared by both sides


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _ids(n: int) -> list[str]:
    return [f"doc-{i:08d}" for i in range(n)]


def _data(n: int, dim: int) -> np.ndarray:
    return np.concatenate([part for _, part in chunks(n, dim, size=CHUNK_ROWS)])


def _truth(data: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (row numbers), in slices of queries to bound memory."""
    d = data / np.linalg.norm(data, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    for start in range(0, len(qn), 256):
        sims = qn[start : start + 256] @ d.T
        out.append(np.argpartition(-sims, k, axis=1)[:, :k])
    return np.concatenate(out)


def _recall(found: list[set[int]], truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(f & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


def _proc_status(pid: int | str, field: str) -> int:
    """A `/proc/<pid>/status` memory field (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def _cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuMeter:
    """CPU seconds used by the worker, this process (the client), Kafka and S3 between
    `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int | str]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self._t0: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = {name: _cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: _cpu_s(pid) - self._t0[name] for name, pid in self.pids.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- raw hnswlib -------------------------------------------------------------------------


def _raw_build(data: np.ndarray, args: argparse.Namespace) -> tuple[hnswlib.Index, float]:
    index = hnswlib.Index(space=SPACE, dim=data.shape[1])
    index.init_index(max_elements=len(data), M=args.M, ef_construction=args.ef_construction)
    t0 = time.perf_counter()
    for start in range(0, len(data), args.chunk):
        part = data[start : start + args.chunk]
        index.add_items(part, np.arange(start, start + len(part)))
    return index, time.perf_counter() - t0


class _Raw:
    """The raw hnswlib side. Each call is one run of one measure, so that the caller can
    interleave raw and end-to-end runs: a shared machine's load then weighs on both."""

    def __init__(
        self, data: np.ndarray, q: np.ndarray, truth: np.ndarray, args: argparse.Namespace
    ) -> None:
        self.data, self.q, self.truth, self.args = data, q, truth, args
        self.index: hnswlib.Index | None = None
        self.runs: dict[str, list[float]] = {}
        self.out: dict[str, Any] = {}

    def _add(self, key: str, value: float) -> None:
        self.runs.setdefault(key, []).append(value)

    def build(self) -> None:
        self.index = None
        gc.collect()
        cpu0 = _cpu_s("self")
        self.index, secs = _raw_build(self.data, self.args)
        self._add("ingest_s", secs)
        self._add("ingest_cpu_s", _cpu_s("self") - cpu0)

    def _built(self) -> hnswlib.Index:
        assert self.index is not None, "build() first"
        return self.index

    def search_once(self) -> None:
        """Recall at the benchmark's ef, and one-query-per-call latency."""
        index, args = self._built(), self.args
        index.set_ef(args.ef)
        found, _ = index.knn_query(self.q, k=args.k)
        self.out["recall"] = _recall([set(row.tolist()) for row in found], self.truth)
        lat = []
        for row in self.q[: args.single]:
            t0 = time.perf_counter()
            index.knn_query(row, k=args.k)
            lat.append((time.perf_counter() - t0) * 1000)
        self.out["single_p50_ms"] = float(np.percentile(lat, 50))

    def qps(self) -> None:
        index, q, c = self._built(), self.q, self.args.concurrency
        cpu0 = _cpu_s("self")
        t0 = time.perf_counter()
        index.knn_query(q, k=self.args.k)
        self._add("qps_one_call", len(q) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for start in range(0, len(q), c):
            index.knn_query(q[start : start + c], k=self.args.k)
        self._add("qps_batches", len(q) / (time.perf_counter() - t0))
        self._add("cpu_ms_per_query", 1000 * (_cpu_s("self") - cpu0) / (2 * len(q)))

    def snapshot(self) -> None:
        """`save_index` and `load_index` through a local file."""
        index, n, dim = self._built(), *self.data.shape
        with tempfile.TemporaryDirectory(prefix="lhv-bench-raw-") as tmp:
            path = os.path.join(tmp, "raw.bin")
            t0 = time.perf_counter()
            index.save_index(path)
            self._add("save_s", time.perf_counter() - t0)
            self.out["file_bytes"] = os.path.getsize(path)
            loaded = hnswlib.Index(space=SPACE, dim=dim)
            t0 = time.perf_counter()
            loaded.load_index(path, max_elements=n)
            self._add("load_s", time.perf_counter() - t0)
            del loaded

    def result(self) -> dict[str, Any]:
        out = dict(self.out)
        for key, values in self.runs.items():
            out[key] = _median(values)
            out[key.removesuffix("_s") + "_runs"] = values
        return out


def mem_child(n: int, dim: int, M: int, efc: int) -> None:
    """Build the raw index of the benchmark's vectors, streamed in pieces as the worker
    receives them; print its peak RSS (run in a fresh process)."""
    base = _proc_status("self", "VmRSS")
    index = hnswlib.Index(space=SPACE, dim=dim)
    index.init_index(max_elements=n, M=M, ef_construction=efc)
    for start, part in chunks(n, dim, size=CHUNK_ROWS):
        index.add_items(part, np.arange(start, start + len(part)))
        del part
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    out = {
        "base_rss": base,
        "rss": _proc_status("self", "VmRSS"),
        "peak_rss": _proc_status("self", "VmHWM"),
    }
    print(json.dumps(out))


def _raw_memory(n: int, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--mem-child", f"{n}x{dim}"]
    cmd += ["--M", str(args.M), "--ef-construction", str(args.ef_construction)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- the worker --------------------------------------------------------------------------


class _Worker:
    """One `lhv worker` subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.metrics_port = _free_port()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "--log-level", "INFO", "worker"],
                env={**env, "LHV_METRICS_PORT": str(self.metrics_port)},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def peak_rss(self) -> int:
        return _proc_status(self.proc.pid, "VmHWM")

    def rss(self) -> int:
        return _proc_status(self.proc.pid, "VmRSS")

    def metrics(self) -> dict[str, float]:
        """The worker's Prometheus series, summed over labels: `name` -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self, timeout_s: float = 300) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


async def _concurrent(
    client: LhvClient, index: str, q: np.ndarray, total: int, args: argparse.Namespace
) -> tuple[float, dict[int, set[int]]]:
    """`args.concurrency` closed-loop requesters answer `total` queries (cycling over
    `q`); returns QPS and the hits of every query row answered."""
    next_row = iter(range(total))
    found: dict[int, set[int]] = {}

    async def requester() -> None:
        for i in next_row:
            row = i % len(q)
            hits = await client.search(index, q[row], k=args.k, ef=args.ef, timeout_s=120)
            found[row] = {int(h.id[4:]) for h in hits}

    t0 = time.perf_counter()
    await asyncio.gather(*(requester() for _ in range(args.concurrency)))
    return total / (time.perf_counter() - t0), found


def _restore_seconds(log: Path) -> float | None:
    m = re.findall(r"partition restored in ([\d.]+)s", log.read_text(errors="replace"))
    return float(m[-1]) if m else None


async def _lhv_side(
    env: dict[str, str],
    data: np.ndarray,
    q: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    logdir: Path,
    raw: _Raw,
) -> dict[str, Any]:
    """The end-to-end measures, each repeat right after the same raw measure."""
    n, dim = data.shape
    topics, s3, child = await worker_env(
        env, "e2e", {"LHV_SESSION_TIMEOUT_MS": str(args.session_timeout_ms)}
    )
    bootstrap = env["LHV_BOOTSTRAP_SERVERS"]
    params = {"M": args.M, "ef_construction": args.ef_construction, "ef_search": args.ef}
    ids = _ids(n)
    out: dict[str, Any] = {}
    worker = _Worker(child, logdir / f"{dim}-1-ingest.log")
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
            # -- ingest --
            await client.create("warmup", dim=dim, space=SPACE, timeout_s=120, **params)
            out["worker_idle_rss"] = worker.rss()
            runs: list[float] = []
            cpu_runs: list[float] = []
            name = ""
            for r in range(args.repeats):
                await asyncio.to_thread(raw.build)
                print(f"  raw build {r + 1}: {raw.runs['ingest_s'][-1]:.2f} s", flush=True)
                if name:
                    await client.drop(name)
                name = f"e2e-{r}"
                await client.create(name, dim=dim, space=SPACE, **params)
                cpu.start()
                t0 = time.perf_counter()
                last = await client.add(name, ids, data, batch_size=args.record_items)
                await client.search(name, data[0], k=1, after=last, timeout_s=1800)
                runs.append(time.perf_counter() - t0)
                used_ingest = cpu.stop()
                out["ingest_cpu_s"] = used_ingest
                cpu_runs.append(sum(used_ingest.values()))
                print(f"  ingest run {r + 1}: {runs[-1]:.2f} s", flush=True)
                if r == 0:
                    out["worker_peak_rss_first_ingest"] = worker.peak_rss()
            out["ingest_s"] = _median(runs)
            out["ingest_runs_s"] = runs
            out["ingest_cpu_total_s"] = _median(cpu_runs)
            stats = await client.stats(name)
            assert stats["count"] == n, stats
            m = worker.metrics()
            out["apply_s_total"] = m.get("lhv_apply_seconds_sum", 0.0)
            out["apply_calls"] = m.get("lhv_apply_seconds_count", 0.0)

            # -- search --
            await asyncio.to_thread(raw.search_once)
            for row in q[:50]:  # warm up
                await client.search(name, row, k=args.k, ef=args.ef)
            lat = []
            for row in q[: args.single]:
                t0 = time.perf_counter()
                await client.search(name, row, k=args.k, ef=args.ef)
                lat.append((time.perf_counter() - t0) * 1000)
            out["single_p50_ms"] = float(np.percentile(lat, 50))
            out["single_p99_ms"] = float(np.percentile(lat, 99))
            before = worker.metrics()
            total = max(args.concurrent_queries, len(q))
            qps_runs = []
            plain_runs = []
            found: dict[int, set[int]] = {}
            used: dict[str, float] = {}
            async with LhvClient(
                bootstrap, topics=topics, timeout_s=600, coalesce_searches=False
            ) as plain:
                await plain.search(name, q[0], k=args.k, ef=args.ef)
                for _ in range(args.repeats):
                    await asyncio.to_thread(raw.qps)
                    cpu.start()
                    qps, got = await _concurrent(client, name, q, total, args)
                    for key, value in cpu.stop().items():
                        used[key] = used.get(key, 0.0) + value
                    qps_runs.append(qps)
                    found = found or got
                    plain_runs.append((await _concurrent(plain, name, q, total, args))[0])
            out["search_cpu_ms_per_query"] = {
                k: 1000 * v / (total * args.repeats) for k, v in used.items()
            }
            after = worker.metrics()
            out["qps"] = _median(qps_runs)
            out["qps_runs"] = qps_runs
            out["qps_one_request_per_query"] = _median(plain_runs)
            out["qps_one_request_per_query_runs"] = plain_runs
            out["recall"] = _recall([found[i] for i in range(len(q))], truth)

            def delta(series: str) -> float:
                return after.get(series, 0.0) - before.get(series, 0.0)

            requests = delta("lhv_search_batch_size_count")
            queries = delta("lhv_search_queries_total")
            out["queries_per_request"] = queries / requests if requests else None
            out["mean_engine_batch"] = (
                delta("lhv_search_batch_size_sum") / requests if requests else None
            )
            out["in_worker_ms_per_request"] = (
                1000 * delta("lhv_search_seconds_sum") / requests if requests else None
            )
            out["worker_peak_rss"] = worker.peak_rss()
        # -- checkpoint: the final one on a graceful stop --
        code = worker.stop()
        assert code == 0, f"worker exited {code}; see {worker.log}"
        out.update(await _snapshot_side(s3, topics.commands, name, raw, args))

        # -- recovery --
        async with LhvClient(bootstrap, topics=topics, timeout_s=600) as client:
            t0 = time.monotonic()
            worker = _Worker(child, logdir / f"{dim}-2-restart.log")
            out["restart_s"] = await until_answered(client, name, q[0], 600, every_s=0.1) - t0
            out["restart_restore_s"] = _restore_seconds(worker.log)
            tail = data[: args.tail] + np.float32(0.01)
            await client.add(name, [f"tail-{i}" for i in range(len(tail))], tail, ack=True)
            killed = time.monotonic()
            worker.kill9()
            worker = _Worker(child, logdir / f"{dim}-3-after-kill.log")
            out["recovery_s"] = await until_answered(client, name, q[0], 600, every_s=0.1) - killed
            out["recovery_restore_s"] = _restore_seconds(worker.log)
            stats = await client.stats(name)
            assert stats["count"] == n + args.tail, stats
            out["worker_restored_peak_rss"] = worker.peak_rss()
            # -- the same with static membership: the restarted worker rejoins as itself --
            worker.stop()
            static = {**child, "LHV_GROUP_INSTANCE_ID": f"bench-{dim}"}
            worker = _Worker(static, logdir / f"{dim}-4-static.log")
            await until_answered(client, name, q[0], 600, every_s=0.1)
            more = data[: args.tail] + np.float32(0.02)
            await client.add(name, [f"tail2-{i}" for i in range(len(more))], more, ack=True)
            killed = time.monotonic()
            worker.kill9()
            worker = _Worker(static, logdir / f"{dim}-5-static-after-kill.log")
            answered = await until_answered(client, name, q[0], 600, every_s=0.1)
            out["recovery_static_s"] = answered - killed
            stats = await client.stats(name)
            assert stats["count"] == n + 2 * args.tail, stats
    finally:
        worker.stop()
    return out


async def _snapshot_side(
    s3: S3Config, commands_topic: str, name: str, raw: _Raw, args: argparse.Namespace
) -> dict[str, Any]:
    """Time the worker's own snapshot code against the real S3, on the checkpoint the
    worker just wrote; each repeat right after a raw save and load."""
    out: dict[str, Any] = {}
    blobs = S3BlobStore(s3)
    await blobs.start()
    try:
        store = SnapshotStore(blobs, topic=commands_topic, worker_id="bench")
        manifest, _ = await store.read_manifest(0)
        assert manifest is not None and name in manifest.indexes, manifest
        entry = manifest.indexes[name]
        out["snapshot_bytes"] = entry.bytes
        loads, saves = [], []
        index = None
        for _ in range(args.repeats):
            await asyncio.to_thread(raw.snapshot)
            index = None
            gc.collect()
            t0 = time.perf_counter()
            index = await store.load_index(name, entry)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await store.save_index(0, index, offset=entry.offset)
            saves.append(time.perf_counter() - t0)
        assert index is not None
        out["s3_load_s"] = _median(loads)
        out["s3_save_s"] = _median(saves)
        encodes, decodes = await asyncio.to_thread(_codec_times, index, args.repeats)
        out["codec_save_s"] = _median(encodes)
        out["codec_load_s"] = _median(decodes)
    finally:
        await blobs.stop()
    return out


def _codec_times(index: Any, repeats: int) -> tuple[list[float], list[float]]:
    """`write_snapshot` to a local file and `read_snapshot` of its bytes: the LHV1 codec
    without the network."""
    encodes, decodes = [], []
    with tempfile.TemporaryDirectory(prefix="lhv-bench-snap-") as tmp:
        path = os.path.join(tmp, "snap.lhv")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                write_snapshot(index, f, source={"offset": 0})
            encodes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                read_snapshot(f.read())
            decodes.append(time.perf_counter() - t0)
    return encodes, decodes


# -- report ------------------------------------------------------------------------------


def _rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(measure, raw, lhv, ratio, goal) rows of one set."""
    raw, lhv, mem = res["raw"], res["lhv"], res["memory"]
    mib = 2**20
    c = res["concurrency"]

    def f(x: float, p: int = 2) -> str:
        return f"{x:,.{p}f}"

    Row = tuple[str, str, str, str, str]

    def vs(measure: str, r: float, x: float, p: int = 2, goal: str = "") -> Row:
        """raw `r` against lhv `x`, and their ratio"""
        return (measure, f(r, p), f(x, p), f(x / r, 3), goal)

    def only(measure: str, x: float, p: int = 2) -> Row:
        """a figure of lhv alone"""
        return (measure, "", f(x, p), "", "")

    cpu_per_query = sum(lhv["search_cpu_ms_per_query"].values())
    raw_snapshot = raw["save_s"] + raw["load_s"]
    s3_snapshot = lhv["s3_save_s"] + lhv["s3_load_s"]
    rows: list[Row] = [
        vs("ingest (s)", raw["ingest_s"], lhv["ingest_s"], goal="<= 1.25"),
        vs(
            "ingest, CPU seconds (lhv: worker + client + Kafka + S3)",
            raw["ingest_cpu_s"],
            lhv["ingest_cpu_total_s"],
            1,
        ),
        (
            "search, 1 requester: p50 / p99 (ms)",
            f(raw["single_p50_ms"], 3),
            f"{lhv['single_p50_ms']:.2f} / {lhv['single_p99_ms']:.2f}",
            "",
            "a few ms",
        ),
        vs(
            f"search QPS, {c} requesters vs raw batches of {c}",
            raw["qps_batches"],
            lhv["qps"],
            0,
            ">= 0.70",
        ),
        vs(
            f"search QPS, {c} requesters vs raw one call",
            raw["qps_one_call"],
            lhv["qps"],
            0,
            ">= 0.70",
        ),
        vs(
            f"search QPS, {c} requesters, one request per query (coalescing off)",
            raw["qps_batches"],
            lhv["qps_one_request_per_query"],
            0,
        ),
        vs(
            "search, CPU ms per query under load (lhv: all processes)",
            raw["cpu_ms_per_query"],
            cpu_per_query,
            3,
        ),
        (
            f"recall@{res['k']} vs exact (ef={res['ef']})",
            f(raw["recall"], 4),
            f(lhv["recall"], 4),
            "",
            "equal",
        ),
        vs("snapshot save: S3 vs local file (s)", raw["save_s"], lhv["s3_save_s"], 3),
        vs("snapshot restore: S3 vs local file (s)", raw["load_s"], lhv["s3_load_s"], 3),
        vs("snapshot save + restore (s)", raw_snapshot, s3_snapshot, 3, "<= 1.5"),
        only(
            "  of which LHV1 codec only, local file (s)",
            lhv["codec_save_s"] + lhv["codec_load_s"],
            3,
        ),
        (
            "recovery: kill -9 to answered (s; raw: load_index)",
            f(raw["load_s"], 3),
            f(lhv["recovery_s"], 2),
            "",
            "",
        ),
        only("  of which restore in the worker (s)", lhv["recovery_restore_s"] or float("nan")),
        only(
            "recovery, static membership (LHV_GROUP_INSTANCE_ID): kill -9 to answered (s)",
            lhv["recovery_static_s"],
        ),
        only("graceful restart to answered (s)", lhv["restart_s"]),
        (
            "RSS of the process before any index (MiB)",
            f(mem["base_rss"] / mib, 0),
            f(lhv["worker_idle_rss"] / mib, 0),
            "",
            "",
        ),
        vs(
            "peak RSS, build / first ingest (MiB)",
            mem["peak_rss"] / mib,
            lhv["worker_peak_rss_first_ingest"] / mib,
            0,
        ),
        vs(
            "peak RSS, restored worker (MiB)",
            mem["peak_rss"] / mib,
            lhv["worker_restored_peak_rss"] / mib,
            0,
        ),
    ]
    return rows


def _report(results: list[dict[str, Any]]) -> None:
    head = ("set", "measure", "raw hnswlib", "lhv end to end", "ratio", "goal")
    table = [head]
    for res in results:
        label = f"{res['n']}x{res['dim']}"
        table += [(label, *row) for row in _rows(res)]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print("ratios: lhv / raw for times, CPU and memory; lhv QPS / raw QPS for throughput")


def _set(text: str) -> tuple[int, int]:
    n, _, dim = text.lower().partition("x")
    return int(n), int(dim)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sets", default="100000x128,40000x384", help="NxDIM,... (100000x128,40000x384)"
    )
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", type=int, default=64, help="search ef on both sides")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000, help="query set (recall, QPS)")
    ap.add_argument("--single", type=int, default=1000, help="queries of the 1-requester loop")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent requesters")
    ap.add_argument("--concurrent-queries", type=int, default=6000, help="queries per QPS run")
    ap.add_argument("--chunk", type=int, default=10_000, help="raw add_items batch rows")
    ap.add_argument("--record-items", type=int, default=1000, help="items per add record")
    ap.add_argument("--tail", type=int, default=1000, help="writes after the checkpoint")
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.mem_child:
        n, dim = _set(args.mem_child)
        mem_child(n, dim, args.M, args.ef_construction)
        return 0

    results = []
    started = time.monotonic()
    with stack_env() as env, tempfile.TemporaryDirectory(prefix="lhv-bench-e2e-") as tmp:
        for text in args.sets.split(","):
            n, dim = _set(text)
            print(f"== {n} x {dim}", flush=True)
            data = _data(n, dim)
            q = queries(args.queries, dim)
            truth = _truth(data, q, args.k)
            raw_side = _Raw(data, q, truth, args)
            try:
                lhv = asyncio.run(_lhv_side(env, data, q, truth, args, Path(tmp), raw_side))
            except BaseException:
                for log in sorted(Path(tmp).glob("*.log")):
                    print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
                raise
            print(f"  lhv done ({time.monotonic() - started:.0f} s)", flush=True)
            raw = raw_side.result()
            raw_side.index = None
            mem = _raw_memory(n, dim, args)
            results.append(
                {
                    "n": n,
                    "dim": dim,
                    "space": SPACE,
                    "M": args.M,
                    "ef_construction": args.ef_construction,
                    "ef": args.ef,
                    "k": args.k,
                    "concurrency": args.concurrency,
                    "repeats": args.repeats,
                    "raw": raw,
                    "lhv": lhv,
                    "memory": mem,
                }
            )
    wall_s = time.monotonic() - started
    print(f"\nwall clock {wall_s:.0f} s, {os.cpu_count()} CPUs, load {os.getloadavg()}\n")
    _report(results)
    for res in results:
        lhv = res["lhv"]
        per_q = ", ".join(f"{k} {v:.3f}" for k, v in lhv["search_cpu_ms_per_query"].items())
        ingest = ", ".join(f"{k} {v:.1f}" for k, v in lhv["ingest_cpu_s"].items())
        print(
            f"{res['n']}x{res['dim']}: CPU ms per query under load: {per_q}; "
            f"{lhv['queries_per_request'] or 0:.1f} queries per request, engine calls of "
            f"{lhv['mean_engine_batch'] or 0:.1f} vectors, "
            f"{lhv['in_worker_ms_per_request'] or 0:.2f} ms in the worker per request; "
            f"ingest CPU s: {ingest}; worker apply {lhv['apply_s_total'] / res['repeats']:.1f} s in "
            f"{lhv['apply_calls'] / res['repeats']:.0f} calls per run"
        )
    doc = {
        "command": " ".join(sys.argv),
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "wall_s": wall_s,
        "sets": results,
    }
    write_results(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
