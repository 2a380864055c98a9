"""aiokafka's log lines that report situations normal for LHV, demoted to DEBUG.

aiokafka logs ERROR for two things every LHV deployment sees all the time:

- `Topic lhv.replies.X not found in cluster metadata` (`aiokafka.cluster`): a client
  deletes its reply topic when it stops, and a worker's producer keeps asking for the
  metadata of every topic it ever wrote to. A reply to a missing topic is handled (and
  logged once, as a warning) by `worker.service.replies.ReplySender`.
- `Group Coordinator Request failed: [Error 15] CoordinatorNotAvailableError`
  (`aiokafka.consumer.group_coordinator`) while the broker loads its group coordinator,
  e.g. right after it starts; aiokafka retries by itself.

And asyncio logs ERROR `Future exception was never retrieved` (`asyncio`) when a future
of a connection aiokafka gave up on is garbage-collected with its connection error
(`OSError`, e.g. `ssl.SSLError` for a refused client certificate, or
`KafkaConnectionError`): the error itself has been raised to the caller already, which
reports it (the command line in one line), so the second report is noise whose
appearance depends on when the collector runs.

While a broker is unreachable, aiokafka logs ERROR `Unable to update metadata from ...`
(`aiokafka`) and `Failed fetch messages from ...` (`aiokafka.consumer.fetcher`) at every
retry: some 40 lines a second. `Repeats` passes one of each every `window_s` (10 s) at
its level, saying how many it held back since; those are DEBUG records.

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
import time
from collections.abc import Callable, Iterable

from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    NodeNotReadyError,
)

from worker.wire.topics import DEFAULT_REPLY_PATTERN, ReplyTopicPolicy

__all__ = ["NormalSituations", "Repeats", "install"]

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
#: logger -> the line it repeats at every retry while a broker is unreachable
_RETRY_LINES = {
    "aiokafka": "Unable to update metadata from %s",
    "aiokafka.consumer.fetcher": "Failed fetch messages from %s: %s",
}


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
        return _as_debug(record) if self.normal(record) else True


def _as_debug(record: logging.LogRecord) -> bool:
    """Make `record` a DEBUG record; whether its logger then keeps it."""
    record.levelno = logging.DEBUG
    record.levelname = logging.getLevelName(logging.DEBUG)
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class Repeats(logging.Filter):
    """One record of `msg` per `window_s` at its level; the others in between are DEBUG
    records, counted in the next one passed ("held back since")."""

    def __init__(
        self, msg: str, *, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._msg = msg
        self._window_s = window_s
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self._msg or record.levelno < logging.WARNING:
            return True
        now = self._clock()
        if self._last is None or now - self._last >= self._window_s:
            self._last = now
            if self._held:
                record.msg = (
                    f"{record.msg} ({self._held} more like it held back since the last one, "
                    "at DEBUG)"
                )
                self._held = 0
            return True
        self._held += 1
        return _as_debug(record)


def install(reply_pattern: str = DEFAULT_REPLY_PATTERN, *, reported: Iterable[str] = ()) -> None:
    """Filter the aiokafka loggers (replacing a filter installed before); `reported`:
    topics whose absence the caller reports itself (module docstring)."""
    reported = tuple(reported)
    filters: list[tuple[str, logging.Filter]] = [
        (name, NormalSituations(reply_pattern, reported=reported)) for name in LOGGERS
    ]
    filters += [(name, Repeats(msg)) for name, msg in _RETRY_LINES.items()]
    for name, new in filters:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if type(f) is type(new)]:
            logger.removeFilter(old)
        logger.addFilter(new)
