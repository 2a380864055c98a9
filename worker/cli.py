"""The `lhv` command. `main(argv) -> int` is the entry point; each subcommand is a function
`_cmd_<name>(args) -> int` with an `_args_<name>(parser)` that declares its options, and
is registered once in `COMMANDS`. `lhv COMMAND --help` shows every option with its default.

A user's mistake (a bad argument, an unreadable file, an index that does not exist, a
stack that does not answer, missing S3 credentials) ends the command with one line on
stderr, `lhv COMMAND: what is wrong: what to do`, and the exit code of its kind; the
traceback is logged only with `--log-level DEBUG`. Commands raise; `main()` maps the
exception once (`user_error`, a chain of `_MAPPERS`) to a `CliError`. Anything unmapped is
a fault of LHV itself and keeps its traceback.

Exit codes (the README's table; 2, 3 and 4 are also those of `worker.kafka.errors`):

| code | meaning |
| --- | --- |
| 0 | done |
| 1 | done, but what it did or checked failed in part: batches rejected by `load`, problems found by `snapshot verify` or `replay --verify`, a failed demo |
| 2 | usage: an unknown option, a missing or malformed argument (an argument that is not JSON), an invalid setting |
| 3 | no answer: Kafka or S3 unreachable, no worker answered (or acknowledged) in time; may pass by itself |
| 4 | credentials or security settings refused: Kafka SASL/TLS, S3 credentials missing or refused; needs a change of settings |
| 5 | the worker refused the request: `index_not_found`, `index_exists`, `dim_mismatch`, `invalid_request`, ... (the code is in the message) |
| 6 | an input file is missing, unreadable or malformed (the message names the file and the row or line) |
| 130 | interrupted (Ctrl-C) |
| 141 | the reader of its output went away (`lhv snapshot ls` piped to `head`): it stops quietly |
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from worker.kafka.config import KafkaConfig
from worker.service.config import CheckpointPolicy, WorkerConfig
from worker.storage.blobstore import S3Config
from worker.wire.topics import TopicsConfig

if TYPE_CHECKING:
    from worker.client import Hits, LhvClient, WriteResult

__all__ = [
    "COMMANDS",
    "EXIT_BROKEN_PIPE",
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliError",
    "Command",
    "Denied",
    "InputFileError",
    "Refused",
    "Unreachable",
    "UsageError",
    "build_parser",
    "main",
    "user_error",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ENV_FILE = ".stack/env"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DENIED = 4
EXIT_REFUSED = 5
EXIT_INPUT = 6
EXIT_INTERRUPTED = 130
#: what a command killed by SIGPIPE returns in a shell (128 + 13)
EXIT_BROKEN_PIPE = 141


# --------------------------------------------------------------------------------------
# errors: one line and an exit code each


class CliError(Exception):
    """A mistake the user can fix: printed as one line, ends the command with `exit_code`."""

    exit_code = EXIT_FAILED


class UsageError(CliError):
    """An argument or setting is wrong."""

    exit_code = EXIT_USAGE


class InputFileError(CliError):
    """An input file is missing, unreadable or malformed."""

    exit_code = EXIT_INPUT


class Refused(CliError):
    """The worker (or a check against what it holds) refused the request."""

    exit_code = EXIT_REFUSED


class Unreachable(CliError):
    """Kafka, S3 or the workers did not answer."""

    exit_code = EXIT_UNREACHABLE


class Denied(CliError):
    """Credentials are missing, or Kafka or S3 refused them."""

    exit_code = EXIT_DENIED


Mapper = Callable[[BaseException, argparse.Namespace], CliError | None]


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (or while handling), outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def _map_cli(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    return exc if isinstance(exc, CliError) else None


#: modules of the `worker` extra (pyproject.toml): a client install has none of them
_WORKER_EXTRA = frozenset(
    {
        "hnswlib",
        "annoy",
        "cramjam",
        "aioboto3",
        "aiobotocore",
        "botocore",
        "boto3",
        "fastjsonschema",
        "prometheus_client",
    }
)


def _map_missing_extra(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    """A command of the service (`worker`, `snapshot`, `replay`, ...) run where only the
    client is installed: which extra to install, not an import traceback."""
    for cause in _causes(exc):
        if isinstance(cause, ModuleNotFoundError) and cause.name is not None:
            top = cause.name.partition(".")[0]
            if top in _WORKER_EXTRA:
                return UsageError(
                    f"needs the service's dependencies ({top} is not installed): "
                    "pip install 'lhv[worker]'"
                )
    return None


def _map_kafka(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    """Kafka settings, connection and authentication failures (`worker.kafka.errors`):
    their own line and exit code (2 a setting, 3 no connection, 4 refused)."""
    from worker.kafka.errors import KafkaSetupError, translate

    failure = exc if isinstance(exc, KafkaSetupError) else translate(exc, None)
    if failure is None:
        return None
    error = CliError(str(failure))
    error.exit_code = failure.exit_code
    return error


def _map_files(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    from worker.client.files import LoadError

    if isinstance(exc, LoadError):
        return InputFileError(str(exc))
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError) and exc.filename:
        return InputFileError(f"{exc.filename}: {exc.strerror}")
    return None


#: S3 error codes that mean the credentials were refused
_S3_REFUSALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")


def _map_s3(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ModuleNotFoundError:  # a client install: none of its commands reach S3
        return None

    from worker.storage.blobstore import BlobStoreError

    if any(isinstance(e, NoCredentialsError | PartialCredentialsError) for e in _causes(exc)):
        return Denied(
            "no S3 credentials: set LHV_S3_ACCESS_KEY_ID and LHV_S3_SECRET_ACCESS_KEY "
            "(for the local stack: `source .stack/env`), or configure AWS credentials"
        )
    if isinstance(exc, BlobStoreError):
        where = os.environ.get("LHV_S3_ENDPOINT_URL") or "AWS"
        refused = any(code in str(exc) for code in _S3_REFUSALS)
        return (Denied if refused else Unreachable)(
            f"S3 ({where}, bucket {os.environ.get('LHV_S3_BUCKET') or 'lhv'}): {exc}: check "
            "LHV_S3_ENDPOINT_URL, LHV_S3_BUCKET and the credentials"
        )
    return None


def _map_timeouts(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    from worker.client import NotAcknowledged

    if args.command == "worker":
        return None  # the worker waits on nobody's reply
    timeout = getattr(args, "timeout", None)
    within = f" within {timeout:g} s" if isinstance(timeout, int | float) else ""
    if isinstance(exc, NotAcknowledged):
        return Unreachable(
            f"{exc}: no worker acknowledged it{within}; is `lhv worker` running for these topics?"
        )
    if isinstance(exc, TimeoutError):
        topic = getattr(args, "search_topic", None) or TopicsConfig().search
        return Unreachable(
            f"no reply{within}: is a worker (`lhv worker`) running for topic {topic}? "
            "(--timeout waits longer)"
        )
    return None


def _map_refusals(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    from lhv_index.errors import IndexExists, IndexNotFound, LhvError

    if not isinstance(exc, LhvError) or args.command == "worker":
        return None
    hint = ""
    if isinstance(exc, IndexNotFound) and args.command != "unalias":
        hint = ": create it with `lhv create INDEX --dim N`"
    elif isinstance(exc, IndexExists):
        hint = ": drop it first, or create it again with the same parameters"
    return Refused(f"{exc.code}: {exc.message}{hint}")


#: tried in order; the first that recognises the exception decides its line and code.
#: Kafka's failures come before the timeouts: they often surface as timeouts too.
_MAPPERS: list[Mapper] = [
    _map_cli,
    _map_missing_extra,
    _map_kafka,
    _map_files,
    _map_s3,
    _map_timeouts,
    _map_refusals,
]


def user_error(exc: BaseException, args: argparse.Namespace) -> CliError | None:
    """The `CliError` a user should see for `exc`, or None for a fault of LHV itself."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return user_error(exc.exceptions[0], args)
    for mapper in _MAPPERS:
        error = mapper(exc, args)
        if error is not None:
            return error
    return None


