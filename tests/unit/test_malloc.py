"""The worker process's C allocator settings (worker/service/malloc.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.service.config import WorkerConfig
from worker.service.malloc import MAX_MMAP_THRESHOLD_BYTES, glibc, tune_malloc
from worker.storage.blobstore import S3Config

ROOT = Path(__file__).resolve().parents[2]

#: frees 200 blocks of 1 MiB, each followed by a small block that stays: what a worker
#: does with record values and decoded batches between its long-lived objects; prints
#: the MiB still resident afterwards
_FREED_BLOCKS = """
import sys
from worker.service.malloc import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc(arena_max=2, mmap_threshold_bytes=128 * 1024)
def rss():
    line = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
    return int(line.split()[1]) * 1024
first = b"x" * (1 << 20)
del first  # glibc's adaptive threshold rises past 1 MiB here
before = rss()
kept, blocks = [], []
for i in range(200):
    blocks.append(b"x" * (1 << 20))
    kept.append(b"y" * 1000 + bytes([i % 256]))
del blocks
print((rss() - before) / 2**20)
"""


def _resident_after_free(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _FREED_BLOCKS, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return float(done.stdout.strip())


@pytest.mark.skipif(not glibc(), reason="the settings are glibc's")
def test_large_blocks_freed_by_a_tuned_worker_leave_its_memory() -> None:
    assert _resident_after_free("tuned") < 20


def test_tune_malloc_refuses_values_glibc_would_not_take() -> None:
    with pytest.raises(ValueError, match="arena_max"):
        tune_malloc(arena_max=-1, mmap_threshold_bytes=0)
    with pytest.raises(ValueError, match="mmap_threshold_bytes"):
        tune_malloc(arena_max=0, mmap_threshold_bytes=MAX_MMAP_THRESHOLD_BYTES + 1)


def test_zero_leaves_the_allocator_alone() -> None:
    assert tune_malloc(arena_max=0, mmap_threshold_bytes=0)


def test_malloc_settings_come_from_lhv_variables() -> None:
    config = WorkerConfig.from_env(
        {"LHV_MALLOC_ARENA_MAX": "4", "LHV_MALLOC_MMAP_THRESHOLD_BYTES": "262144"}
    )
    assert (config.malloc_arena_max, config.malloc_mmap_threshold_bytes) == (4, 262144)
    default = WorkerConfig(s3=S3Config())
    assert (default.malloc_arena_max, default.malloc_mmap_threshold_bytes) == (2, 131072)
    with pytest.raises(ValueError, match="LHV_MALLOC_MMAP_THRESHOLD_BYTES"):
        WorkerConfig.from_env({"LHV_MALLOC_MMAP_THRESHOLD_BYTES": str(64 * 2**20)})
    with pytest.raises(ValueError, match="LHV_MALLOC_ARENA_MAX"):
        WorkerConfig.from_env({"LHV_MALLOC_ARENA_MAX": "-1"})
