"""LHV against a broker that requires authentication: one private SASL stack for the
module (`LocalStack(sasl=True)`: SASL_PLAINTEXT with PLAIN and SCRAM-SHA-256, SASL_SSL with
a private CA and required client certificates).

Each security mode carries a command through a worker and a search back; every mistake
ends `lhv` in one line with its documented exit code; no password reaches a log line,
even at DEBUG with aiokafka's wire logging on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from stackfixtures import _skip_or_fail, stack_prerequisites_missing
from workerkit import running

from worker.client import LhvClient
from worker.dev.stack import LocalStack, create_topics
from worker.kafka.config import KafkaConfig
from worker.service.config import WorkerConfig
from worker.storage.blobstore import S3Config
from worker.wire.topics import TopicsConfig

ROOT = Path(__file__).resolve().parent.parent.parent
WRONG = "not-the-password"


@pytest.fixture(scope="module")
def sasl_stack() -> Iterator[LocalStack]:
    why = stack_prerequisites_missing()
    if why:
        _skip_or_fail(why)
    stack = LocalStack(sasl=True, partitions=2)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _modes(stack: LocalStack) -> dict[str, dict[str, str]]:
    """Client settings per mode, as `LHV_*` variables."""
    env = stack.env()
    user = {"LHV_SASL_USERNAME": env["LHV_SASL_USERNAME"],
            "LHV_SASL_PASSWORD": env["LHV_SASL_PASSWORD"]}  # fmt: skip
    plaintext = {"LHV_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
                 "LHV_SECURITY_PROTOCOL": "SASL_PLAINTEXT", **user}  # fmt: skip
    return {
        # no LHV_SASL_MECHANISM: a username alone means PLAIN
        "plain": plaintext,
        "scram": {**plaintext, "LHV_SASL_MECHANISM": "SCRAM-SHA-256"},
        "sasl_ssl": {
            "LHV_BOOTSTRAP_SERVERS": env["LHV_STACK_SASL_SSL_SERVERS"],
            "LHV_SECURITY_PROTOCOL": "SASL_SSL",
            "LHV_SASL_MECHANISM": "SCRAM-SHA-256",
            **user,
            "LHV_SSL_CAFILE": env["LHV_STACK_SSL_CAFILE"],
            "LHV_SSL_CERTFILE": env["LHV_STACK_SSL_CERTFILE"],
            "LHV_SSL_KEYFILE": env["LHV_STACK_SSL_KEYFILE"],
            "LHV_SSL_PASSWORD": env["LHV_STACK_SSL_PASSWORD"],
        },
    }


def _secrets(stack: LocalStack) -> list[str]:
    env = stack.env()
    return [env["LHV_SASL_PASSWORD"], env["LHV_STACK_SSL_PASSWORD"], WRONG]


def _child_env(stack: LocalStack, settings: dict[str, str], **extra: str) -> dict[str, str]:
    """A clean environment for `lhv`: the stack's S3, `settings` for Kafka."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LHV_", "AWS_"))}
    s3 = {k: v for k, v in stack.env().items() if k.startswith(("AWS_", "LHV_S3_"))}
    return {**base, **s3, **settings, "PYTHONUNBUFFERED": "1", **extra}


