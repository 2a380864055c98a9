"""Operating a worker on the real stack: /metrics during ingest, /readyz across a restore
that waits for S3, structured log context, and the `lhv snapshot` / `lhv replay` tools
against healthy, rewritten and bit-flipped checkpoints."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from mergekit import names_on, wait_no_merge_objects
from prometheus_client.parser import text_string_to_metric_families
from workerkit import (
    ROOT,
    Env,
    all_indexes,
    assert_state_matches,
    command_stream,
    end_offsets,
    make_env,
    oracle_from_records,
    produce,
    read_all,
    running,
    wait_caught_up,
)

from lhv_index import Clock, Delete, Upsert, read_snapshot, write_snapshot
from lhv_index.errors import InvalidRequest
from worker.client import LhvClient
from worker.ops.tools import inspect_snapshot, list_checkpoints, replay_verify, verify_snapshots
from worker.service import Worker
from worker.storage.blobstore import S3BlobStore, S3Config
from worker.storage.snapshots import DeltaPolicy, SnapshotStore
from worker.telemetry.logs import ContextFilter, JsonFormatter
from worker.wire.topics import home_partition

pytestmark = pytest.mark.asyncio(loop_scope="session")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=3)


# -- helpers --------------------------------------------------------------------------------


async def _http(url: str) -> tuple[int, bytes]:
    def fetch() -> tuple[int, bytes]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    return await asyncio.to_thread(fetch)


def _base(worker: Worker) -> str:
    assert worker.metrics_port, "the worker serves metrics"
    return f"http://127.0.0.1:{worker.metrics_port}"


async def _scrape(worker: Worker) -> Samples:
    status, body = await _http(_base(worker) + "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _per_partition(samples: Samples, name: str) -> dict[int, float]:
    return {int(dict(labels)["partition"]): v for (n, labels), v in samples.items() if n == name}


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def _readyz(worker: Worker) -> tuple[int, dict[str, Any]]:
    status, body = await _http(_base(worker) + "/readyz")
    return status, json.loads(body)


@contextmanager
def _json_logs() -> Iterator[list[dict[str, Any]]]:
    """Lines the worker logs, formatted as `lhv worker --log-json` formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("worker")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    lines: list[dict[str, Any]] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines() if line)


def _lhv(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "--log-level", "WARNING", *args],
        env=env.child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- metrics and logs -------------------------------------------------------------------------


async def test_metrics_show_applied_offsets_advancing_and_lag_falling_to_zero(env: Env) -> None:
    stream = command_stream(6_000, partitions=env.partitions, n_indexes=6, seed=23)
    scrapes: list[Samples] = []
    with _json_logs() as lines:
        async with running(env.config(metrics_port=0)) as w:
            for i in range(0, len(stream), 1_000):
                await produce(env.bootstrap, env.topics.commands, stream[i : i + 1_000])
                scrapes.append(await _scrape(w))
            ends = await end_offsets(env.bootstrap, env.topics.commands)
            await wait_caught_up([w], env.bootstrap, env.topics.commands)
            deadline = time.monotonic() + 30
            while True:  # the gauges follow the next poll, and a checkpoint follows in ~2 s
                last = await _scrape(w)
                scrapes.append(last)
                applied = _per_partition(last, "lhv_applied_offset")
                lag = _per_partition(last, "lhv_consumer_lag")
                if (
                    applied == {p: end - 1 for p, end in ends.items()}
                    and lag == dict.fromkeys(ends, 0)
                    and _total(last, "lhv_snapshot_seconds_count") > 0
                ):
                    break
                assert time.monotonic() < deadline, f"applied {applied}, lag {lag}"
                await asyncio.sleep(0.2)
            sizes = {name: len(index) for name, index in all_indexes([w]).items()}
            tombs = {name: index.stats()["deleted"] for name, index in all_indexes([w]).items()}

    # applied offsets only move forward, and they moved
    for p in ends:
        seen = [_per_partition(s, "lhv_applied_offset").get(p) for s in scrapes]
        seen = [v for v in seen if v is not None]
        assert seen == sorted(seen), f"partition {p}: applied offset went back: {seen}"
        assert seen[-1] > seen[0] or (len(set(seen)) == 1 and seen[0] == ends[p] - 1)
    # index gauges match the indexes, and the counters count what happened
    live = {dict(k)["index"]: v for (n, k), v in last.items() if n == "lhv_index_items"}
    assert set(live) == set(sizes)
    for name in sizes:
        assert last[("lhv_index_items", (("index", name), ("state", "live")))] == sizes[name]
        assert last[("lhv_index_items", (("index", name), ("state", "deleted")))] == tombs[name]
    assert _total(last, "lhv_items_applied_total") > 0
    assert _total(last, "lhv_poll_records_count") > 0
    assert _total(last, "lhv_apply_batch_items_count") > 0
    assert _total(last, "lhv_snapshot_bytes_sum") > 0
    assert last[("lhv_partition_state", (("partition", "0"), ("state", "serving")))] == 1

    # every line of the apply and checkpoint paths says where it happened
    created = [x for x in lines if x["msg"] == "index created"]
    assert created and all({"partition", "offset", "index"} <= set(x) for x in created)
    checkpoints = [x for x in lines if x["msg"].startswith("checkpoint (")]
    assert checkpoints and all({"partition", "offset"} <= set(x) for x in checkpoints)
    restored = [x for x in lines if x["msg"].startswith("partition restored")]
    assert restored and all("partition" in x for x in restored)


