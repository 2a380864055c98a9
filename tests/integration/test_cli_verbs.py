"""The `lhv` command line against a real Kafka and S3, as a user's shell runs it: the
verbs of the wire contract, the checks `lhv load` makes before it sends anything, and
one line with the right exit code for each mistake."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from workerkit import ROOT, Env, end_offsets, make_env, running

from worker.cli import EXIT_FAILED, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from worker.storage.blobstore import S3Config


@pytest.fixture
async def env(bootstrap_servers: str, s3_config: S3Config) -> Env:
    return await make_env(bootstrap_servers, s3_config, partitions=2)


def _lhv_sync(env: Env, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env.child_env(**extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def lhv(env: Env, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`lhv ARGS` with the env's settings, and `extra` variables over them."""
    return await asyncio.to_thread(_lhv_sync, env, *args, **extra)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def _jsonl(path: Path, rows: int, dim: int) -> Path:
    with path.open("w") as f:
        for i in range(rows):
            vector = [float(i + 1)] + [0.5] * (dim - 1)
            f.write(json.dumps({"id": f"d{i}", "vector": vector, "metadata": {"n": i}}) + "\n")
    return path


async def test_load_with_no_worker_running_says_so_and_sends_nothing(
    env: Env, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "v.jsonl", 3, 4)
    done = await lhv(env, "load", "docs", str(data), "--create", "--check-timeout", "1")
    assert done.returncode == EXIT_UNREACHABLE
    line = _one_line(done)
    assert "no worker answered" in line and "nothing was sent" in line
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    assert set(ends.values()) == {0}


async def test_a_topic_that_does_not_exist_is_one_line_naming_it_for_verbs_and_worker(
    env: Env,
) -> None:
    typo = f"{env.topics.search}-typo"
    dlq_typo = f"{env.topics.dlq}-typo"
    verb, worker, no_dlq = await asyncio.gather(
        lhv(env, "stats", "docs", "--timeout", "5", LHV_SEARCH_TOPIC=typo),
        lhv(env, "worker", LHV_COMMANDS_TOPIC=typo),
        # without its DLQ topic, a rejected command's DLQ record would be lost
        lhv(env, "worker", LHV_DLQ_TOPIC=dlq_typo),
    )
    assert verb.returncode == EXIT_USAGE, verb.stderr
    line = _one_line(verb)
    assert f"topic {typo!r} does not exist" in line and "LHV_SEARCH_TOPIC" in line
    for done, topic, setting in (
        (worker, typo, "LHV_COMMANDS_TOPIC"),
        (no_dlq, dlq_typo, "LHV_DLQ_TOPIC"),
    ):
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("lhv worker: ") and f"topic {topic!r} must exist" in last
        assert setting in last


async def test_a_timeout_that_is_not_positive_is_a_usage_error(env: Env) -> None:
    for value in ("0", "-1", "nan"):
        done = await lhv(env, "stats", "docs", "--timeout", value)
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "--timeout" in _one_line(done)


async def test_replay_of_a_partition_the_topic_does_not_have_fails_naming_it(env: Env) -> None:
    done = await lhv(env, "replay", "--verify", "--partition", "7")
    assert done.returncode == EXIT_FAILED, done.stdout + done.stderr
    assert "--partition 7" in done.stdout + done.stderr
    assert "has partitions 0 to 1" in done.stdout + done.stderr
    assert "consistent:" not in done.stdout


async def test_snapshot_ls_before_any_checkpoint_says_there_is_none_yet(env: Env) -> None:
    done = await lhv(env, "snapshot", "ls")
    assert done.returncode == EXIT_OK, done.stderr
    assert "no checkpoints yet" in done.stdout and "LHV_CHECKPOINT_SECONDS" in done.stdout
    assert done.stderr == ""  # no INFO lines of the libraries or the store