# --------------------------------------------------------------------------------------
# argument parsing: one-line errors, defaults in --help, JSON arguments


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Like `ArgumentDefaultsHelpFormatter`, but silent about defaults that say nothing
    (None, False) and about help that states its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "(default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or (not action.option_strings and action.nargs not in ("?", "*"))
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line: what is wrong, where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _json_arg(what: str, check: Callable[[Any], str | None]) -> Callable[[str], Any]:
    """An argparse `type` that parses JSON; `check(value)` says what is wrong with it."""

    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(
                f"not JSON ({exc.msg} at column {exc.colno}): {text!r}; expected {what}"
            ) from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}: {text!r}; expected {what}")
        return value

    parse.__name__ = what
    return parse


def _vector_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "not a JSON array"
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        return "not all numbers"
    return None


def _object_problem(value: Any) -> str | None:
    return None if isinstance(value, dict) else "not a JSON object"


def seconds(text: str) -> float:
    """An argparse `type` for a wait in seconds: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds above 0")
    return value


JSON_VECTOR = _json_arg("a JSON array of numbers, e.g. [0.1, 0.2, 0.3]", _vector_problem)
JSON_OBJECT = _json_arg('a JSON object, e.g. {"lang": "en"}', _object_problem)


def _log_level(text: str) -> str:
    if not isinstance(logging.getLevelName(text.upper()), int):
        raise argparse.ArgumentTypeError(f"unknown level {text!r}: DEBUG, INFO, WARNING, ERROR")
    return text.upper()


def _env_default(var: str, default: object) -> object:
    """The default of a flag: `$var` when set, else LHV's own default."""
    return os.environ.get(var) or default