# -- readiness across a restore that waits for S3 --------------------------------------------


async def test_readyz_is_503_while_a_restore_waits_for_s3_and_200_after(make_local_stack) -> None:
    local = await asyncio.to_thread(make_local_stack)  # private: its S3 gets stopped
    env = await make_env(local.bootstrap_servers, S3Config.from_env(local.env()), partitions=2)
    stream = command_stream(2_000, partitions=env.partitions, seed=41)
    await produce(env.bootstrap, env.topics.commands, stream)
    async with running(env.config(metrics_port=0, worker_id="survivor")) as survivor:
        async with running(env.config(worker_id="leaver")) as leaver:
            deadline = time.monotonic() + 60
            while not (survivor.partitions and leaver.partitions):
                assert time.monotonic() < deadline, "the two workers did not share the partitions"
                await asyncio.sleep(0.1)
            await wait_caught_up([survivor, leaver], env.bootstrap, env.topics.commands)
            assert (await _readyz(survivor))[0] == 200
            await asyncio.to_thread(local.stop_s3)
        # The leaver is gone: the survivor restores every partition, and S3 is down.
        deadline = time.monotonic() + 60
        while True:
            status, body = await _readyz(survivor)
            if status == 503 and set(body["not_ready"]) == {"0", "1"}:
                break
            assert time.monotonic() < deadline, f"readyz stayed {status} {body}"
            await asyncio.sleep(0.1)
        assert set(body["not_ready"].values()) == {"restoring"}
        assert body["refused"] == []
        deadline = time.monotonic() + 60
        while _total(await _scrape(survivor), "lhv_restore_failures_total") < 1:
            assert time.monotonic() < deadline, "no failed restore attempt was counted"
            await asyncio.sleep(0.2)
        assert (await _readyz(survivor))[0] == 503  # S3 is still down: nothing could restore

        await asyncio.to_thread(local.start_s3)
        deadline = time.monotonic() + 90
        while (status := (await _readyz(survivor))[0]) != 200:
            assert time.monotonic() < deadline, "readyz did not become 200 after S3 came back"
            await asyncio.sleep(0.2)
        _, body = await _readyz(survivor)
        assert body["partitions"] == {"0": "serving", "1": "serving"}
        await wait_caught_up([survivor], env.bootstrap, env.topics.commands)
        oracle = oracle_from_records(await read_all(env.bootstrap, env.topics.commands))
        assert_state_matches(all_indexes([survivor]), oracle)


# -- snapshot and replay tools ----------------------------------------------------------------


