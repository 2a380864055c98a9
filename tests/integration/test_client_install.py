"""The client on its own: `pip install lhv` in a fresh virtual environment brings no engine,
no S3 client and nothing to compile, and its `lhv search` answers from a running worker."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workerkit import ROOT, Env, make_env, running

from worker.client import LhvClient
from worker.storage.blobstore import S3Config


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd="/")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("client")
    # a copy of the sources: a build in the checkout would leave build/ behind
    source = base / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".stack", "build", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    venv = base / "venv"
    done = _run(sys.executable, "-m", "venv", str(venv))
    assert done.returncode == 0, done.stderr
    done = _run(
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--only-binary=:all:",  # nothing compiles: every dependency is a wheel
        "--no-binary=lhv",
        str(source),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_the_client_install_has_none_of_the_services_dependencies(client_venv: Path) -> None:
    done = _run(str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json")
    installed = {p["name"].lower() for p in json.loads(done.stdout)}
    assert "lhv" in installed
    assert not installed & {"hnswlib", "annoy", "aioboto3", "prometheus-client", "cramjam"}


async def test_a_search_through_the_client_install_is_answered_by_a_worker(
    client_venv: Path, bootstrap_servers: str, s3_config: S3Config
) -> None:
    env: Env = await make_env(bootstrap_servers, s3_config, partitions=1)
    async with running(env.config()), LhvClient(env.bootstrap, topics=env.topics) as c:
        await c.create("docs", dim=3, space="l2")
        await c.add("docs", ["a", "b"], [[1, 0, 0], [0, 1, 0]], ack=True)
        done = await asyncio.to_thread(
            _run,
            str(client_venv / "bin" / "lhv"),
            "search",
            "docs",
            "--vector",
            "[0.9, 0.1, 0]",
            "-k",
            "1",
            "--json",
            env=env.child_env(),
        )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert [h["id"] for h in reply["hits"]] == ["a"]