@dataclass(frozen=True, slots=True)
class Command:
    """One `lhv <name>` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------
# lhv stack


def _args_stack(parser: argparse.ArgumentParser) -> None:
    from worker.dev import stack

    sub = parser.add_subparsers(dest="stack_action", metavar="{up,status,down}", required=True)
    up = sub.add_parser(
        "up",
        help="start Kafka (KRaft) and SeaweedFS S3 on loopback",
        description="Start Kafka (KRaft) and SeaweedFS S3 on free loopback ports, detached, "
        "and write a sourceable env file naming them.",
        formatter_class=_HelpFormatter,
    )
    up.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="where to write the env")
    up.add_argument(
        "--partitions",
        type=int,
        default=stack.DEFAULT_PARTITIONS,
        help="partitions of lhv.commands and lhv.search",
    )
    up.add_argument(
        "--foreground", action="store_true", help="keep running until Ctrl-C, then stop"
    )
    up.add_argument(
        "--kafka-version",
        default=os.environ.get("LHV_KAFKA_VERSION") or stack.KAFKA_VERSION,
        help="Kafka release ($LHV_KAFKA_VERSION)",
    )
    up.add_argument("--timeout", type=seconds, default=60.0, help="seconds per server to be ready")
    up.add_argument(
        "--sasl", action="store_true", help="require SASL (PLAIN, SCRAM-SHA-256; also over TLS)"
    )
    for name, text in (("status", "is the stack up and answering"), ("down", "stop the stack")):
        p = sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
        p.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="env file of `stack up`")


def _cmd_stack(args: argparse.Namespace) -> int:
    from worker.dev import stack

    env_file = Path(args.env_file)
    action = args.stack_action
    if action == "up":
        return _stack_up(args, env_file)
    if not env_file.is_file():
        print(f"no stack: {env_file} does not exist", file=sys.stderr)
        return 0 if action == "down" else 1
    if action == "down":
        try:
            for line in stack.stop_from_env_file(env_file):
                print(line)
        except stack.StackError as exc:
            print(f"stack down failed: {exc}", file=sys.stderr)
            return 1
        return 0
    rows = stack.stack_status(stack.read_env_file(env_file))
    for name, ok, detail in rows:
        print(f"{name:14} {'ok ' if ok else 'DOWN'} {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1


def _stack_up(args: argparse.Namespace, env_file: Path) -> int:
    from worker.dev import stack

    if env_file.is_file():
        values = stack.read_env_file(env_file)
        if any(
            ok for name, ok, _ in stack.stack_status(values, timeout_s=3.0) if "process" in name
        ):
            print(
                f"a stack from {env_file} is already running; `lhv stack down --env-file "
                f"{env_file}` first",
                file=sys.stderr,
            )
            return 1
        stack.stop_from_env_file(env_file)  # leftovers of a dead stack
    settings = stack.StackSettings(
        partitions=args.partitions,
        start_timeout_s=args.timeout,
        sasl=args.sasl,
        kafka_version=args.kafka_version,
    )
    # a detached stack outlives this process: its directory is removed by `stack down`
    local = stack.LocalStack(settings, keep_dir=not args.foreground, detached=not args.foreground)
    try:
        local.start()
    except stack.StackError as exc:
        print(f"stack up failed: {exc}", file=sys.stderr)
        return 1
    stack.write_env_file(env_file, local.env())
    print(f"stack ready in {local.ready_s:.1f} s")
    print(f"  kafka  {local.bootstrap_servers}  (log {local.kafka_log})")
    if args.sasl:
        print(f"  sasl   SCRAM-SHA-256 or PLAIN as {stack.SASL_USER}; SASL_SSL at "
              f"{local.sasl_ssl_bootstrap_servers} (LHV_STACK_SSL_* in the env)")  # fmt: skip
    print(f"  s3     {local.s3_endpoint_url}  bucket {local.bucket}  (log {local.s3_log})")
    print(f"  env    source {env_file}")
    if not args.foreground:
        print(f"  stop   lhv stack down --env-file {env_file}")
        return 0
    print("running in the foreground; Ctrl-C stops it")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if not (local.kafka_alive() and local.s3_alive()):
                print("a stack process died; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        local.stop()
        env_file.unlink(missing_ok=True)
        print("stack stopped")


# --------------------------------------------------------------------------------------
# lhv worker


def _worker_defaults() -> dict[str, object]:
    """LHV's own default of each worker setting, by variable (from the config classes)."""
    worker = {f.name: f.default for f in fields(WorkerConfig)}
    kafka, topics, checkpoint, s3 = KafkaConfig(), TopicsConfig(), CheckpointPolicy(), S3Config()
    return {
        "LHV_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LHV_GROUP_ID": worker["group_id"],
        "LHV_COMMANDS_TOPIC": topics.commands,
        "LHV_SEARCH_TOPIC": topics.search,
        "LHV_REPLICA_SEARCH_TOPIC": topics.replica_search,
        "LHV_DLQ_TOPIC": topics.dlq,
        "LHV_REPLY_PATTERN": topics.reply_pattern,
        "LHV_S3_BUCKET": s3.bucket,
        "LHV_CHECKPOINT_RECORDS": checkpoint.every_records,
        "LHV_CHECKPOINT_SECONDS": checkpoint.every_s,
        "LHV_METRICS_HOST": worker["metrics_host"],
        "LHV_SESSION_TIMEOUT_MS": worker["session_timeout_ms"],
        "LHV_MAX_PENDING_BYTES": worker["max_pending_bytes"],
        "LHV_MAX_BATCH_BYTES": worker["max_batch_bytes"],
        "LHV_SECURITY_PROTOCOL": kafka.security_protocol,
    }


#: (flag, variable, type, help) of `lhv worker`; a flag wins over its variable, which
#: wins over the default (`WorkerConfig.from_env` reads the variables)
_WORKER_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--bootstrap-servers", "LHV_BOOTSTRAP_SERVERS", str, "Kafka bootstrap servers"),
    ("--group", "LHV_GROUP_ID", str, "consumer group of the workers that share the partitions"),
    ("--commands-topic", "LHV_COMMANDS_TOPIC", str, "topic of index commands"),
    ("--search-topic", "LHV_SEARCH_TOPIC", str, "topic of queries"),
    (
        "--replica-search-topic",
        "LHV_REPLICA_SEARCH_TOPIC",
        str,
        "topic of queries answered by read replicas",
    ),
    (
        "--replica-group",
        "LHV_REPLICA_GROUP",
        str,
        "consumer group of a read replica (unset: <group>.replicas)",
    ),
    ("--dlq-topic", "LHV_DLQ_TOPIC", str, "topic of rejected commands"),
    ("--reply-pattern", "LHV_REPLY_PATTERN", str, "reply topics allowed, fnmatch style"),
    ("--s3-endpoint-url", "LHV_S3_ENDPOINT_URL", str, "S3 endpoint (unset: AWS)"),
    ("--s3-bucket", "LHV_S3_BUCKET", str, "bucket of snapshots and manifests"),
    ("--s3-prefix", "LHV_S3_PREFIX", str, "key prefix inside the bucket"),
    ("--checkpoint-records", "LHV_CHECKPOINT_RECORDS", int, "checkpoint after this many records"),
    ("--checkpoint-seconds", "LHV_CHECKPOINT_SECONDS", float, "checkpoint after this long"),
    (
        "--metrics-port",
        "LHV_METRICS_PORT",
        int,
        "serve /metrics, /healthz, /readyz on this port (unset: off; 0: any free port)",
    ),
    ("--metrics-host", "LHV_METRICS_HOST", str, "address the metrics server binds"),
    (
        "--session-timeout-ms",
        "LHV_SESSION_TIMEOUT_MS",
        int,
        "how long the group waits for a silent worker before moving its partitions",
    ),
    (
        "--worker-id",
        "LHV_WORKER_ID",
        str,
        "this process in manifests and logs (unset: host name and a random suffix)",
    ),
    (
        "--group-instance-id",
        "LHV_GROUP_INSTANCE_ID",
        str,
        "Kafka static membership: a stable name per worker (unset: off)",
    ),
    (
        "--max-pending-bytes",
        "LHV_MAX_PENDING_BYTES",
        int,
        "record bytes buffered per partition before its fetching pauses",
    ),
    ("--max-batch-bytes", "LHV_MAX_BATCH_BYTES", int, "record bytes decoded and applied at once"),
    ("--security-protocol", "LHV_SECURITY_PROTOCOL", str, "PLAINTEXT, SSL, SASL_PLAINTEXT, ..."),
    ("--sasl-mechanism", "LHV_SASL_MECHANISM", str, "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    (
        "--sasl-username",
        "LHV_SASL_USERNAME",
        str,
        "SASL user (the password only from LHV_SASL_PASSWORD)",
    ),
    ("--ssl-cafile", "LHV_SSL_CAFILE", str, "CA bundle of the brokers' certificates"),
    ("--ssl-certfile", "LHV_SSL_CERTFILE", str, "client certificate"),
    ("--ssl-keyfile", "LHV_SSL_KEYFILE", str, "client key"),
)


