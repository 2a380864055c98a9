"""Named crash points, for fault tests that need a kill -9 at an exact step.

`LHV_FAILPOINTS="after_manifest@2,mid_snapshot"` makes the process SIGKILL itself the
2nd time it reaches `after_manifest`, or the first time it reaches `mid_snapshot`.
Unset (the normal case), `hit()` is a dictionary lookup and nothing else.

Points: `mid_batch` (a batch applied in memory, acks and offsets not yet out),
`mid_snapshot` (a snapshot uploaded, the manifest not yet written),
`after_manifest` (the manifest written, the Kafka commit not yet made), `forwarded` (a
batch's forwarded records taken by the broker, its acks not sent and no checkpoint
covering it).
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["hit"]

log = logging.getLogger(__name__)


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("@")
        out[name] = int(count or 1)
    return out


_armed = _parse(os.environ.get("LHV_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Reached point `name`: die here if it is armed and its count is up."""
    if name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        log.error("failpoint %s reached: killing this process", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
