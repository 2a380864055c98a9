"""The `lhv` command line without a stack: argument errors, file errors, help texts.

Each mistake a user makes ends with one line on stderr naming what is wrong, no
traceback, and the exit code of its kind (worker.cli's table)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worker.cli import (
    EXIT_BROKEN_PIPE,
    EXIT_INPUT,
    EXIT_USAGE,
    build_parser,
    main,
    seconds,
    user_error,
)
from worker.client.files import LoadError, open_vectors
from worker.kafka.logs import NormalSituations, Repeats


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_vector_that_is_not_json_names_the_argument(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "search", "docs", "--vector", "[1, 2,")
    line = _one_line(err)
    assert code == EXIT_USAGE
    assert "--vector" in line and "not JSON" in line and "lhv search --help" in line


def test_filter_that_is_not_a_json_object_names_the_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(capsys, "search", "docs", "--vector", "[1, 2]", "--filter", "lang=en")
    assert code == EXIT_USAGE and "--filter" in _one_line(err)
    code, _, err = _run(capsys, "search", "docs", "--vector", "[1, 2]", "--filter", "[1]")
    assert code == EXIT_USAGE and "--filter: not a JSON object" in _one_line(err)


def test_add_metadata_that_is_not_json_names_the_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(capsys, "add", "docs", "a", "--vector", "[1]", "--metadata", "{x}")
    assert code == EXIT_USAGE and "--metadata" in _one_line(err)


def test_jsonl_errors_name_the_line_as_an_editor_counts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "v.jsonl"
    f.write_text('{"id": "a", "vector": [1, 2]}\n\n{"id": "b", "vector": [1]}\n')
    code, _, err = _run(capsys, "load", "docs", str(f))
    assert code == EXIT_INPUT
    assert f"{f} line 3 (id 'b'): vector is not 2 numbers" in _one_line(err)
    f.write_text('{"id": "a", "vector": [1, 2]}\nnot json\n')
    code, _, err = _run(capsys, "load", "docs", str(f))
    assert code == EXIT_INPUT and f"{f} line 2: not JSON" in _one_line(err)


def test_values_beyond_float32_are_refused_by_row_without_numpy_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "big.npy"
    np.save(f, np.array([[1.0, 2.0], [1e300, 1.0]]))
    with np.errstate(all="raise"):  # a numpy warning would now be an exception
        code, _, err = _run(capsys, "load", "docs", str(f))
    assert code == EXIT_INPUT and "row 1: not a finite float32 vector" in _one_line(err)
    j = tmp_path / "big.jsonl"
    j.write_text('{"id": "a", "vector": [1, 2]}\n{"id": "b", "vector": [1e39, 2]}\n')
    with np.errstate(all="raise"):
        code, _, err = _run(capsys, "load", "docs", str(j))
    assert code == EXIT_INPUT and "line 2: not a finite float32 vector" in _one_line(err)


def test_malformed_npy_and_missing_files_share_one_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    code, _, err = _run(capsys, "load", "docs", str(bad))
    assert code == EXIT_INPUT and "not a readable .npy array" in _one_line(err)
    code, _, err = _run(capsys, "load", "docs", str(tmp_path / "absent.npy"))
    assert code == EXIT_INPUT and "no such file" in _one_line(err)
    code, _, err = _run(capsys, "search", "docs", "--file", str(bad))
    assert code == EXIT_INPUT and "not a readable .npy array" in _one_line(err)
    ok = tmp_path / "ok.npy"
    np.save(ok, np.ones((2, 3), dtype=np.float32))
    code, _, err = _run(capsys, "load", "docs", str(ok), "--dim", "4")
    assert code == EXIT_INPUT and "3-dim vectors, not --dim 4" in _one_line(err)


def test_jsonl_batches_report_lines_and_rows_count_from_the_first_vector(tmp_path: Path) -> None:
    f = tmp_path / "v.jsonl"
    rows = [json.dumps({"id": str(i), "vector": [i, 1]}) for i in range(5)]
    f.write_text(rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n")
    batches = list(open_vectors(f).batches(2))
    assert [b.start for b in batches] == [0, 2, 4]
    assert [b.where for b in batches] == ["lines 1..3", "lines 4..5", "lines 6..6"]


def test_a_corrupt_ids_file_is_a_load_error(tmp_path: Path) -> None:
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((2, 3), dtype=np.float32))
    ids = tmp_path / "ids.npy"
    ids.write_bytes(b"nope")
    with pytest.raises(LoadError, match="not a readable ids file"):
        open_vectors(vectors, ids_file=ids)


def test_help_shows_defaults_and_every_wire_command_has_a_verb(
    capsys: pytest.CaptureFixture[str],
) -> None:
    verbs = {"create", "drop", "add", "load", "delete", "get", "merge", "import", "search"}
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and all(f"    {v} " in out for v in verbs | {"stats"})
    code, out, _ = _run(capsys, "load", "--help")
    assert "(default: 1000)" in out and "(default: 30.0)" in out
    code, out, _ = _run(capsys, "worker", "--help")
    for flag in ("--session-timeout-ms", "--worker-id", "--group-instance-id", "--max-batch-bytes"):
        assert flag in out
    assert "(default: 50000)" in out  # checkpoint records


def test_lhv_alone_lists_the_commands_and_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(capsys)
    assert code == EXIT_USAGE and out == ""
    assert err.startswith("usage: lhv") and "    worker " in err and "exit codes:" in err


def test_bench_help_describes_lhv_bench(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "bench", "--help")
    assert code == 0
    assert out.startswith("usage: lhv bench") and "bench_e2e.py" not in out


def test_worker_flags_win_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli import _worker_config

    monkeypatch.setenv("LHV_GROUP_ID", "from-env")
    monkeypatch.setenv("LHV_SESSION_TIMEOUT_MS", "7000")
    args = build_parser().parse_args(["worker", "--session-timeout-ms", "9000"])
    config = _worker_config(args)
    assert config.group_id == "from-env" and config.session_timeout_ms == 9000


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_line_aiokafka_repeats_at_every_retry_is_logged_once_per_window_with_a_count() -> None:
    """While a broker is down aiokafka logs a fetch failure some 20 times a second: one
    per window keeps its level and says how many were held back (DEBUG) since."""
    now = [0.0]
    msg = "Failed fetch messages from %s: %s"
    repeats = Repeats(msg, window_s=10.0, clock=lambda: now[0])
    seen = []
    for t in (0.0, 0.1, 0.2, 5.0, 10.5, 11.0):
        now[0] = t
        record = _record("aiokafka.consumer.fetcher", msg, 1, "NodeNotReadyError")
        repeats.filter(record)
        seen.append(record)
    assert [r.levelno for r in seen] == [
        logging.ERROR,
        *[logging.DEBUG] * 3,
        logging.ERROR,
        logging.DEBUG,
    ]
    assert "3 more like it held back" in seen[4].getMessage()
    assert "NodeNotReadyError" in seen[4].getMessage()
    other = _record("aiokafka.consumer.fetcher", "Unexpected error in fetcher routine")
    assert repeats.filter(other) and other.levelno == logging.ERROR


def test_reply_topic_gone_and_coordinator_starting_are_not_errors() -> None:
    from aiokafka.errors import GroupCoordinatorNotAvailableError, UnknownMemberIdError

    quiet = NormalSituations("lhv.replies.*")
    gone = _record("aiokafka.cluster", "Topic %s not found in cluster metadata", "lhv.replies.x1")
    quiet.filter(gone)
    assert gone.levelno == logging.DEBUG
    starting = _record(
        "aiokafka.consumer.group_coordinator",
        "Group Coordinator Request failed: %s",
        GroupCoordinatorNotAvailableError(),
    )
    quiet.filter(starting)
    assert starting.levelno == logging.DEBUG
    # the same lines about anything else keep their level
    other = _record("aiokafka.cluster", "Topic %s not found in cluster metadata", "lhv.commands")
    fatal = _record(
        "aiokafka.consumer.group_coordinator",
        "Group Coordinator Request failed: %s",
        UnknownMemberIdError(),
    )
    assert quiet.filter(other) and quiet.filter(fatal)
    assert other.levelno == fatal.levelno == logging.ERROR


def test_a_zero_row_is_found_by_the_check_and_named_by_its_line_or_row_and_id(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v.jsonl"  # a blank line between the rows: lines as an editor counts
    rows = [{"id": "a", "vector": [1, 0]}, {"id": "z", "vector": [0, 0]}]
    path.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n")
    vectors = open_vectors(path)
    vectors.check()
    assert vectors.zero_row == "line 3 (id 'z')"
    path.write_text(json.dumps(rows[0]) + "\n")
    vectors = open_vectors(path)
    vectors.check()
    assert vectors.zero_row is None
    npy = tmp_path / "v.npy"  # a file of rows: the row, from 0, and its id (the row number)
    np.save(npy, np.array([[1.0, 0.0], [0.0, 0.0]], dtype="f4"))
    vectors = open_vectors(npy)
    vectors.check()
    assert vectors.zero_row == "row 1 (id '1')"


def test_unalias_of_a_name_that_is_no_alias_does_not_suggest_creating_an_index() -> None:
    from lhv_index.errors import IndexNotFound

    error = user_error(
        IndexNotFound("unalias: 'x' is not an alias"), argparse.Namespace(command="unalias")
    )
    assert error is not None and "lhv create" not in str(error)
    error = user_error(IndexNotFound("index 'x' does not exist"), argparse.Namespace(command="get"))
    assert error is not None and "lhv create" in str(error)


def test_a_missing_topic_the_command_reports_itself_is_not_logged_at_each_retry() -> None:
    quiet = NormalSituations("lhv.replies.*", reported=["lhv.search"])
    retry = _record("aiokafka.cluster", "Topic %s not found in cluster metadata", "lhv.search")
    quiet.filter(retry)
    assert retry.levelno == logging.DEBUG
    other = _record("aiokafka.cluster", "Topic %s not found in cluster metadata", "lhv.commands")
    assert quiet.filter(other) and other.levelno == logging.ERROR


def test_a_timeout_is_a_positive_number_of_seconds() -> None:
    assert seconds("2.5") == 2.5
    for text in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(text)


def test_a_connection_error_left_in_an_unread_future_is_not_a_second_error() -> None:
    import ssl

    quiet = NormalSituations("lhv.replies.*")

    def unread(exc: BaseException) -> logging.LogRecord:
        record = _record("asyncio", "Future exception was never retrieved\nfuture: <Future>")
        record.exc_info = (type(exc), exc, None)
        return record

    refused = unread(ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert"))
    quiet.filter(refused)
    assert refused.levelno == logging.DEBUG
    # any other unread exception is still an ERROR
    bug = unread(ValueError("a bug"))
    assert quiet.filter(bug) and bug.levelno == logging.ERROR


@pytest.mark.parametrize(
    ("argv", "service_info"),
    [
        (["replay", "--verify"], False),
        (["snapshot", "ls"], False),
        (["--log-level", "DEBUG", "replay", "--verify"], True),
        (["worker"], True),
    ],
)
def test_replay_and_snapshot_keep_the_rebuilds_info_lines_to_themselves(
    argv: list[str], service_info: bool
) -> None:
    from worker.cli import _setup_logging

    names = ("worker.service", "worker.storage", "worker.storage.blobstore", "lhv_index")
    levels = {name: logging.getLogger(name).level for name in names}
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    try:
        _setup_logging(build_parser().parse_args(argv))
        assert logging.getLogger("worker.service.apply").isEnabledFor(logging.INFO) is service_info
        assert logging.getLogger("worker.service.apply").isEnabledFor(logging.WARNING)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        root.handlers[:] = handlers
        root.setLevel(root_level)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`lhv ... | head` whose reader stops early: no traceback, SIGPIPE's exit code; a
    mistake is still one line on stderr with its own exit code."""
    env_file = tmp_path / "env"  # a stack that does not answer: `status` prints its rows
    env_file.write_text(
        "export LHV_BOOTSTRAP_SERVERS=127.0.0.1:1\nexport LHV_S3_ENDPOINT_URL=http://127.0.0.1:1\n"
    )

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader went away before anything was written
        try:
            return subprocess.run(
                [sys.executable, "-m", "worker.cli", *argv],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(write_end)

    done = run("stack", "status", "--env-file", str(env_file))
    assert (done.returncode, done.stderr) == (EXIT_BROKEN_PIPE, "")
    done = run("search", "docs", "--vector", "[1,")
    assert done.returncode == EXIT_USAGE and "--vector" in _one_line(done.stderr)