def _args_worker(parser: argparse.ArgumentParser) -> None:
    defaults = _worker_defaults()
    parser.add_argument(
        "--processes",
        default=_env_default("LHV_PROCESSES", "1"),
        metavar="N",
        help="run N worker processes, each its own member of the group with these settings "
        "(a worker id, group instance id or metrics port gets -0..-N-1 / +0..+N-1 per "
        "process); 'auto': one per core. The parent forwards SIGTERM/SIGINT to every "
        "process and waits for them to stop, and restarts one that ends on its own after "
        "a backoff ($LHV_RESTART_BACKOFF_MS, doubling up to $LHV_RESTART_BACKOFF_MAX_MS); "
        "after $LHV_MAX_QUICK_RESTARTS restarts in a row of a process that ran less than "
        "$LHV_RESTART_STABLE_MS it stops them all and fails ($LHV_PROCESSES)",
    )
    for flag, var, kind, text in _WORKER_FLAGS:
        parser.add_argument(
            flag,
            type=kind,
            default=_env_default(var, defaults.get(var)),
            help=f"{text} (${var})",
        )
    parser.add_argument(
        "--accept-data-loss",
        action="store_true",
        default=(os.environ.get("LHV_ACCEPT_DATA_LOSS") or "").lower() in ("1", "true", "yes"),
        help="serve partitions whose log lost records after the checkpoint "
        "($LHV_ACCEPT_DATA_LOSS=1)",
    )
    parser.add_argument(
        "--replica",
        action="store_true",
        default=(os.environ.get("LHV_ROLE") or "").lower() == "replica",
        help="run as a read replica: follow the owners' manifests and the commands log, "
        "answer the replica search topic, write nothing ($LHV_ROLE=replica)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("LHV_LOG_JSON", "") not in ("", "0"),
        help="JSON log lines ($LHV_LOG_JSON=1)",
    )


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment with the flags folded into their `LHV_*` variables."""
    env = dict(os.environ)
    for flag, var, _kind, _text in _WORKER_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            env[var] = str(value)
    if args.accept_data_loss:
        env["LHV_ACCEPT_DATA_LOSS"] = "1"
    if args.replica:
        env["LHV_ROLE"] = "replica"
    if args.log_json:
        env["LHV_LOG_JSON"] = "1"
    return env


def _worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Flags override `LHV_*` variables, which override the defaults."""
    try:
        return WorkerConfig.from_env(_worker_env(args))
    except (ValueError, KeyError) as exc:
        raise UsageError(f"bad worker setting: {exc}") from exc


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.kafka import logs as aiokafka_logs
    from worker.service import Worker
    from worker.service.collector import settle_collector
    from worker.service.malloc import tune_malloc
    from worker.service.processes import parse_processes

    try:
        processes = parse_processes(str(args.processes))
    except ValueError as exc:
        raise UsageError(f"--processes: {exc}") from exc
    config = _worker_config(args)
    if processes > 1:
        return _supervise_workers(args, processes)
    # before the event loop and its threads: arenas are bound as threads first allocate
    tune_malloc(
        arena_max=config.malloc_arena_max,
        mmap_threshold_bytes=config.malloc_mmap_threshold_bytes,
    )
    aiokafka_logs.install(config.topics.reply_pattern)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        worker = Worker(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        # a failed start (S3 or Kafka unreachable, credentials) is the user's to fix:
        # main() says so in one line; a failure while running is logged with its traceback
        await worker.start()
        settle_collector()  # what the start made lives as long as the process
        try:
            await worker.run()
        except Exception:
            log.exception("worker failed")
            return EXIT_FAILED
        finally:
            await worker.stop()
        return EXIT_OK

    return asyncio.run(run())


def _supervise_workers(args: argparse.Namespace, processes: int) -> int:
    """`lhv worker --processes N` with N >= 2: this process starts and watches N
    ordinary `lhv worker` processes (worker.service.processes)."""
    from worker.service.config import ProcessesPolicy
    from worker.service.processes import WorkerProcesses, child_envs

    env = _worker_env(args)
    try:
        policy = ProcessesPolicy.from_env(env)
        envs = child_envs(env, processes)
        for child in envs:  # each process's own settings are valid too (ids, ports)
            WorkerConfig.from_env(child)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"bad worker setting: {exc}") from exc
    command = [sys.executable, "-m", "worker.cli", "--log-level", str(args.log_level), "worker"]
    return WorkerProcesses(command, envs, policy).run()


# --------------------------------------------------------------------------------------
# clients of running workers: create, drop, add, load, delete, get, merge, import,
# search, stats (the client is worker.client, file reading worker.loader)


def _args_connection(parser: argparse.ArgumentParser, *, timeout_s: float = 30.0) -> None:
    topics = TopicsConfig()
    group = parser.add_argument_group("connection (flags win over the LHV_* variables)")
    group.add_argument(
        "--bootstrap-servers",
        default=_env_default("LHV_BOOTSTRAP_SERVERS", KafkaConfig().bootstrap_servers),
        help="Kafka bootstrap servers ($LHV_BOOTSTRAP_SERVERS)",
    )
    group.add_argument(
        "--commands-topic",
        default=_env_default("LHV_COMMANDS_TOPIC", topics.commands),
        help="($LHV_COMMANDS_TOPIC)",
    )
    group.add_argument(
        "--search-topic",
        default=_env_default("LHV_SEARCH_TOPIC", topics.search),
        help="($LHV_SEARCH_TOPIC)",
    )
    group.add_argument(
        "--reply-pattern",
        default=_env_default("LHV_REPLY_PATTERN", topics.reply_pattern),
        help="reply topics the workers accept ($LHV_REPLY_PATTERN)",
    )
    group.add_argument(
        "--timeout", type=seconds, default=timeout_s, help="seconds to wait for each reply"
    )


def _client(args: argparse.Namespace) -> LhvClient:
    from worker.client import LhvClient

    env = dict(os.environ)
    for name, value in (
        ("LHV_BOOTSTRAP_SERVERS", args.bootstrap_servers),
        ("LHV_COMMANDS_TOPIC", args.commands_topic),
        ("LHV_SEARCH_TOPIC", args.search_topic),
        ("LHV_REPLY_PATTERN", args.reply_pattern),
    ):
        if value:
            env[name] = value
    try:
        return LhvClient(
            kafka=KafkaConfig.from_env(env),
            topics=TopicsConfig.from_env(env),
            timeout_s=args.timeout,
        )
    except ValueError as exc:  # a setting the client refuses (timeout, reply pattern)
        raise UsageError(str(exc)) from exc


