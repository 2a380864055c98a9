"""The stack a benchmark runs on, and the private topics, S3 prefix and worker
environment of one run on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from worker.dev.stack import LocalStack, create_topics
from worker.storage.blobstore import S3Config
from worker.wire.topics import TopicsConfig

__all__ = ["WorkerEnv", "stack_env", "worker_env", "write_results"]


@contextlib.contextmanager
def stack_env() -> Iterator[dict[str, str]]:
    """The environment of a running stack: the caller's (`LHV_*` of `lhv stack up`), or
    a private one started here and stopped on exit."""
    if os.environ.get("LHV_BOOTSTRAP_SERVERS") and os.environ.get("LHV_S3_ENDPOINT_URL"):
        yield dict(os.environ)
        return
    with LocalStack(partitions=1) as stack:
        yield {**os.environ, **stack.env()}


def write_results(doc: Any, path: Path | None) -> None:
    """Print the results as one JSON line, and write them to `path` when given."""
    print(json.dumps(doc, sort_keys=True))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


class WorkerEnv(NamedTuple):
    """What one `lhv worker` subprocess and the benchmark's client share."""

    topics: TopicsConfig
    s3: S3Config
    child: dict[str, str]


async def worker_env(
    env: Mapping[str, str],
    name: str,
    extra: Mapping[str, str] | None = None,
    *,
    partitions: int = 1,
) -> WorkerEnv:
    """Create topics `<name><tag>.{commands,search}` of `partitions` partitions and
    `<name><tag>.dlq` of one (a random tag) and return them, the S3 config under
    `bench-<name>-<tag>/` and the environment of a worker on them in group `<name><tag>`,
    checkpoints effectively off, with `extra` on top."""
    tag = uuid.uuid4().hex[:8]
    base = f"{name}{tag}"
    topics = TopicsConfig(commands=f"{base}.commands", search=f"{base}.search", dlq=f"{base}.dlq")
    await asyncio.to_thread(
        create_topics,
        env["LHV_BOOTSTRAP_SERVERS"],
        {topics.commands: partitions, topics.search: partitions, topics.dlq: 1},
    )
    s3 = S3Config.from_env(env, prefix=f"bench-{name}-{tag}/")
    child = {
        **env,
        "LHV_COMMANDS_TOPIC": topics.commands,
        "LHV_SEARCH_TOPIC": topics.search,
        "LHV_DLQ_TOPIC": topics.dlq,
        "LHV_GROUP_ID": base,
        "LHV_S3_PREFIX": s3.prefix,
        "LHV_CHECKPOINT_SECONDS": "36000",
        "LHV_CHECKPOINT_RECORDS": "1000000000",
        "LHV_CHECKPOINT_MAX_REPLAY_S": "0",
        **(extra or {}),
    }
    return WorkerEnv(topics, s3, child)