async def test_quickstart_verbs_create_load_search_get_delete_stats_drop(
    env: Env, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "v.jsonl", 5, 4)
    async with running(env.config()):
        done = await lhv(env, "load", "docs", str(data))
        assert done.returncode == EXIT_REFUSED
        line = _one_line(done)
        assert "does not exist" in line and "--create" in line

        done = await lhv(env, "create", "docs", "--dim", "4", "--space", "l2", "--json")
        assert done.returncode == EXIT_OK, done.stderr
        assert json.loads(done.stdout)["status"] == "ok"
        assert done.stderr == ""  # no INFO noise from aiokafka

        wrong = tmp_path / "wrong.npy"
        np.save(wrong, np.ones((2, 3), dtype=np.float32))
        done = await lhv(env, "load", "docs", str(wrong))
        assert done.returncode == EXIT_REFUSED
        assert "3-dim vectors but index 'docs' has dim 4" in _one_line(done)

        done = await lhv(env, "load", "docs", str(data), "--no-progress")
        assert done.returncode == EXIT_OK, done.stderr
        assert "loaded 5 of 5 rows into docs" in done.stdout

        done = await lhv(env, "add", "docs", "extra", "--vector", "[9, 9, 9, 9]")
        assert done.returncode == EXIT_OK and "applied 1" in done.stdout

        done = await lhv(env, "search", "docs", "--vector", "[1, 0.5, 0.5, 0.5]", "-k", "2")
        assert done.returncode == EXIT_OK, done.stderr
        done = await lhv(
            env, "search", "docs", "--vector", "[1, 0.5, 0.5, 0.5]", "-k", "2", "--json",
            "--filter", '{"n": 2}', "--metadata",
        )  # fmt: skip
        hits = json.loads(done.stdout)["hits"]
        assert [h["id"] for h in hits] == ["d2"] and hits[0]["metadata"] == {"n": 2}

        done = await lhv(env, "get", "docs", "d1", "nope", "--json")
        items = [json.loads(line) for line in done.stdout.splitlines()]
        assert [i["id"] for i in items] == ["d1"] and items[0]["vector"][0] == 2.0

        done = await lhv(env, "delete", "docs", "d0", "d1")
        assert done.returncode == EXIT_OK, done.stderr

        done = await lhv(env, "stats", "docs", "--json")
        stats = json.loads(done.stdout)
        assert stats["count"] == 4 and stats["engine"] == "hnsw"
        assert "M" in stats["params"] and "n_trees" not in stats["params"]

        done = await lhv(env, "drop", "docs")
        assert done.returncode == EXIT_OK, done.stderr
        done = await lhv(env, "stats", "docs")
        assert done.returncode == EXIT_REFUSED
        assert "index_not_found" in _one_line(done)


async def test_load_refuses_a_zero_row_for_an_index_under_cosine_before_sending(
    env: Env, tmp_path: Path
) -> None:
    data = tmp_path / "v.jsonl"
    data.write_text('{"id": "a", "vector": [1, 0]}\n\n{"id": "z", "vector": [0, 0]}\n')
    async with running(env.config()):
        for args in (["--create"], []):  # created by the load, then existing
            done = await lhv(env, "load", "docs", str(data), *args)
            assert done.returncode == EXIT_INPUT, done.stderr
            line = _one_line(done)
            assert "line 3 (id 'z')" in line and "cosine" in line and "nothing was sent" in line
            if not args:
                break
            assert (await lhv(env, "create", "docs", "--dim", "2")).returncode == EXIT_OK
        ends = await end_offsets(env.bootstrap, env.topics.commands)
        assert sum(ends.values()) == 1  # the create alone
        done = await lhv(env, "load", "flat", str(data), "--create", "--space", "l2")
        assert done.returncode == EXIT_OK, done.stderr


async def test_a_sharded_index_from_the_command_line_create_load_search_stats(
    env: Env, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "v.jsonl", 40, 4)
    async with running(env.config()):
        done = await lhv(env, "create", "docs", "--dim", "4", "--space", "l2", "--shards", "3")
        assert done.returncode == EXIT_OK, done.stderr
        assert "3 shards" in done.stdout
        done = await lhv(env, "load", "docs", str(data), "--no-progress")
        assert done.returncode == EXIT_OK, done.stderr
        assert "loaded 40 of 40 rows into docs" in done.stdout
        done = await lhv(
            env, "search", "docs", "--vector", "[3, 0.5, 0.5, 0.5]", "-k", "3", "--json"
        )
        assert done.returncode == EXIT_OK, done.stderr
        assert [h["id"] for h in json.loads(done.stdout)["hits"]] == ["d2", "d1", "d3"]
        done = await lhv(env, "stats", "docs", "--json")
        stats = json.loads(done.stdout)
        assert stats["count"] == 40 and [s["shard"] for s in stats["shards"]] == [0, 1, 2]
        assert sum(s["count"] for s in stats["shards"]) == 40
        done = await lhv(env, "stats", "docs")
        assert done.returncode == EXIT_OK and "checkpoint_offset" in done.stdout
        # an alias names it; describe says what each name is; unalias removes the alias
        done = await lhv(env, "alias", "docs-live", "docs")
        assert done.returncode == EXIT_OK, done.stderr
        assert "docs-live now names docs" in done.stdout
        done = await lhv(env, "describe", "docs-live", "--json")
        assert json.loads(done.stdout)["target"] == "docs", done.stdout
        done = await lhv(env, "describe", "docs", "--json")
        assert json.loads(done.stdout)["shards"] == 3, done.stdout
        done = await lhv(
            env, "search", "docs-live", "--vector", "[3, 0.5, 0.5, 0.5]", "-k", "1", "--json"
        )
        assert [h["id"] for h in json.loads(done.stdout)["hits"]] == ["d2"], done.stdout
        done = await lhv(env, "unalias", "docs-live")
        assert done.returncode == EXIT_OK and "removed the alias docs-live" in done.stdout
        done = await lhv(env, "describe", "docs-live")
        assert done.returncode != EXIT_OK and "index_not_found" in done.stderr + done.stdout