def _with_client(args: argparse.Namespace, call: Callable[[LhvClient], Awaitable[T]]) -> T:
    """Run `call(client)` with a started client; errors go to main()."""

    async def run() -> T:
        async with _client(args) as client:
            return await call(client)

    return asyncio.run(run())


def _json_out(value: Any) -> None:
    print(json.dumps(value, sort_keys=True))


def _report_write(args: argparse.Namespace, done: str, result: WriteResult) -> int:
    """Print an acknowledged write: `done (partition, offset)`, or its JSON."""
    ack = dict(result.ack or {})
    if args.json:
        _json_out(
            {"index": args.index, "partition": result.partition, "offset": result.offset, **ack}
        )
        return EXIT_OK
    counts = ""
    if "applied" in ack:
        counts = f"; applied {ack['applied']}, skipped {ack.get('skipped', 0)}"
    print(f"{done} (partition {result.partition}, offset {result.offset}{counts})")
    return EXIT_OK


def _args_json(parser: argparse.ArgumentParser, what: str = "the acknowledgement") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON line")


def _index_param_help(name: str, text: str) -> str:
    from lhv_index import IndexParams

    default = {f.name: f.default for f in fields(IndexParams)}[name]
    return f"{text} (worker default: {default})"


def _args_create(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="name: letters, digits, '.', '_', '-'")
    parser.add_argument("--dim", type=int, required=True, help="vector length")
    parser.add_argument("--space", choices=("cosine", "l2", "ip"), default="cosine")
    parser.add_argument("--engine", choices=("hnsw", "annoy", "exact"), default="hnsw")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="member indexes, each on its own partition; 1: an ordinary index",
    )
    for flag, name, text in (
        ("--M", "M", "hnsw: graph degree"),
        ("--ef-construction", "ef_construction", "hnsw: candidate list size while building"),
        ("--ef-search", "ef_search", "hnsw: candidate list size while searching"),
        ("--n-trees", "n_trees", "annoy: number of trees"),
        ("--search-k", "search_k", "annoy: nodes inspected per query, -1: n_trees * k"),
        ("--max-elements-hint", "max_elements_hint", "initial capacity; the index grows"),
    ):
        parser.add_argument(flag, dest=name, type=int, help=_index_param_help(name, text))
    _args_json(parser)
    _args_connection(parser)


_CREATE_PARAMS = ("M", "ef_construction", "ef_search", "n_trees", "search_k", "max_elements_hint")


def _cmd_create(args: argparse.Namespace) -> int:
    params = {n: getattr(args, n) for n in _CREATE_PARAMS if getattr(args, n) is not None}
    result = _with_client(
        args,
        lambda c: c.create(
            args.index,
            dim=args.dim,
            space=args.space,
            engine=args.engine,
            shards=args.shards,
            **params,
        ),
    )
    shards = f", {args.shards} shards" if args.shards != 1 else ""
    return _report_write(
        args,
        f"created {args.index}: {args.dim} dims, {args.space}, {args.engine}{shards}",
        result,
    )


def _args_drop(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    _args_json(parser)
    _args_connection(parser)


def _cmd_drop(args: argparse.Namespace) -> int:
    result = _with_client(args, lambda c: c.drop(args.index))
    return _report_write(args, f"dropped {args.index}", result)


def _args_alias(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="the alias: a name that is no index")
    parser.add_argument("target", help="the index (or sharded index) it names")
    _args_json(parser)
    _args_connection(parser)


def _cmd_alias(args: argparse.Namespace) -> int:
    result = _with_client(args, lambda c: c.alias(args.index, args.target))
    return _report_write(args, f"{args.index} now names {args.target}", result)


def _args_unalias(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="the alias to remove (its target stays)")
    _args_json(parser)
    _args_connection(parser)


def _cmd_unalias(args: argparse.Namespace) -> int:
    result = _with_client(args, lambda c: c.unalias(args.index))
    return _report_write(args, f"removed the alias {args.index}", result)


def _args_describe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="an index, a sharded index, an alias or a member NAME#s")
    _args_json(parser, "the answer")
    _args_connection(parser)


def _cmd_describe(args: argparse.Namespace) -> int:
    answer = dict(_with_client(args, lambda c: c.describe(args.index)))
    for key in ("correlation_id", "status", "op", "took_ms"):
        answer.pop(key, None)
    if args.json:
        _json_out(answer)
        return EXIT_OK
    for key, value in answer.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        print(f"{key:18} {text}")
    return EXIT_OK


def _args_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("id", help="the item's id (an existing id is replaced)")
    parser.add_argument("--vector", type=JSON_VECTOR, required=True, help="JSON array")
    parser.add_argument(
        "--metadata", type=JSON_OBJECT, default=None, help="JSON object ({} clears it)"
    )
    parser.add_argument("--version", type=int, default=None, help="client version (LWW)")
    _args_json(parser)
    _args_connection(parser)


def _cmd_add(args: argparse.Namespace) -> int:
    result = _with_client(
        args,
        lambda c: c.add(
            args.index,
            [args.id],
            [args.vector],
            None if args.metadata is None else [args.metadata],
            version=args.version,
            ack=True,
        ),
    )
    return _report_write(args, f"added {args.id} to {args.index}", result)


def _args_delete(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("ids", nargs="+", metavar="ID", help="ids to delete (absent ones too)")
    parser.add_argument("--version", type=int, default=None, help="client version (LWW)")
    _args_json(parser)
    _args_connection(parser)


def _cmd_delete(args: argparse.Namespace) -> int:
    result = _with_client(
        args, lambda c: c.delete(args.index, args.ids, version=args.version, ack=True)
    )
    return _report_write(args, f"deleted {len(args.ids)} ids from {args.index}", result)


def _args_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="SOURCE", help="the index copied from")
    parser.add_argument("dest", metavar="DEST", help="the index copied into")
    parser.add_argument(
        "--clear-source",
        action="store_true",
        help="then delete from SOURCE every item it exported (those DEST kept are deleted too)",
    )
    _args_json(parser)
    _args_connection(parser, timeout_s=120.0)


