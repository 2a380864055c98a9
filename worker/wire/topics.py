"""Topic names, the reply-topic policy, and the partition an index lives on."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import translate

from aiokafka.partitioner import murmur2

from lhv_index.errors import (
    InvalidRequest,
)
from worker._environ import _env
from worker.wire.shards import SHARD_SEPARATOR, member_partition, parse_shard_name

__all__ = [
    "DEFAULT_COMMANDS_TOPIC",
    "DEFAULT_DLQ_TOPIC",
    "DEFAULT_REPLICA_SEARCH_TOPIC",
    "DEFAULT_REPLY_PATTERN",
    "DEFAULT_SEARCH_TOPIC",
    "FORBIDDEN_REPLY_TOPICS",
    "ReplyTopicPolicy",
    "TopicsConfig",
    "home_partition",
    "partitioner",
]

#: the default topics (DESIGN section 2), each configurable (`TopicsConfig.from_env`)
DEFAULT_COMMANDS_TOPIC = "lhv.commands"
DEFAULT_SEARCH_TOPIC = "lhv.search"
#: queries answered by read replicas (same request format as `lhv.search`, same partition
#: count, co-partitioned with the commands topic in each replica group)
DEFAULT_REPLICA_SEARCH_TOPIC = "lhv.search.replicas"
DEFAULT_DLQ_TOPIC = "lhv.commands.dlq"
#: the topics replies and acks may go to (fnmatch style); a client names its own under it
DEFAULT_REPLY_PATTERN = "lhv.replies.*"


def home_partition(key: bytes, num_partitions: int) -> int:
    """The partition a record keyed `key` belongs on: for a member `NAME#s` of a sharded
    index, `member_partition` (s partitions after NAME's home); for any other key the one
    Kafka's default partitioner picks (murmur2, positive)."""
    if SHARD_SEPARATOR.encode() in key:
        try:
            member = parse_shard_name(bytes(key).decode("utf-8"))
        except UnicodeDecodeError:
            member = None
        if member is not None:
            return member_partition(member.base, member.shard, num_partitions)
    return int(murmur2(key) & 0x7FFFFFFF) % num_partitions


def partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """An aiokafka `partitioner` that puts every record where `home_partition` says: the
    producers of the client and the worker use it, so a member's records need no
    explicit partition. Keyless records go to a random available partition."""
    if key is None:
        return random.choice(list(available) or list(all_partitions))
    ordered = sorted(all_partitions)
    return ordered[home_partition(key, len(ordered))]


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicsConfig:
    """Topic names and the reply-topic pattern (fnmatch style)."""

    commands: str = DEFAULT_COMMANDS_TOPIC
    search: str = DEFAULT_SEARCH_TOPIC
    replica_search: str = DEFAULT_REPLICA_SEARCH_TOPIC
    """the search topic of read replicas (`LHV_REPLICA_SEARCH_TOPIC`)"""
    dlq: str = DEFAULT_DLQ_TOPIC
    reply_pattern: str = DEFAULT_REPLY_PATTERN

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TopicsConfig:
        d = cls()
        return cls(
            commands=_env(env, "LHV_COMMANDS_TOPIC", d.commands) or d.commands,
            search=_env(env, "LHV_SEARCH_TOPIC", d.search) or d.search,
            replica_search=_env(env, "LHV_REPLICA_SEARCH_TOPIC", d.replica_search)
            or d.replica_search,
            dlq=_env(env, "LHV_DLQ_TOPIC", d.dlq) or d.dlq,
            reply_pattern=_env(env, "LHV_REPLY_PATTERN", d.reply_pattern) or d.reply_pattern,
        )

    def reply_policy(self) -> ReplyTopicPolicy:
        """Where replies and acks may go: topics matching `reply_pattern`, never these
        command, search (owners' and replicas') or dead-letter topics."""
        return ReplyTopicPolicy(
            self.reply_pattern,
            forbidden={self.commands, self.search, self.replica_search, self.dlq},
        )


#: the default command, search (owners' and replicas') and dead-letter topics: never a
#: reply topic
FORBIDDEN_REPLY_TOPICS = frozenset(
    {DEFAULT_COMMANDS_TOPIC, DEFAULT_SEARCH_TOPIC, DEFAULT_REPLICA_SEARCH_TOPIC, DEFAULT_DLQ_TOPIC}
)

_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


class ReplyTopicPolicy:
    """Which topics replies and acks may be written to.

    Arguments:
        pattern: fnmatch-style pattern of allowed topics (see the module doc).
        forbidden: topics refused even when they match; pass the configured command,
            search and DLQ topics when they differ from the defaults.
    """

    __slots__ = ("_forbidden", "_regex", "pattern")

    def __init__(
        self,
        pattern: str = DEFAULT_REPLY_PATTERN,
        *,
        forbidden: Iterable[str] = FORBIDDEN_REPLY_TOPICS,
    ) -> None:
        if not pattern:
            raise ValueError("the reply-topic pattern is empty")
        self.pattern = pattern
        self._regex = re.compile(translate(pattern))
        self._forbidden = frozenset(forbidden)

    def allows(self, topic: str) -> bool:
        return (
            _TOPIC.fullmatch(topic) is not None
            and topic not in self._forbidden
            and self._regex.match(topic) is not None
        )

    def check(self, topic: str) -> None:
        """Return quietly when replies may go to `topic`.

        Raises:
            InvalidRequest: `topic` does not match the pattern, is forbidden, or is not a
                legal topic name.
        """
        if not self.allows(topic):
            raise InvalidRequest(
                f"reply topic {topic!r} is not allowed: replies go only to topics matching "
                f"{self.pattern!r}"
            )

    def __repr__(self) -> str:
        return f"ReplyTopicPolicy({self.pattern!r})"
