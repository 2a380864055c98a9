"""`lhv worker --processes N`: N worker processes under one parent.

Each child is an ordinary `lhv worker` (one event loop, one consumer-group member) with the
parent's settings; a configured worker id, group instance id or metrics port is made
distinct per child (`child_envs`). The parent only supervises:

- SIGTERM or SIGINT to the parent is forwarded to every child (each in its own process
  group, so a Ctrl-C in a terminal reaches it once, through the parent); the parent waits
  for each to stop cleanly and exits 0 when all did.
- A child that ends on its own is restarted after a backoff (`ProcessesPolicy`), logged
  with its pid and exit code. A child that keeps ending quickly ends the parent: the others
  are stopped and the parent exits non-zero. A child that exits with a settings code (2 or
  4: a setting or credential to fix) ends the parent at once with that code, since a restart
  would fail the same way.
- On Linux a child gets SIGTERM if the parent dies (PR_SET_PDEATHSIG), so a parent killed
  with SIGKILL leaves no worker behind.

The parent waits in `select` on a pipe that Python's signal machinery writes to
(`signal.set_wakeup_fd`), so SIGCHLD, SIGTERM and SIGINT wake it at once and no work is
done inside a signal handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from worker.service.config import ProcessesPolicy

__all__ = [
    "SETTINGS_EXIT_CODES",
    "WorkerProcesses",
    "child_envs",
    "cpu_count",
    "describe_exit",
    "parse_processes",
]

log = logging.getLogger(__name__)

#: exit codes of `lhv worker` that a restart cannot cure (the `lhv` exit code table: 2 a
#: setting, 4 credentials or security settings refused)
SETTINGS_EXIT_CODES = frozenset({2, 4})
#: how a child may end after the parent forwarded a stop: cleanly (0), or by the signal
#: itself or as interrupted (130) when it came before the child's handlers were installed
_STOPPED_CODES = frozenset({0, 130, -signal.SIGTERM, -signal.SIGINT})
#: the longest the parent sleeps without a signal (a lost SIGCHLD costs at most this)
_POLL_S = 1.0
#: how long the parent waits for children it stops because of its own failure
_CLEANUP_WAIT_S = 30.0
_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, else all of the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_processes(value: str) -> int:
    """`auto` (one per core, `cpu_count()`) or a whole number >= 1.

    Raises:
        ValueError: anything else.
    """
    text = value.strip().lower()
    if text == "auto":
        return cpu_count()
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"processes must be a whole number or 'auto', not {value!r}") from None
    if n < 1:
        raise ValueError(f"processes must be at least 1, not {n}")
    return n


def child_envs(env: Mapping[str, str], n: int) -> list[dict[str, str]]:
    """The environment of each of `n` children: `env` (the parent's settings, flags
    already folded into their `LHV_*` variables) with what must differ per process.

    - `LHV_WORKER_ID`: `<id>-<i>`; without one, a name made once for the parent (host
      name and a random suffix), so the parent's log names each child's id.
    - `LHV_GROUP_INSTANCE_ID` (static membership), when set: `<id>-<i>`, so the members
      stay distinct; a restarted child keeps its own and takes its partitions back.
    - `LHV_METRICS_PORT`, when set and not 0: port + i (0 stays 0: any free port).
    - `LHV_PROCESSES=1`: a child is one worker.
    """
    base_id = env.get("LHV_WORKER_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    instance = env.get("LHV_GROUP_INSTANCE_ID")
    port = env.get("LHV_METRICS_PORT")
    out = []
    for i in range(n):
        child = dict(env)
        child["LHV_WORKER_ID"] = f"{base_id}-{i}"
        if instance:
            child["LHV_GROUP_INSTANCE_ID"] = f"{instance}-{i}"
        if port and int(port) != 0:
            child["LHV_METRICS_PORT"] = str(int(port) + i)
        child["LHV_PROCESSES"] = "1"
        out.append(child)
    return out


def describe_exit(code: int) -> str:
    """`exit code 3`, or `killed by SIGKILL` for a negative `Popen.returncode`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that asks Linux to send the child SIGTERM when the parent dies;
    None where there is no `prctl`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass
class _Child:
    """One slot of the parent: the process running in it now (if any) and its history."""

    slot: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