def _cmd_merge(args: argparse.Namespace) -> int:
    result = _with_client(
        args, lambda c: c.merge(args.index, args.dest, clear_source=args.clear_source)
    )
    return _report_write(args, f"merged {args.index} into {args.dest}", result)


def _args_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("source", help="s3://bucket/key of an .npy, .npz or LHV1 snapshot")
    parser.add_argument("--ids-source", default=None, help="s3:// .npy or text file of ids")
    parser.add_argument("--metadata-source", default=None, help="s3:// JSON Lines, one per row")
    parser.add_argument(
        "--format", choices=("npy", "npz", "lhv"), default=None, help="(unset: from the key)"
    )
    parser.add_argument("--version", type=int, default=None, help="client version (LWW)")
    parser.add_argument("--chunk-items", type=int, default=None, help="rows per engine call")
    _args_json(parser)
    _args_connection(parser, timeout_s=300.0)


def _cmd_import(args: argparse.Namespace) -> int:
    result = _with_client(
        args,
        lambda c: c.import_(
            args.index,
            args.source,
            ids_source=args.ids_source,
            metadata_source=args.metadata_source,
            format=args.format,
            version=args.version,
            chunk_items=args.chunk_items,
        ),
    )
    return _report_write(args, f"imported {args.source} into {args.index}", result)


