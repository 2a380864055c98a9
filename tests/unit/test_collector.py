"""The worker process's garbage collector settings (worker/service/collector.py), checked
in a process of their own: freezing and thresholds are process-wide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SETTLE = """
import gc, weakref
from worker.service import Worker  # what a worker has imported before it starts
from worker.service.collector import settle_collector

class Node:
    pass

kept = Node()
kept.self = kept  # a cycle alive at the start: frozen, never traversed again
thresholds = gc.get_threshold()
frozen = settle_collector()
assert frozen > 10_000, frozen
assert gc.get_freeze_count() == frozen
assert not any(o is kept for o in gc.get_objects())  # out of every generation

# a cycle made after the start is still collected, as often as before
assert gc.get_threshold() == thresholds
late = Node()
late.self = late
gone = weakref.ref(late)
del late
gc.collect()
assert gone() is None
print("ok")
"""


def test_settling_freezes_what_lives_at_start_and_still_collects_later_cycles() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SETTLE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