class WorkerProcesses:
    """Runs `command` once per environment in `envs`, restarts what ends on its own, and
    forwards SIGTERM/SIGINT. `run()` from the main thread (it owns the signal handlers
    while it runs)."""

    def __init__(
        self,
        command: Sequence[str],
        envs: Sequence[Mapping[str, str]],
        policy: ProcessesPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not envs:
            raise ValueError("WorkerProcesses needs at least one process")
        self._command = list(command)
        self._children = [_Child(i, dict(env)) for i, env in enumerate(envs)]
        self._policy = policy
        self._clock = clock
        self._preexec = _die_with_parent()
        self._stop_signal: signal.Signals | None = None
        #: set when the parent gives up (a child that keeps failing, a settings code)
        self._failure_code: int | None = None
        self._unclean: list[str] = []

    @property
    def pids(self) -> list[int]:
        """The pids of the children running now, by slot."""
        return [c.pid for c in self._children if c.proc is not None and c.proc.poll() is None]

    def run(self) -> int:
        """Start every child and supervise them until they have all stopped.

        Returns:
            0 when a SIGTERM/SIGINT stopped every child cleanly; 1 when a child did not
            stop cleanly or one kept ending quickly; 2 or 4 when a child ended with that
            settings code.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, _wake_only) for sig in handled}
        previous_fd = signal.set_wakeup_fd(write_fd)
        try:
            return self._supervise(read_fd)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(read_fd)
            os.close(write_fd)
            self._stop_leftovers()

    # -- the loop ----------------------------------------------------------------------

    def _supervise(self, wake_fd: int) -> int:
        n = len(self._children)
        log.info("starting %d worker processes: %s", n, " ".join(self._command))
        for child in self._children:
            self._spawn(child)
        while True:
            for sig in self._wait(wake_fd, self._timeout()):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self._stop(signal.Signals(sig), reason=f"{signal.Signals(sig).name} received")
            self._reap()
            if self._stop_signal is not None:
                if all(c.proc is None for c in self._children):  # each one's exit seen
                    return self._exit_code()
                continue
            now = self._clock()
            for child in self._children:
                if child.restart_at is not None and child.restart_at <= now:
                    self._spawn(child)

    def _timeout(self) -> float:
        if self._stop_signal is not None:
            return _POLL_S
        due = [c.restart_at for c in self._children if c.restart_at is not None]
        if not due:
            return _POLL_S
        return max(0.0, min(_POLL_S, min(due) - self._clock()))

    @staticmethod
    def _wait(wake_fd: int, timeout: float) -> list[int]:
        """Signal numbers that arrived within `timeout` (none when it passed quietly)."""
        ready, _, _ = select.select([wake_fd], [], [], timeout)
        if not ready:
            return []
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(wake_fd, 512):
                got += chunk
        return list(got)

    def _spawn(self, child: _Child) -> None:
        child.restart_at = None
        child.proc = subprocess.Popen(
            self._command,
            env=child.env,
            process_group=0,
            preexec_fn=self._preexec,  # the parent runs no other thread
        )
        child.started = self._clock()
        instance = child.env.get("LHV_GROUP_INSTANCE_ID")
        log.info(
            "worker process %d of %d started: pid %d, worker id %s%s",
            child.slot,
            len(self._children),
            child.proc.pid,
            child.env.get("LHV_WORKER_ID"),
            f", group instance id {instance}" if instance else "",
        )

    def _reap(self) -> None:
        for child in self._children:
            if child.proc is None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            pid, ran_s = child.proc.pid, self._clock() - child.started
            child.proc = None
            if self._stop_signal is not None:
                self._stopped(child, pid, code)
            else:
                self._ended(child, pid, code, ran_s)

    def _stopped(self, child: _Child, pid: int, code: int) -> None:
        if code in _STOPPED_CODES:
            log.info("worker process %d (pid %d) stopped: %s", child.slot, pid, describe_exit(code))
        else:
            self._unclean.append(f"worker process {child.slot} (pid {pid}) {describe_exit(code)}")
            log.error(
                "worker process %d (pid %d) did not stop cleanly: %s",
                child.slot,
                pid,
                describe_exit(code),
            )

    def _ended(self, child: _Child, pid: int, code: int, ran_s: float) -> None:
        """A child ended while nobody asked it to: restart it, or give up."""
        what = describe_exit(code)
        if code in SETTINGS_EXIT_CODES:
            log.error(
                "worker process %d (pid %d) ended (%s) after %.1f s: a setting or "
                "credential to fix (its log says which); stopping the others",
                child.slot,
                pid,
                what,
                ran_s,
            )
            self._give_up(code)
            return
        policy = self._policy
        if ran_s * 1000 >= policy.restart_stable_ms:
            child.quick_exits = 0
        child.quick_exits += 1
        if child.quick_exits > policy.max_quick_restarts:
            log.error(
                "worker process %d (pid %d) ended (%s) after %.1f s, quick exit %d "
                "in a row: giving up, stopping the others",
                child.slot,
                pid,
                what,
                ran_s,
                child.quick_exits,
            )
            self._give_up(code if 0 < code < 128 else 1)
            return
        delay_ms = min(
            policy.restart_backoff_ms * 2 ** (child.quick_exits - 1),
            policy.restart_backoff_max_ms,
        )
        child.restart_at = self._clock() + delay_ms / 1000
        log.warning(
            "worker process %d (pid %d) ended (%s) after %.1f s: restarting it in "
            "%.1f s (restart %d of at most %d in a row)",
            child.slot,
            pid,
            what,
            ran_s,
            delay_ms / 1000,
            child.quick_exits,
            policy.max_quick_restarts,
        )

    def _give_up(self, code: int) -> None:
        self._failure_code = code
        self._stop(signal.SIGTERM, reason="giving up")

    def _stop(self, sig: signal.Signals, *, reason: str) -> None:
        if self._stop_signal is not None:
            log.info("%s: already stopping; waiting for pids %s", reason, self.pids)
            return
        self._stop_signal = sig
        for child in self._children:
            child.restart_at = None
        live = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        log.info(
            "%s: stopping %d worker processes (%s to pids %s)",
            reason,
            len(live),
            sig.name,
            [c.pid for c in live],
        )
        for child in live:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    def _exit_code(self) -> int:
        if self._failure_code is not None:
            return self._failure_code
        if self._unclean:
            log.error("not every worker process stopped cleanly: %s", "; ".join(self._unclean))
            return 1
        log.info("all %d worker processes stopped", len(self._children))
        return 0

    def _stop_leftovers(self) -> None:
        """After a fault of the parent itself: stop what still runs, never leave it."""
        live = [c.proc for c in self._children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _CLEANUP_WAIT_S
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process pid %d did not stop: killing it", proc.pid)
                proc.kill()
                proc.wait()


def _wake_only(signum: int, frame: object) -> None:
    """The handler of the signals the parent waits for: `set_wakeup_fd` carries them."""
