"""The `lhv` command. `main(argv) -> int` is the entry point; each subcommand is a function
`_cmd_<name>(args) -> int` with an `_args_<name>(parser)` that declares its options, and
is registered once in `COMMANDS`.

    lhv stack up [--env-file .stack/env] [--partitions 4] [--foreground]
    lhv stack status [--env-file .stack/env]
    lhv stack down [--env-file .stack/env]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.client import Hit, LhvClient
    from worker.config import WorkerConfig

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

log = logging.getLogger(__name__)

DEFAULT_ENV_FILE = ".stack/env"


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
    sub = parser.add_subparsers(dest="stack_action", metavar="{up,status,down}", required=True)
    up = sub.add_parser("up", help="start Kafka (KRaft) and SeaweedFS S3 on loopback")
    up.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="where to write the env")
    up.add_argument(
        "--partitions", type=int, default=None, help="partitions of lhv.commands/lhv.search (4)"
    )
    up.add_argument(
        "--foreground", action="store_true", help="keep running until Ctrl-C, then stop"
    )
    up.add_argument(
        "--kafka-version", default=None, help="Kafka release (default 3.9.1, $LHV_KAFKA_VERSION)"
    )
    up.add_argument("--timeout", type=float, default=60.0, help="seconds per server to be ready")
    up.add_argument(
        "--sasl", action="store_true", help="require SASL (PLAIN, SCRAM-SHA-256; also over TLS)"
    )
    for name, text in (("status", "is the stack up and answering"), ("down", "stop the stack")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--env-file", default=DEFAULT_ENV_FILE, help="env file of `stack up`")


def _cmd_stack(args: argparse.Namespace) -> int:
    from worker import stack

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
    from worker import stack

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
        partitions=args.partitions if args.partitions is not None else stack.DEFAULT_PARTITIONS,
        start_timeout_s=args.timeout,
        sasl=args.sasl,
        **({"kafka_version": args.kafka_version} if args.kafka_version else {}),
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


def _args_worker(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--bootstrap-servers",
        default=env("LHV_BOOTSTRAP_SERVERS"),
        help="Kafka bootstrap servers (LHV_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument("--group", default=None, help="consumer group (LHV_GROUP_ID, lhv)")
    parser.add_argument("--commands-topic", default=None, help="(LHV_COMMANDS_TOPIC)")
    parser.add_argument("--search-topic", default=None, help="(LHV_SEARCH_TOPIC)")
    parser.add_argument("--dlq-topic", default=None, help="(LHV_DLQ_TOPIC)")
    parser.add_argument(
        "--reply-pattern",
        default=None,
        help="reply topics allowed, fnmatch style (LHV_REPLY_PATTERN)",
    )
    parser.add_argument("--s3-endpoint-url", default=None, help="(LHV_S3_ENDPOINT_URL)")
    parser.add_argument("--s3-bucket", default=None, help="(LHV_S3_BUCKET)")
    parser.add_argument("--s3-prefix", default=None, help="(LHV_S3_PREFIX)")
    parser.add_argument(
        "--checkpoint-records",
        type=int,
        default=None,
        help="checkpoint after this many records (LHV_CHECKPOINT_RECORDS)",
    )
    parser.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=None,
        help="checkpoint after this many seconds (LHV_CHECKPOINT_SECONDS)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics, /healthz, /readyz here (LHV_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host",
        default=None,
        help="address the metrics server binds (LHV_METRICS_HOST, 127.0.0.1)",
    )
    parser.add_argument(
        "--accept-data-loss",
        action="store_true",
        default=None,
        help="serve partitions whose log lost records after the checkpoint",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("LHV_LOG_JSON", "") not in ("", "0"),
        help="JSON log lines (LHV_LOG_JSON=1)",
    )


def _worker_config(args: argparse.Namespace) -> WorkerConfig:
    """Flags override `LHV_*` variables, which override the defaults."""
    from worker.config import WorkerConfig

    env = dict(os.environ)
    flags = {
        "LHV_BOOTSTRAP_SERVERS": args.bootstrap_servers,
        "LHV_GROUP_ID": args.group,
        "LHV_COMMANDS_TOPIC": args.commands_topic,
        "LHV_SEARCH_TOPIC": args.search_topic,
        "LHV_DLQ_TOPIC": args.dlq_topic,
        "LHV_REPLY_PATTERN": args.reply_pattern,
        "LHV_S3_ENDPOINT_URL": args.s3_endpoint_url,
        "LHV_S3_BUCKET": args.s3_bucket,
        "LHV_S3_PREFIX": args.s3_prefix,
        "LHV_CHECKPOINT_RECORDS": args.checkpoint_records,
        "LHV_CHECKPOINT_SECONDS": args.checkpoint_seconds,
        "LHV_METRICS_PORT": args.metrics_port,
        "LHV_METRICS_HOST": args.metrics_host,
        "LHV_ACCEPT_DATA_LOSS": "1" if args.accept_data_loss else None,
    }
    env.update({k: str(v) for k, v in flags.items() if v is not None})
    return WorkerConfig.from_env(env)


def _cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from worker.kafka_errors import KafkaSetupError
    from worker.service import Worker

    try:
        config = _worker_config(args)
    except (ValueError, KeyError) as exc:
        print(f"bad worker configuration: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        loop = asyncio.get_running_loop()
        worker = Worker(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        try:
            async with worker:
                await worker.run()
        except KafkaSetupError:
            raise  # one line from main()
        except Exception:
            log.exception("worker failed")
            return 1
        return 0

    return asyncio.run(run())


# --------------------------------------------------------------------------------------
# lhv load / search / stats (clients of running workers; logic in worker.loader, .client)


def _args_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("LHV_BOOTSTRAP_SERVERS") or "127.0.0.1:9092",
        help="Kafka bootstrap servers (LHV_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument("--commands-topic", default=None, help="(LHV_COMMANDS_TOPIC)")
    parser.add_argument("--search-topic", default=None, help="(LHV_SEARCH_TOPIC)")
    parser.add_argument("--reply-pattern", default=None, help="(LHV_REPLY_PATTERN)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per reply")


def _client(args: argparse.Namespace) -> LhvClient:
    from worker.client import LhvClient
    from worker.config import KafkaConfig, TopicsConfig

    env = dict(os.environ)
    for name, value in (
        ("LHV_BOOTSTRAP_SERVERS", args.bootstrap_servers),
        ("LHV_COMMANDS_TOPIC", args.commands_topic),
        ("LHV_SEARCH_TOPIC", args.search_topic),
        ("LHV_REPLY_PATTERN", args.reply_pattern),
    ):
        if value:
            env[name] = value
    return LhvClient(
        kafka=KafkaConfig.from_env(env), topics=TopicsConfig.from_env(env), timeout_s=args.timeout
    )


def _args_load(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("file", help=".npy, .npz, .fvecs or .jsonl ({id, vector, metadata?})")
    parser.add_argument("--ids-file", default=None, help="one id per line, or an .npy of ids")
    parser.add_argument("--create", action="store_true", help="create the index first")
    parser.add_argument("--dim", type=int, default=None, help="with --create (default: the file's)")
    parser.add_argument("--space", default="cosine", help="with --create: cosine, l2 or ip")
    parser.add_argument("--engine", default="hnsw", help="with --create: hnsw or exact")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch")
    parser.add_argument("--in-flight", type=int, default=8, help="batches awaiting acks at once")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _args_connection(parser)


def _cmd_load(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from lhv_index.errors import LhvError
    from worker.loader import LoadError, load_file, open_vectors

    try:
        vectors = open_vectors(args.file, ids_file=args.ids_file)
    except LoadError as exc:
        print(f"lhv load: {exc}", file=sys.stderr)
        return 2
    if args.dim is not None and args.dim != vectors.dim:
        print(f"lhv load: --dim {args.dim} but {args.file} has {vectors.dim}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with _client(args) as client:
            if args.create:
                await client.create(
                    args.index, dim=vectors.dim, space=args.space, engine=args.engine
                )
            with tqdm(
                total=vectors.rows, unit="rows", desc=args.index, disable=args.no_progress
            ) as bar:
                report = await load_file(
                    client,
                    args.index,
                    vectors,
                    batch_size=args.batch_size,
                    in_flight=args.in_flight,
                    progress=bar.update,
                )
        last = report.last
        where = f" (last at partition {last.partition} offset {last.offset})" if last else ""
        print(f"loaded {report.rows} of {vectors.rows} rows into {args.index}{where}")
        for failed in report.failed:
            print(f"FAILED {failed}", file=sys.stderr)
        if report.failed:
            print(f"{len(report.failed)} of {report.batches} batches failed", file=sys.stderr)
            return 1
        return 0

    try:
        return asyncio.run(run())
    except (LhvError, LoadError, TimeoutError) as exc:
        print(f"lhv load: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _args_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--vector", help="one query as a JSON array")
    what.add_argument("--file", help="queries: .npy/.npz/.fvecs/.jsonl, one per row")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--ef", type=int, default=None)
    parser.add_argument("--filter", default=None, help='metadata equality, JSON: {"lang": "en"}')
    parser.add_argument("--metadata", action="store_true", help="include metadata")
    parser.add_argument("--json", action="store_true", help="one JSON line per query")
    _args_connection(parser)


def _cmd_search(args: argparse.Namespace) -> int:
    import asyncio
    import json

    import numpy as np

    from lhv_index.errors import LhvError
    from worker.loader import LoadError, open_vectors

    try:
        if args.vector is not None:
            queries = np.asarray([json.loads(args.vector)], dtype=np.float32)
            if queries.ndim != 2:
                raise ValueError("--vector must be a flat JSON array of numbers")
        else:
            vf = open_vectors(args.file)
            queries = np.concatenate([b.vectors for b in vf.batches(10_000)])
        flt = json.loads(args.filter) if args.filter else None
    except (ValueError, LoadError) as exc:
        print(f"lhv search: {exc}", file=sys.stderr)
        return 2

    async def run() -> list[list[Hit]]:
        async with _client(args) as client:
            return list(
                await client.search_many(
                    args.index,
                    queries,
                    args.k,
                    ef=args.ef,
                    filter=flt,
                    include_metadata=args.metadata,
                )
            )

    try:
        results = asyncio.run(run())
    except (LhvError, TimeoutError) as exc:
        print(f"lhv search: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for q, hits in enumerate(results):
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
    return 0


def _args_stats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index")
    parser.add_argument("--json", action="store_true", help="the reply as JSON")
    _args_connection(parser)


def _cmd_stats(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from lhv_index.errors import LhvError

    async def run() -> dict[str, object]:
        async with _client(args) as client:
            return dict(await client.stats(args.index))

    try:
        stats = asyncio.run(run())
    except (LhvError, TimeoutError) as exc:
        print(f"lhv stats: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for key in ("correlation_id", "status", "op", "took_ms"):
        stats.pop(key, None)
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return 0
    for key, value in stats.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
        print(f"{key:18} {text}")
    return 0


# --------------------------------------------------------------------------------------
# lhv demo


def _args_demo(parser: argparse.ArgumentParser) -> None:
    from worker import demo

    demo.add_arguments(parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker import demo

    return demo.run(args)


# --------------------------------------------------------------------------------------
# lhv bench (a source checkout's bench/bench_e2e.py; bench/ is not installed)


def _args_bench(parser: argparse.ArgumentParser) -> None:
    # every word after `bench`, `--help` included, goes to the script: no option prefix here
    parser.prefix_chars = "+"
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options of bench/bench_e2e.py (--help)"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    script = Path(__file__).resolve().parent.parent / "bench" / "bench_e2e.py"
    if not script.is_file():
        print(f"lhv bench needs a source checkout: {script} not found", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, str(script), *args.bench_args]).returncode


# --------------------------------------------------------------------------------------
# lhv snapshot / replay (operator tools; logic in worker.tools)


def _args_snapshot(parser: argparse.ArgumentParser) -> None:
    from worker import tools

    tools.add_snapshot_arguments(parser)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from worker import tools

    return tools.run_snapshot(args)


def _args_replay(parser: argparse.ArgumentParser) -> None:
    from worker import tools

    tools.add_replay_arguments(parser)


def _cmd_replay(args: argparse.Namespace) -> int:
    from worker import tools

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
    Command("load", "load vectors from a file into an index (acknowledged)", _args_load, _cmd_load),
    Command("search", "k nearest neighbours of one or more vectors", _args_search, _cmd_search),
    Command("stats", "an index's size, parameters and offsets", _args_stats, _cmd_stats),
    Command("demo", "LHV end to end on the local stack, with a report", _args_demo, _cmd_demo),
    Command("bench", "end-to-end benchmarks against raw hnswlib (bench/)", _args_bench, _cmd_bench),
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
    parser = argparse.ArgumentParser(
        prog="lhv", description="LHV: vector indexes fed by Kafka, checkpointed to S3"
    )
    parser.add_argument(
        "--log-level", default=os.environ.get("LHV_LOG_LEVEL", "INFO"), help="INFO, DEBUG, ..."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lhv` with `argv` (default: sys.argv[1:]); returns the exit code.

    A Kafka setting or connection failure ends any command with one line and its
    `exit_code` (2 a setting, 3 no connection, 4 refused: see `worker.kafka_errors`);
    its traceback is logged at DEBUG.
    """
    from worker.kafka_errors import KafkaSetupError, translate
    from worker.logs import setup_logging

    args = build_parser().parse_args(argv)
    json_logs = getattr(args, "log_json", None)
    if json_logs is None:
        json_logs = os.environ.get("LHV_LOG_JSON", "") not in ("", "0")
    setup_logging(str(args.log_level), json=bool(json_logs))
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        failure = exc if isinstance(exc, KafkaSetupError) else translate(exc, None)
        if failure is None:
            raise
        log.debug("lhv %s failed", args.command, exc_info=exc)
        print(f"lhv {args.command}: {failure}", file=sys.stderr)
        return failure.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