async def test_snapshot_and_replay_tools_catch_rewritten_and_corrupted_snapshots(
    env: Env,
) -> None:
    stream = command_stream(3_000, partitions=env.partitions, n_indexes=6, seed=59)
    async with running(env.config()) as w:
        await produce(env.bootstrap, env.topics.commands, stream)
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
        names = sorted(all_indexes([w]))
    # stopped gracefully: every partition is checkpointed at its log end

    async with S3BlobStore(env.s3) as blobs:
        listing = await list_checkpoints(blobs, env.topics.commands)
        named = {
            n: e for part in listing if part.manifest for n, e in part.manifest.indexes.items()
        }
        assert sorted(named) == names
        ends = await end_offsets(env.bootstrap, env.topics.commands)
        for part in listing:
            assert part.manifest is not None
            assert part.manifest.offset == ends[part.partition] - 1
            assert part.manifest.writer == w.config.worker_id
        some = names[0]
        info = await inspect_snapshot(blobs, env.topics.commands, some)
        assert info["key"] == named[some].key
        assert info["envelope"]["name"] == some
        assert info["envelope"]["source"]["offset"] == named[some].offset
        assert info["bytes"] == named[some].bytes

        healthy = await verify_snapshots(blobs, env.topics.commands)
        assert healthy.ok, healthy.problems
        # every object the manifests name: a base per index, and the deltas of any index
        # a periodic checkpoint wrote before the final one
        assert healthy.checked == sum(1 + len(e.deltas) for e in named.values())
        replay = await replay_verify(env.config(), blobs)
        assert replay.consistent, (replay.diffs, replay.errors)
        assert sorted(replay.compared) == names

        # CLI, configured from LHV_* variables like an operator's shell
        done = await asyncio.to_thread(_lhv, env, "replay", "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "consistent" in done.stdout
        done = await asyncio.to_thread(_lhv, env, "snapshot", "verify")
        assert done.returncode == 0, done.stdout + done.stderr
        # a partition with no manifest is not "ok": nothing of it was checked
        done = await asyncio.to_thread(_lhv, env, "snapshot", "verify", "--partition", "999")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "partition 999: no manifest" in done.stdout
        assert "0 snapshots checked: ok" not in done.stdout
        # an index no manifest names: one line naming it, no traceback
        done = await asyncio.to_thread(_lhv, env, "snapshot", "inspect", "no-such-index")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "'no-such-index'" in done.stderr and "snapshot ls" in done.stderr
        assert "Traceback" not in done.stderr
        done = await asyncio.to_thread(_lhv, env, "snapshot", "ls")
        assert done.returncode == 0 and all(n in done.stdout for n in names)

        # Rewrite one snapshot with a changed index, keeping the manifest.
        store = SnapshotStore(blobs, topic=env.topics.commands, worker_id="test")
        victim = max(names, key=lambda n: named[n].bytes)
        data, _ = await blobs.get(named[victim].key)
        index, source = read_snapshot(data)
        live = sorted(index.logical_state()["live"])
        changed, deleted = live[0], live[1]
        late = Clock(1 << 40, source["offset"], 0)  # newer than any clock it holds
        index.apply(
            [
                Upsert(
                    id=changed,
                    vector=np.full(index.params.dim, 0.5, dtype=np.float32),
                    metadata=None,
                    clock=late,
                ),
                Delete(id=deleted, clock=late),
            ]
        )
        out = io.BytesIO()
        write_snapshot(index, out, source=source)
        await blobs.put(named[victim].key, out.getvalue())
        assert (await store.load_index(victim, named[victim])).name == victim  # still loads

        replay = await replay_verify(env.config(), blobs)
        assert not replay.consistent
        assert [(d.index, sorted(d.ids)) for d in replay.diffs] == [
            (victim, sorted([changed, deleted]))
        ]
        done = await asyncio.to_thread(_lhv, env, "replay", "--verify")
        assert done.returncode == 1, done.stdout + done.stderr
        assert victim in done.stdout and changed in done.stdout and deleted in done.stdout

        # Flip one bit of another snapshot object.
        flipped = next(n for n in names if n != victim)
        raw = bytearray((await blobs.get(named[flipped].key))[0])
        raw[-10] ^= 0x04
        await blobs.put(named[flipped].key, bytes(raw))
        report = await verify_snapshots(blobs, env.topics.commands)
        bad = [p for p in report.problems if p.key == named[flipped].key]
        assert bad and all("checksum mismatch" in p.message for p in bad), report.problems
        done = await asyncio.to_thread(_lhv, env, "snapshot", "verify")
        assert done.returncode == 1
        assert named[flipped].key in done.stdout and "checksum mismatch" in done.stdout


async def test_replay_rebuilds_imports_from_their_sources_and_names_a_rewritten_one(
    env: Env,
) -> None:
    """An index filled by `add` and `import` is compared like any other: the replay reads
    the import's objects from S3 as they are now. A source rewritten since is a diff that
    names the changed ids; a source deleted since makes the index not replayable. An
    import the worker refused because its source never existed changed nothing, so its
    index is still compared."""
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(300, 8)).astype(np.float32)
    key = f"{env.s3.key_prefix}imports/vecs.npy"
    uri = f"s3://{env.s3.bucket}/{key}"
    buf = io.BytesIO()
    np.save(buf, vecs, allow_pickle=False)
    async with S3BlobStore(replace(env.s3, prefix="")) as root:
        await root.put(key, buf.getvalue())
        async with (
            running(env.config()) as w,
            LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c,
        ):
            await c.create("imp", dim=8, space="l2")
            await c.add("imp", ["a", "b"], vecs[:2] + 1)
            ack = (await c.import_("imp", uri, chunk_items=100)).ack
            assert ack is not None and ack["applied"] == 300
            await c.delete("imp", ["a"])
            await c.create("never", dim=8, space="l2")
            await c.add("never", ["x"], vecs[:1])
            missing = f"s3://{env.s3.bucket}/{env.s3.key_prefix}imports/missing.npy"
            with pytest.raises(InvalidRequest, match="does not exist"):
                await c.import_("never", missing)
            await wait_caught_up([w], env.bootstrap, env.topics.commands)
        async with S3BlobStore(env.s3) as blobs:
            replay = await replay_verify(env.config(), blobs)
            assert replay.consistent, (replay.diffs, replay.errors)
            assert replay.compared == ["imp", "never"] and replay.not_replayable == []

            changed = vecs.copy()
            changed[7] += 1  # the source rewritten after the import: row 7 is "7"
            buf = io.BytesIO()
            np.save(buf, changed, allow_pickle=False)
            await root.put(key, buf.getvalue())
            replay = await replay_verify(env.config(), blobs)
            assert [(d.index, d.ids) for d in replay.diffs] == [("imp", ("7",))]

            await root.delete(key)
            replay = await replay_verify(env.config(), blobs)
            assert replay.consistent and replay.not_replayable == ["imp"]
            assert replay.compared == ["never"]