def _args_get(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("ids", nargs="+", metavar="ID")
    parser.add_argument("--no-vectors", action="store_true", help="leave the vectors out")
    _args_json(parser, "each item")
    _args_connection(parser)


def _cmd_get(args: argparse.Namespace) -> int:
    items = _with_client(
        args, lambda c: c.get(args.index, args.ids, include_vectors=not args.no_vectors)
    )
    found = {item["id"] for item in items}
    for item in items:
        if args.json:
            _json_out(item)
            continue
        line = f"{item['id']}  version {item.get('version', 0)}"
        if item.get("metadata") is not None:
            line += f"  {json.dumps(item['metadata'], sort_keys=True)}"
        vector = item.get("vector")
        if isinstance(vector, list):
            head = ", ".join(f"{x:.4g}" for x in vector[:4])
            line += f"  [{head}{', ...' if len(vector) > 4 else ''}] ({len(vector)} dims)"
        print(line)
    missing = [i for i in args.ids if i not in found]
    if missing and not args.json:
        print(f"not found: {', '.join(missing)}", file=sys.stderr)
    return EXIT_OK


def _args_load(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("file", help=".npy, .npz, .fvecs or .jsonl ({id, vector, metadata?})")
    parser.add_argument("--ids-file", default=None, help="one id per line, or an .npy of ids")
    parser.add_argument(
        "--create", action="store_true", help="create the index first if it does not exist"
    )
    parser.add_argument(
        "--dim", type=int, default=None, help="expected dimension (unset: the file's)"
    )
    parser.add_argument(
        "--space", choices=("cosine", "l2", "ip"), default="cosine", help="with --create"
    )
    parser.add_argument(
        "--engine", choices=("hnsw", "annoy", "exact"), default="hnsw", help="with --create"
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="with --create: member indexes (1: ordinary)"
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per add record")
    parser.add_argument("--in-flight", type=int, default=8, help="batches awaiting acks at once")
    parser.add_argument(
        "--check-timeout",
        type=seconds,
        default=10.0,
        help="seconds to wait for a worker to answer the check before sending",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _args_connection(parser)


def _check_cosine_rows(args: argparse.Namespace, space: str, zero_row: str | None) -> None:
    """Raises InputFileError when the index is under cosine and the file has a zero row."""
    if space == "cosine" and zero_row is not None:
        raise InputFileError(
            f"{args.file} {zero_row}: zero vector (or norm out of range), which index "
            f"{args.index!r} under cosine refuses; nothing was sent"
        )


async def _check_load_target(
    client: LhvClient, args: argparse.Namespace, dim: int, zero_row: str | None = None
) -> None:
    """Before anything is sent: a worker answers for the index, the index exists (or is
    created with --create), has the file's dimension and, under cosine, the file has no
    zero row (`zero_row`, from `VectorFile.check`).

    Raises:
        Unreachable: no worker answered within --check-timeout.
        Refused: no such index (without --create), or another dimension.
        InputFileError: a zero row for an index under cosine.
    """
    from lhv_index.errors import DeadlineExceeded, IndexNotFound, NotReady

    try:
        stats = await client.stats(args.index, timeout_s=args.check_timeout)
    except IndexNotFound:
        if not args.create:
            raise Refused(
                f"index {args.index!r} does not exist: add --create, or `lhv create "
                f"{args.index} --dim {dim}` first; nothing was sent"
            ) from None
        _check_cosine_rows(args, args.space, zero_row)
        await client.create(
            args.index, dim=dim, space=args.space, engine=args.engine, shards=args.shards
        )
        shards = f", {args.shards} shards" if args.shards != 1 else ""
        print(
            f"created {args.index}: {dim} dims, {args.space}, {args.engine}{shards}",
            file=sys.stderr,
        )
        return
    except (NotReady, DeadlineExceeded):
        # a worker owns the partition and is restoring it: it applies the rows after
        print(
            f"{args.index}: its worker is still restoring; dimension not checked", file=sys.stderr
        )
        return
    except TimeoutError:
        raise Unreachable(
            f"no worker answered within {args.check_timeout:g} s (topic {args.search_topic}): "
            "start one with `lhv worker` (same bootstrap servers and topics); nothing was sent"
        ) from None
    if int(stats["dim"]) != dim:
        raise Refused(
            f"{args.file} has {dim}-dim vectors but index {args.index!r} has dim "
            f"{stats['dim']}; nothing was sent"
        )
    _check_cosine_rows(args, str(stats.get("space")), zero_row)


def _cmd_load(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from worker.client.files import LoadReport, load_file, open_vectors

    vectors = open_vectors(args.file, ids_file=args.ids_file)
    if args.dim is not None and args.dim != vectors.dim:
        raise InputFileError(f"{args.file} has {vectors.dim}-dim vectors, not --dim {args.dim}")
    vectors.check()  # every row, before anything is sent

    async def run(client: LhvClient) -> LoadReport:
        await _check_load_target(client, args, vectors.dim, vectors.zero_row)
        with tqdm(
            total=vectors.rows, unit="rows", desc=args.index, disable=args.no_progress
        ) as bar:
            return await load_file(
                client,
                args.index,
                vectors,
                batch_size=args.batch_size,
                in_flight=args.in_flight,
                progress=bar.update,
            )

    report = _with_client(args, run)
    last = report.last
    where = f" (last at partition {last.partition} offset {last.offset})" if last else ""
    print(f"loaded {report.rows} of {vectors.rows} rows into {args.index}{where}")
    for failed in report.failed:
        print(f"REJECTED {failed}", file=sys.stderr)
    for late in report.unacknowledged:
        print(f"SENT {late}", file=sys.stderr)
    if report.unacknowledged:
        rows = sum(u.rows for u in report.unacknowledged)
        print(
            f"{len(report.unacknowledged)} batches ({rows} rows) sent, not yet acknowledged: "
            f"they will still be applied (`lhv stats {args.index}` shows the count)",
            file=sys.stderr,
        )
    if report.failed:
        print(
            f"{len(report.failed)} of {report.batches} batches rejected: not applied",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_UNREACHABLE if report.unacknowledged else EXIT_OK


def _args_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--vector", type=JSON_VECTOR, help="one query as a JSON array")
    what.add_argument("--file", help="queries: .npy/.npz/.fvecs/.jsonl, one per row")
    parser.add_argument("-k", type=int, default=10, help="hits per query")
    parser.add_argument("--ef", type=int, default=None, help="candidate list size (unset: index's)")
    parser.add_argument(
        "--filter", type=JSON_OBJECT, default=None, help='metadata equality, JSON: {"lang": "en"}'
    )
    parser.add_argument("--metadata", action="store_true", help="include metadata")
    _args_partial(parser)
    _args_json(parser, "each query's hits")
    _args_connection(parser)


def _cmd_search(args: argparse.Namespace) -> int:
    import numpy as np

    from worker.client.files import open_vectors

    if args.vector is not None:
        queries = np.asarray([args.vector], dtype=np.float32)
    else:
        vf = open_vectors(args.file)
        queries = np.concatenate([b.vectors for b in vf.batches(10_000)])

    def call(client: LhvClient) -> Awaitable[list[Hits]]:
        return client.search_many(
            args.index, queries, args.k, ef=args.ef, filter=args.filter,
            include_metadata=args.metadata, allow_partial=args.allow_partial,
        )  # fmt: skip

    results = _with_client(args, call)
    for q, hits in enumerate(results):
        missing = getattr(hits, "missing_shards", ())
        if missing:
            print(f"query {q}: PARTIAL, shards {list(missing)} did not answer", file=sys.stderr)
        rows: list[dict[str, object]] = [{"id": h.id, "distance": h.distance} for h in hits]
        if args.metadata:
            for row, h in zip(rows, hits, strict=True):
                row["metadata"] = h.metadata
        if args.json:
            print(json.dumps({"query": q, "hits": rows}))
            continue
        if len(results) > 1:
            print(f"query {q}")
        print(f"{'rank':>4}  {'distance':>12}  id")
        for rank, row in enumerate(rows, 1):
            meta = f"  {json.dumps(row['metadata'])}" if args.metadata else ""
            print(f"{rank:>4}  {row['distance']:>12.6f}  {row['id']}{meta}")
    return EXIT_OK


def _args_partial(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="sharded index: answer without members that do not answer in time (flagged)",
    )


def _args_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    _args_partial(parser)
    _args_json(parser, "the stats")
    _args_connection(parser)


#: the index parameters that mean something for each engine
_ENGINE_PARAMS = {
    "hnsw": ("dim", "space", "engine", "M", "ef_construction", "ef_search", "max_elements_hint"),
    "annoy": ("dim", "space", "engine", "n_trees", "search_k", "max_elements_hint"),
    "exact": ("dim", "space", "engine", "max_elements_hint"),
}


def _cmd_stats(args: argparse.Namespace) -> int:
    stats = dict(
        _with_client(args, lambda c: c.stats(args.index, allow_partial=args.allow_partial))
    )
    for key in ("correlation_id", "status", "op", "took_ms"):
        stats.pop(key, None)
    params = stats.get("params")
    wanted = _ENGINE_PARAMS.get(str(stats.get("engine")))
    if isinstance(params, dict) and wanted is not None:
        stats["params"] = {k: v for k, v in params.items() if k in wanted}
    if args.json:
        _json_out(stats)
        return EXIT_OK
    shards = stats.pop("shards", None)
    for key, value in stats.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        print(f"{key:18} {text}")
    if isinstance(shards, list):
        columns = ("shard", "partition", "count", "deleted", "applied_offset", "checkpoint_offset")
        print("  ".join(f"{c:>17}" for c in columns))
        for row in shards:
            print("  ".join(f"{row.get(c, '-')!s:>17}" for c in columns))
    return EXIT_OK


# --------------------------------------------------------------------------------------
# lhv demo


def _args_demo(parser: argparse.ArgumentParser) -> None:
    from worker.dev import demo

    demo.add_arguments(parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.dev import demo

    return demo.run(args)


# --------------------------------------------------------------------------------------
# lhv bench (a source checkout's bench/bench_e2e.py; bench/ is not installed)

_BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_e2e.py"


def _args_bench(parser: argparse.ArgumentParser) -> None:
    # every word after `bench`, `--help` included, goes to the script (which shows its
    # options as `lhv bench`): no option prefix here
    parser.prefix_chars = "+"
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's options")


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    if not _BENCH_SCRIPT.is_file():
        raise UsageError(f"lhv bench needs a source checkout: {_BENCH_SCRIPT} not found")
    spec = importlib.util.spec_from_file_location("bench_e2e", _BENCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    saved = sys.argv[0]
    sys.argv[0] = "lhv bench"  # argparse's prog: `usage: lhv bench ...`
    try:
        return int(bench.main(list(args.bench_args)))
    except SystemExit as exc:  # --help, or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        sys.argv[0] = saved


# --------------------------------------------------------------------------------------
# lhv snapshot / replay (operator tools; logic in worker.ops.tools)


def _args_tools_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--commands-topic", default=None, help="(LHV_COMMANDS_TOPIC)")
    parser.add_argument("--s3-prefix", default=None, help="(LHV_S3_PREFIX)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _args_snapshot(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="snapshot_action", metavar="{ls,inspect,verify}", required=True
    )
    ls = sub.add_parser("ls", help="manifests per partition, snapshots per index")
    _args_tools_common(ls)
    inspect = sub.add_parser("inspect", help="one snapshot's envelope")
    inspect.add_argument("target", help="a snapshot key, or an index named by a manifest")
    _args_tools_common(inspect)
    verify = sub.add_parser("verify", help="checksums, load, ids of every named snapshot")
    verify.add_argument("--partition", type=int, action="append", default=None)
    _args_tools_common(verify)


def _args_replay(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verify",
        action="store_true",
        required=True,
        help="rebuild every partition from the log and compare with its snapshots",
    )
    parser.add_argument("--partition", type=int, action="append", default=None)
    parser.add_argument("--timeout", type=seconds, default=600.0, help="seconds per partition")
    _args_tools_common(parser)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from worker.ops import tools

    return tools.run_snapshot(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from worker.ops import tools

    return tools.run_replay(args)


# --------------------------------------------------------------------------------------
# registry: one row per subcommand

COMMANDS: tuple[Command, ...] = (
    Command("stack", "run the local Kafka + S3 stack (no Docker)", _args_stack, _cmd_stack),
    Command(
        "worker",
        "run a worker: consume commands and queries, checkpoint to S3",
        _args_worker,
        _cmd_worker,
    ),
    Command("create", "create an index (acknowledged)", _args_create, _cmd_create),
    Command("drop", "drop an index and, after a checkpoint, its snapshots", _args_drop, _cmd_drop),
    Command("alias", "point a name at an index, switched in one step", _args_alias, _cmd_alias),
    Command("unalias", "remove an alias (its target stays)", _args_unalias, _cmd_unalias),
    Command(
        "describe",
        "what a name is: an index, a sharded index (its shards) or an alias (its target)",
        _args_describe,
        _cmd_describe,
    ),
    Command("add", "add or replace one item (acknowledged)", _args_add, _cmd_add),
    Command("load", "load vectors from a file into an index (acknowledged)", _args_load, _cmd_load),
    Command("delete", "delete items by id (acknowledged)", _args_delete, _cmd_delete),
    Command("get", "items by id: vector, metadata, version", _args_get, _cmd_get),
    Command("merge", "copy the live items of one index into another", _args_merge, _cmd_merge),
    Command("import", "bulk load an index from an S3 object", _args_import, _cmd_import),
    Command("search", "k nearest neighbours of one or more vectors", _args_search, _cmd_search),
    Command("stats", "an index's size, parameters and offsets", _args_stats, _cmd_stats),
    Command("demo", "LHV end to end on the local stack, with a report", _args_demo, _cmd_demo),
    Command(
        "bench",
        "end-to-end benchmarks against raw hnswlib (a source checkout's bench/; "
        "`lhv bench --help` lists its options)",
        _args_bench,
        _cmd_bench,
    ),
    Command(
        "snapshot",
        "list, inspect and verify the checkpoints in S3",
        _args_snapshot,
        _cmd_snapshot,
    ),
    Command(
        "replay",
        "rebuild partitions from the log and compare with their snapshots",
        _args_replay,
        _cmd_replay,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lhv",
        description="LHV: vector indexes fed by Kafka, checkpointed to S3. "
        "`lhv COMMAND --help` shows a command's options and their defaults.",
        epilog="exit codes: 0 done, 1 done with failures, 2 usage or setting, 3 no answer "
        "(Kafka, S3, workers), 4 credentials refused, 5 refused by the worker, 6 input file, "
        "130 interrupted",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=_env_default("LHV_LOG_LEVEL", "INFO"),
        help="DEBUG also shows tracebacks ($LHV_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.help, formatter_class=_HelpFormatter
        )
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """One logging setup for every command (worker.logs: the libraries at WARNING); the
    client commands also keep the S3 store's INFO line to themselves, `replay` and
    `snapshot` the service's, and aiokafka's lines about normal situations are DEBUG
    (worker.kafka.logs)."""
    from worker.kafka import logs as aiokafka_logs
    from worker.telemetry.logs import setup_logging

    json_logs = getattr(args, "log_json", None)
    if json_logs is None:
        json_logs = os.environ.get("LHV_LOG_JSON", "") not in ("", "0")
    setup_logging(str(args.log_level), json=bool(json_logs))
    if args.command != "worker" and logging.getLevelName(str(args.log_level)) > logging.DEBUG:
        logging.getLogger("worker.storage.blobstore").setLevel(logging.WARNING)
        if args.command in ("replay", "snapshot"):
            # they rebuild indexes with the service's own parts: its INFO lines (index
            # created, checkpoint planned) describe the rebuild, not the operator's cluster
            for name in ("worker.service", "worker.storage", "lhv_index"):
                logging.getLogger(name).setLevel(logging.WARNING)
    # a client verb reports a missing commands or search topic in its one line
    topics = TopicsConfig.from_env()
    reported = [
        getattr(args, "commands_topic", None) or topics.commands,
        getattr(args, "search_topic", None) or topics.search,
    ]
    aiokafka_logs.install(
        getattr(args, "reply_pattern", None) or topics.reply_pattern,
        reported=reported if args.command != "worker" else (),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lhv` with `argv` (default: sys.argv[1:]); returns the exit code.

    The user's mistakes end as one line on stderr and their exit code (module docstring);
    with `--log-level DEBUG` their traceback is logged first. A reader of the output that
    goes away (`lhv snapshot ls | head`) ends the command quietly with `EXIT_BROKEN_PIPE`.
    """
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, where a broken pipe cannot be caught
    except BrokenPipeError:
        # what is left to print goes nowhere, as it would for a command SIGPIPE ended
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)  # `lhv` alone: what there is to run, not one line
        return EXIT_USAGE
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print(f"lhv {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        error = user_error(exc, args)
        if error is None:
            raise  # a fault of LHV itself: the traceback is the report
        log.debug("lhv %s failed", args.command, exc_info=exc)
        print(f"lhv {args.command}: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