def _lhv(
    env: dict[str, str], *args: str, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _topics(stack: LocalStack, settings: dict[str, str]) -> TopicsConfig:
    tag = uuid.uuid4().hex[:8]
    topics = TopicsConfig(commands=f"s{tag}.commands", search=f"s{tag}.search", dlq=f"s{tag}.dlq")
    security = KafkaConfig.from_env(settings).client_kwargs()
    for name in ("bootstrap_servers", "client_id", "request_timeout_ms"):
        security.pop(name)
    create_topics(
        settings["LHV_BOOTSTRAP_SERVERS"],
        {topics.commands: 2, topics.search: 2, topics.dlq: 1},
        security=security,
    )
    return topics


@pytest.mark.parametrize("mode", ["plain", "scram", "sasl_ssl"])
async def test_each_security_mode_carries_a_command_through_a_worker_and_a_search_back(
    sasl_stack: LocalStack, mode: str
) -> None:
    settings = _modes(sasl_stack)[mode]
    kafka = KafkaConfig.from_env(settings)
    topics = _topics(sasl_stack, settings)
    s3 = replace(S3Config.from_env(sasl_stack.env()), prefix=f"sec-{uuid.uuid4().hex[:8]}/")
    config = WorkerConfig(
        kafka=kafka, s3=s3, topics=topics, group_id=f"g-{mode}-{uuid.uuid4().hex[:6]}",
        session_timeout_ms=10_000,
    )  # fmt: skip
    async with (
        running(config),
        LhvClient(kafka=kafka, topics=topics, timeout_s=60.0) as client,
    ):
        await client.create("docs", dim=3, space="l2")
        written = await client.add("docs", ["a", "b"], np.eye(3, dtype=np.float32)[:2])
        hits = await client.search("docs", np.array([1, 0, 0], np.float32), k=1, after=written)
    assert [h.id for h in hits] == ["a"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_a_wrong_password_ends_the_cli_in_one_line_naming_user_and_mechanism(
    sasl_stack: LocalStack, mechanism: str
) -> None:
    settings = {**_modes(sasl_stack)["scram"], "LHV_SASL_MECHANISM": mechanism,
                "LHV_SASL_PASSWORD": WRONG}  # fmt: skip
    done = _lhv(_child_env(sasl_stack, settings), "stats", "docs")
    assert done.returncode == 4
    assert done.stderr.splitlines() == [
        f"lhv stats: authentication failed for user 'lhv' via {mechanism} at "
        f"{sasl_stack.bootstrap_servers} (broker says: "
        + done.stderr.split("broker says: ")[1].rstrip("\n")
    ]
    assert "check LHV_SASL_USERNAME, LHV_SASL_PASSWORD and LHV_SASL_MECHANISM" in done.stderr


def test_a_wrong_password_ends_the_worker_in_one_line_without_traceback(
    sasl_stack: LocalStack,
) -> None:
    settings = {**_modes(sasl_stack)["scram"], "LHV_SASL_PASSWORD": WRONG}
    done = _lhv(_child_env(sasl_stack, settings), "worker")
    assert done.returncode == 4
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    failures = [line for line in lines if " ERROR " in line or line.startswith("lhv ")]
    assert failures == [
        f"lhv worker: authentication failed for user 'lhv' via SCRAM-SHA-256 at "
        f"{sasl_stack.bootstrap_servers} (broker says: "
        + done.stderr.split("broker says: ")[1].splitlines()[0]
    ]


def _cases(stack: LocalStack) -> dict[str, tuple[dict[str, str], int, str]]:
    modes = _modes(stack)
    ssl = modes["sasl_ssl"]
    no_cert = {k: v for k, v in ssl.items() if k not in
               ("LHV_SSL_CERTFILE", "LHV_SSL_KEYFILE", "LHV_SSL_PASSWORD")}  # fmt: skip
    return {
        "username without a SASL protocol": (
            {**modes["plain"], "LHV_SECURITY_PROTOCOL": "PLAINTEXT"}, 2,
            "LHV_SASL_USERNAME and LHV_SASL_PASSWORD set, but LHV_SECURITY_PROTOCOL=PLAINTEXT "
            "does not authenticate",
        ),
        "bad mechanism name": (
            {**modes["scram"], "LHV_SASL_MECHANISM": "SCRAM-SHA-1"}, 2,
            "LHV_SASL_MECHANISM='SCRAM-SHA-1' is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        "missing CA file": (
            {**ssl, "LHV_SSL_CAFILE": "/nonexistent/ca.pem"}, 2,
            "LHV_SSL_CAFILE=/nonexistent/ca.pem: no such file",
        ),
        "mechanism the broker does not enable": (
            {**modes["scram"], "LHV_SASL_MECHANISM": "SCRAM-SHA-512"}, 4, "check LHV_SASL_",
        ),
        "no client certificate": (no_cert, 4, "refused the client certificate"),
        "broker certificate not from the system CAs": (
            {k: v for k, v in ssl.items() if k != "LHV_SSL_CAFILE"}, 4,
            "TLS verification of Kafka at",
        ),
        "plaintext against the SASL port": (
            {"LHV_BOOTSTRAP_SERVERS": stack.bootstrap_servers}, 4, "protocol mismatch?",
        ),
        "nothing listening": (
            {"LHV_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, 3, "nothing listening at 127.0.0.1:1",
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "username without a SASL protocol",
        "bad mechanism name",
        "missing CA file",
        "mechanism the broker does not enable",
        "no client certificate",
        "broker certificate not from the system CAs",
        "plaintext against the SASL port",
        "nothing listening",
    ],
)
def test_each_misconfiguration_is_one_line_with_its_exit_code(
    sasl_stack: LocalStack, case: str
) -> None:
    settings, code, text = _cases(sasl_stack)[case]
    done = _lhv(_child_env(sasl_stack, settings), "stats", "docs")
    assert (done.returncode, len(done.stderr.splitlines())) == (code, 1), done.stderr
    assert done.stderr.startswith("lhv stats: ") and text in done.stderr


def test_no_debug_log_of_worker_or_cli_holds_a_password(
    sasl_stack: LocalStack, tmp_path: Path
) -> None:
    modes = _modes(sasl_stack)
    settings = modes["plain"]  # PLAIN: the password itself is in the SASL bytes
    topics = _topics(sasl_stack, settings)
    named = {"LHV_COMMANDS_TOPIC": topics.commands, "LHV_SEARCH_TOPIC": topics.search,
             "LHV_DLQ_TOPIC": topics.dlq, "LHV_GROUP_ID": f"g-{uuid.uuid4().hex[:6]}",
             "LHV_S3_PREFIX": f"sec-{uuid.uuid4().hex[:8]}/"}  # fmt: skip
    wire = {"LHV_LOG_KAFKA_WIRE": "1"}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--log-level", "DEBUG", "worker"],
            env=_child_env(sasl_stack, {**settings, **named}, **wire),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "worker started" not in log_path.read_text(errors="replace"):
            assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        outputs = [log_path.read_text(errors="replace")]
        for mode, extra in (("plain", wire), ("plain", {}), ("sasl_ssl", wire)):
            done = _lhv(
                _child_env(sasl_stack, {**modes[mode], **named}, **extra),
                "--log-level", "DEBUG", "stats", "docs", "--timeout", "20",
            )  # fmt: skip
            outputs.append(done.stdout + done.stderr)
        wrong = {**settings, **named, "LHV_SASL_PASSWORD": WRONG}
        done = _lhv(_child_env(sasl_stack, wrong, **wire), "--log-level", "DEBUG", "stats", "x")
        assert done.returncode == 4
        outputs.append(done.stdout + done.stderr)
    finally:
        worker.terminate()
        worker.wait(60)
    outputs[0] = log_path.read_text(errors="replace")
    # the wire lines were there, so the check means something
    assert "SaslAuthenticateRequest_v1(sasl_auth_bytes=<" in outputs[0]
    assert "SaslAuthenticateRequest_v1(sasl_auth_bytes=<" in outputs[1]
    for text in outputs:
        for secret in _secrets(sasl_stack):
            assert secret not in text
