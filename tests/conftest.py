"""Test-wide setup: markers by directory, the real-stack fixtures, and a check that no
process started by a stack outlives the session.

Tests under tests/integration/ are marked `integration`, under tests/faults/ `integration`
and `fault`; they get Kafka and S3 from the fixtures in stackfixtures.py, which start the
stack lazily, so `pytest tests/unit tests/property` never starts one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from stackfixtures import (  # noqa: F401  (fixtures are found by name)
    USED,
    StackHandle,
    blobstore,
    bootstrap_servers,
    describe_stack,
    make_local_stack,
    new_topic,
    s3_config,
    stack,
)

from worker.dev.stack import live_processes

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


def pytest_report_header(config: pytest.Config) -> str:
    return describe_stack()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if USED:
        terminalreporter.write_sep("-", "lhv stack")
        for line in USED:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            part = Path(str(item.path)).resolve().relative_to(_HERE).parts[0]
        except (ValueError, IndexError):
            continue
        if part in ("integration", "faults"):
            item.add_marker(pytest.mark.integration)
        if part == "faults":
            item.add_marker(pytest.mark.fault)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs `lhv` in-process points the root logger at the stream pytest
    captures for it: put the handlers back, so later lines (an annoy build thread's) do
    not go to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process a stack started is still running (and stop it)."""
    stray = live_processes()
    if not stray:
        return
    for pid, _ in stray:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    names = ", ".join(f"{what} pid {pid}" for pid, what in stray)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"stack processes left running after the tests (now killed): {names}"
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        log.error(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