async def test_replay_rebuilds_merges_within_and_across_partitions(env: Env) -> None:
    """Merges are replayed like the worker applies them: within a partition in one step,
    across partitions with the export handed from the source's rebuild to the
    destination's (the worker's export object is gone once the merge completed). Every
    index is compared, also when only the destination's partition is asked for, and a
    destination snapshot rewritten after the merge is named with its ids."""
    local_src, local_dest = names_on(env.partitions, same=True, prefix="loc")
    far_src, far_dest = names_on(env.partitions, same=False, prefix="far")
    rng = np.random.default_rng(4)
    # every snapshot a base: the tampering below rewrites a lone base (a rewritten segment
    # of a chain does not load at all: see test_snapshot_chain.py)
    bases_only = replace(env.config().checkpoint, deltas=DeltaPolicy(max_deltas=0))
    async with (
        running(env.config(checkpoint=bases_only)) as w,
        LhvClient(env.bootstrap, topics=env.topics, timeout_s=60) as c,
    ):
        for name in (local_src, local_dest, far_src, far_dest):
            await c.create(name, dim=4, space="l2", engine="exact")
            await c.add(name, [f"{name}-{i}" for i in range(20)], rng.normal(size=(20, 4)))
        await c.add(local_dest, [f"{local_src}-3"], rng.normal(size=(1, 4)))  # kept
        await c.merge(local_src, local_dest, clear_source=True)
        await c.add(local_src, ["late"], rng.normal(size=(1, 4)))  # stays in the source
        await c.add(far_dest, [f"{far_src}-5"], rng.normal(size=(1, 4)))  # kept
        await c.merge(far_src, far_dest, clear_source=True)
        await c.add(far_src, ["late"], rng.normal(size=(1, 4)))
        await c.merge(far_src, far_dest)  # a second merge: only "late" is new in dest
        await c.delete(far_dest, [f"{far_src}-7"])
        await wait_no_merge_objects(env)
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
        state = all_indexes([w])
        assert len(state[local_dest]) == 40 and len(state[local_src]) == 1
        assert len(state[far_dest]) == 40 and list(state[far_src].logical_state()["live"]) == [
            "late"
        ]
    everything = sorted([local_src, local_dest, far_src, far_dest])
    dest_partition = home_partition(far_dest.encode(), env.partitions)
    async with S3BlobStore(env.s3) as blobs:
        replay = await replay_verify(env.config(), blobs)
        assert replay.consistent, (replay.diffs, replay.errors)
        assert replay.compared == everything and replay.not_replayable == []

        # Only the destination's partition: the source's is rebuilt for its exports.
        replay = await replay_verify(env.config(), blobs, partitions=[dest_partition])
        assert replay.consistent, (replay.diffs, replay.errors)
        assert far_dest in replay.compared and far_src not in replay.compared
        assert replay.not_replayable == []

        # The destination's snapshot loses a merged item: the replay names it.
        entry = next(
            part.manifest.indexes[far_dest]
            for part in await list_checkpoints(blobs, env.topics.commands)
            if part.manifest is not None and far_dest in part.manifest.indexes
        )
        data, _ = await blobs.get(entry.key)
        index, source = read_snapshot(data)
        lost = f"{far_src}-11"
        index.apply([Delete(id=lost, clock=Clock(1 << 40, source["offset"], 0))])
        out = io.BytesIO()
        write_snapshot(index, out, source=source)
        await blobs.put(entry.key, out.getvalue())
        replay = await replay_verify(env.config(), blobs)
    assert [(d.index, d.ids) for d in replay.diffs] == [(far_dest, (lost,))]
