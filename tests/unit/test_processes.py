"""`lhv worker --processes N`'s parent (worker.service.processes) over stand-in children:
small Python processes that record their pid and obey or ignore signals as told, so the
parent's forwarding, restarts and giving up are tested without Kafka."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.service.config import ProcessesPolicy
from worker.service.processes import child_envs, describe_exit, parse_processes

ROOT = Path(__file__).resolve().parents[2]

#: a stand-in worker: appends its pid to <dir>/<slot>.pids, then does what T_MODE_<slot>
#: says: `run` (until SIGTERM/SIGINT, then exit 0) or `exitN` (exit N at once)
CHILD = """
import os, signal, sys, time
from pathlib import Path
slot = os.environ["LHV_WORKER_ID"].rsplit("-", 1)[1]
with open(Path(os.environ["T_DIR"]) / f"{slot}.pids", "a") as f:
    f.write(f"{os.getpid()}\\n")
mode = os.environ.get(f"T_MODE_{slot}", "run")
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
while True:
    time.sleep(0.2)
"""

#: the parent: a WorkerProcesses over CHILD, configured by argv[1] (JSON)
PARENT = """
import json, logging, sys
from worker.service.config import ProcessesPolicy
from worker.service.processes import WorkerProcesses
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
cfg = json.loads(sys.argv[1])
sys.exit(WorkerProcesses(cfg["command"], cfg["envs"], ProcessesPolicy(**cfg["policy"])).run())
"""

FAST = {"restart_backoff_ms": 50, "restart_backoff_max_ms": 200, "restart_stable_ms": 60_000}


class Parent:
    def __init__(self, tmp: Path, n: int, modes: dict[int, str], **policy: int) -> None:
        self.dir = tmp
        base = {**os.environ, "T_DIR": str(tmp), "LHV_WORKER_ID": "w"}
        base.update({f"T_MODE_{slot}": mode for slot, mode in modes.items()})
        cfg = {
            "command": [sys.executable, "-c", CHILD],
            "envs": child_envs(base, n),
            "policy": {**FAST, **policy},
        }
        self.log = open(tmp / "parent.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PARENT, json.dumps(cfg)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def pids(self, slot: int) -> list[int]:
        path = self.dir / f"{slot}.pids"
        if not path.exists():
            return []
        return [int(x) for x in path.read_text().split()]

    def wait_for(self, slot: int, count: int, timeout_s: float = 30.0) -> list[int]:
        """The pids of `slot` once it has been started `count` times."""
        deadline = time.monotonic() + timeout_s
        while len(pids := self.pids(slot)) < count:
            assert self.proc.poll() is None, f"parent ended early:\n{self.text()}"
            assert time.monotonic() < deadline, f"slot {slot} not started {count}x:\n{self.text()}"
            time.sleep(0.05)
        return pids

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout_s)

    def text(self) -> str:
        self.log.flush()
        return (self.dir / "parent.log").read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def parents(tmp_path: Path) -> Iterator[list[Parent]]:
    made: list[Parent] = []
    yield made
    for p in made:
        p.close()
        for slot in range(4):
            for pid in p.pids(slot):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_worker_id_group_instance_id_and_metrics_port_differ_per_process() -> None:
    env = {"LHV_WORKER_ID": "w", "LHV_GROUP_INSTANCE_ID": "pod-a", "LHV_METRICS_PORT": "9100"}
    envs = child_envs(env, 3)
    assert [e["LHV_WORKER_ID"] for e in envs] == ["w-0", "w-1", "w-2"]
    assert [e["LHV_GROUP_INSTANCE_ID"] for e in envs] == ["pod-a-0", "pod-a-1", "pod-a-2"]
    assert [e["LHV_METRICS_PORT"] for e in envs] == ["9100", "9101", "9102"]
    assert all(e["LHV_PROCESSES"] == "1" for e in envs)


def test_without_ids_each_process_gets_its_own_worker_id_and_no_static_membership() -> None:
    envs = child_envs({"LHV_METRICS_PORT": "0"}, 2)
    ids = [e["LHV_WORKER_ID"] for e in envs]
    assert ids[0] != ids[1] and ids[0].endswith("-0") and ids[1].endswith("-1")
    assert all("LHV_GROUP_INSTANCE_ID" not in e for e in envs)
    assert [e["LHV_METRICS_PORT"] for e in envs] == ["0", "0"]


def test_processes_is_a_count_or_auto() -> None:
    assert parse_processes("3") == 3
    assert parse_processes("auto") >= 1
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError):
            parse_processes(bad)


def test_exits_are_described_with_their_code_or_signal() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_restart_settings_come_from_the_environment() -> None:
    policy = ProcessesPolicy.from_env(
        {"LHV_RESTART_BACKOFF_MS": "5", "LHV_MAX_QUICK_RESTARTS": "2"}
    )
    assert policy.restart_backoff_ms == 5 and policy.max_quick_restarts == 2
    with pytest.raises(ValueError):
        ProcessesPolicy(max_quick_restarts=-1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_parent_stops_every_process_and_exits_0(
    tmp_path: Path, parents: list[Parent], sig: signal.Signals
) -> None:
    parent = Parent(tmp_path, 2, {})
    parents.append(parent)
    pids = parent.wait_for(0, 1) + parent.wait_for(1, 1)
    parent.proc.send_signal(sig)
    assert parent.wait() == 0, parent.text()
    assert _gone(pids), f"left running: {pids}"
    assert "stopping 2 worker processes" in parent.text()


def test_a_process_killed_with_sigkill_is_restarted_and_logged_with_pid_and_signal(
    tmp_path: Path, parents: list[Parent]
) -> None:
    parent = Parent(tmp_path, 2, {})
    parents.append(parent)
    [first] = parent.wait_for(0, 1)
    [other] = parent.wait_for(1, 1)
    os.kill(first, signal.SIGKILL)
    second = parent.wait_for(0, 2)[1]
    assert second != first and _alive(second) and _alive(other)
    assert f"(pid {first}) ended (killed by SIGKILL)" in parent.text()
    assert parent.pids(1) == [other], "the other process is left alone"
    parent.proc.send_signal(signal.SIGTERM)
    assert parent.wait() == 0, parent.text()
    assert _gone([second, other])


def test_a_process_that_keeps_ending_quickly_ends_the_parent_with_its_code(
    tmp_path: Path, parents: list[Parent]
) -> None:
    parent = Parent(tmp_path, 2, {1: "exit3"}, max_quick_restarts=2)
    parents.append(parent)
    assert parent.wait() == 3, parent.text()
    assert len(parent.pids(1)) == 3, "started once, restarted twice, then given up"
    assert "giving up" in parent.text()
    assert "worker process 0 (pid" in parent.text(), "the healthy process is stopped too"
    assert _gone(parent.pids(0))


def test_a_process_ending_with_a_settings_code_ends_the_parent_without_restarts(
    tmp_path: Path, parents: list[Parent]
) -> None:
    parent = Parent(tmp_path, 2, {1: "exit2"})
    parents.append(parent)
    assert parent.wait() == 2, parent.text()
    assert len(parent.pids(1)) == 1
    assert "worker process 0 (pid" in parent.text(), "the other process is stopped"
    assert _gone(parent.pids(0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_parent_killed_with_sigkill_leaves_no_process_behind(
    tmp_path: Path, parents: list[Parent]
) -> None:
    parent = Parent(tmp_path, 2, {})
    parents.append(parent)
    pids = parent.wait_for(0, 1) + parent.wait_for(1, 1)
    parent.proc.kill()
    parent.proc.wait(10)
    assert _gone(pids), f"left running after the parent died: {pids}"


@pytest.mark.parametrize("value", ["0", "many"])
def test_lhv_worker_refuses_a_bad_process_count_as_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import cli

    assert cli.main(["worker", "--processes", value]) == cli.EXIT_USAGE
    assert "--processes" in capsys.readouterr().err
