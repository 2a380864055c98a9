"""aiokafka's log lines that report situations normal for LHV, demoted to DEBUG.

aiokafka logs ERROR for two things every LHV deployment sees all the time:

- `Topic lhv.replies.X not found in cluster metadata` (`aiokafka.cluster`): a client
  deletes its reply topic when it stops, and a worker's producer keeps asking for the
  metadata of every topic it ever wrote to. A reply to a missing topic is handled (and
  logged once, as a warning) by `worker.replies.ReplySender`.
- `Group Coordinator Request failed: [Error 15] CoordinatorNotAvailableError`
  (`aiokafka.consumer.group_coordinator`) while the broker loads its group coordinator,
  e.g. right after it starts; aiokafka retries by itself.

And asyncio logs ERROR `Future exception was never retrieved` (`asyncio`) when a future
of a connection aiokafka gave up on is garbage-collected with its connection error
(`OSError`, e.g. `ssl.SSLError` for a refused client certificate, or
`KafkaConnectionError`): the error itself has been raised to the caller already, which
reports it (the command line in one line), so the second report is noise whose
appearance depends on when the collector runs.

`install(reply_pattern, reported=...)` adds a filter to exactly those loggers that turns
exactly those records into DEBUG records (kept with `--log-level DEBUG`, dropped
otherwise). `reported` names topics whose absence the caller reports by itself (the `lhv`
client verbs: the commands and search topics, in their one line of error), so aiokafka's
line, repeated at every metadata retry while it waits, is DEBUG too. Every other aiokafka
line keeps its level: a missing topic that is neither a reply topic nor reported, or a
coordinator error that is not retriable, is still an ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    NodeNotReadyError,
)

from worker.wire.topics import DEFAULT_REPLY_PATTERN, ReplyTopicPolicy

__all__ = ["NormalSituations", "install"]

_TOPIC_NOT_FOUND = "Topic %s not found in cluster metadata"
_COORDINATOR_FAILED = "Group Coordinator Request failed: %s"
#: coordinator lookups that fail while a broker starts (aiokafka retries them)
_STARTING_COORDINATOR = (
    GroupCoordinatorNotAvailableError,
    CoordinatorLoadInProgressError,
    NodeNotReadyError,
)
_NEVER_RETRIEVED = "Future exception was never retrieved"
#: the loggers whose records the filter looks at
LOGGERS = ("aiokafka.cluster", "aiokafka.consumer.group_coordinator", "asyncio")


class NormalSituations(logging.Filter):
    """Demotes the records of the module docstring to DEBUG; leaves the others alone."""

    def __init__(
        self, reply_pattern: str = DEFAULT_REPLY_PATTERN, *, reported: Iterable[str] = ()
    ) -> None:
        super().__init__()
        self._replies = ReplyTopicPolicy(reply_pattern, forbidden=())
        self._reported = frozenset(reported)

    def normal(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not isinstance(record.args, tuple):
            return False
        if record.msg == _TOPIC_NOT_FOUND and record.args:
            topic = str(record.args[0])
            return topic in self._reported or self._replies.allows(topic)
        if record.msg == _COORDINATOR_FAILED and record.args:
            return isinstance(record.args[0], _STARTING_COORDINATOR)
        if isinstance(record.msg, str) and record.msg.startswith(_NEVER_RETRIEVED):
            exc = record.exc_info[1] if record.exc_info else None
            return isinstance(exc, OSError | KafkaConnectionError)
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.normal(record):
            return True
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def install(reply_pattern: str = DEFAULT_REPLY_PATTERN, *, reported: Iterable[str] = ()) -> None:
    """Filter the aiokafka loggers (replacing a filter installed before); `reported`:
    topics whose absence the caller reports itself (module docstring)."""
    reported = tuple(reported)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, NormalSituations)]:
            logger.removeFilter(old)
        logger.addFilter(NormalSituations(reply_pattern, reported=reported))
